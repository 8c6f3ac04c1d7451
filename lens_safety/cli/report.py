"""``lens-safety judge-agreement`` and ``report``: a judge against labels, evaluated models side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lens_safety.cli import app, options
from lens_safety.cli.common import check_writable, print_json, print_rosi_table, quiet_libraries

LabelledArg = Annotated[
    str,
    typer.Argument(
        help="Labelled completions (.jsonl/.csv with a completion column, a refused or harmful label "
        "column and, for judges that read prompts, a prompt column), or 'pyrit' for PyRIT's "
        "human-labelled refusal CSVs (needs pyrit installed)."
    ),
]
LabelsOpt = Annotated[
    str | None,
    typer.Option(
        "--labels",
        help="Which label column to read: refusal (refused/label/human_score) or harm (harmful/unsafe). "
        "Default: refusal when the file has such a column, else harm.",
    ),
]
EvaluationsArg = Annotated[
    list[Path],
    typer.Argument(
        help="Evaluation JSON files written by 'lens-safety eval --json' (or eval --compare --json)."
    ),
]
ReportOutOpt = Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")]
ReportLabelOpt = Annotated[
    list[str] | None, typer.Option("--label", help="Name of each model in the report (repeat, in order).")
]
TitleOpt = Annotated[str, typer.Option("--title", help="Page title.")]
TableOpt = Annotated[
    bool,
    typer.Option(
        "--table",
        help="Print ROSI's side-by-side table of the evaluations (harm refusal, benign compliance, "
        "jailbreak success, utility; each column naming its judge) instead of writing HTML.",
    ),
]


@app.command("judge-agreement")
def judge_agreement_command(
    labelled: LabelledArg,
    judge: options.JudgeOpt = "substring",
    labels: LabelsOpt = None,
    json: options.JsonOpt = False,
) -> None:
    """Precision, recall and accuracy (95% Wilson intervals) and the confusion matrix of a judge
    (default: substring) against labelled completions; names the judge's question and the labels'."""
    quiet_libraries()
    from lens_safety.evaluation.agreement import judge_agreement, pyrit_refusal_files, read_labelled_many

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
    evaluations: EvaluationsArg,
    out: ReportOutOpt = Path("lens-safety-report.html"),
    label: ReportLabelOpt = None,
    title: TitleOpt = "lens-safety evaluation",
    table: TableOpt = False,
    json: options.JsonOpt = False,
    overwrite: options.OverwriteOpt = False,
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
            print_rosi_table(result)
        return
    check_writable(out, overwrite, "--out")
    written = write_report(data, out, label or None, overwrite=overwrite, title=title)
    typer.echo(str(written))
