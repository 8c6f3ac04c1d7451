"""``lens-safety srr build-data|train|eval|generate``: build candidate lists, train a ranker, evaluate
it with baselines, best-of-N."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lens_safety.cli import options, srr_app
from lens_safety.cli.common import (
    check_writable,
    load_cli_model,
    parse_list,
    print_json,
    quiet_libraries,
    write_jsonl,
)
from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import require_free

if TYPE_CHECKING:
    from lens_safety.prompts import PromptSet
    from lens_safety.srr.evaluate import SRREvaluation

OptionalHarmfulOpt = Annotated[
    str | None, typer.Option("--harmful", help=f"Harmful instructions (optional): {options.PROMPT_SOURCES}.")
]
OptionalHarmlessOpt = Annotated[
    str | None,
    typer.Option("--harmless", help=f"Harmless instructions (optional): {options.PROMPT_SOURCES}."),
]
BuildOutOpt = Annotated[
    Path, typer.Option("--out", help="Output directory (lists.jsonl, features.safetensors, meta.json).")
]
FeatureLayersOpt = Annotated[
    str | None,
    typer.Option("--layers", help="Feature layers to store (default: every 3rd, final, ranker layer)."),
]
ContextsOpt = Annotated[
    str | None,
    typer.Option(
        "--contexts",
        help="Response encodings to store, comma-separated (default: all; generated,generated_mean "
        "need no second pass and build about twice as fast).",
    ),
]
DataDirsArg = Annotated[
    list[Path],
    typer.Argument(
        help="Directories written by `srr build-data` (several are combined: same model and layers)."
    ),
]
RankerOutOpt = Annotated[Path, typer.Option("--out", help="Ranker directory to write.")]
RankerLayerOpt = Annotated[
    int | None, typer.Option("--layer", help="Feature layer (default: floor(0.2 * n_layers)).")
]
ContextOpt = Annotated[
    str,
    typer.Option(
        "--context",
        help="Response encoding: with_instruction, response_only, generated or generated_mean (read while sampling: last token or mean over the response).",
    ),
]
WidthOpt = Annotated[int, typer.Option("--width", help="Projection width.")]
TauOpt = Annotated[float, typer.Option("--tau", help="Softmax temperature of cosine scores.")]
DropoutOpt = Annotated[float, typer.Option("--dropout", help="Dropout in the encoder layer (paper: 0.1).")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (paper: 1e-4).")]
MembersOpt = Annotated[
    int,
    typer.Option(
        "--members",
        help="Ensemble size: independently trained rankers (seeds seed..seed+K-1), scores averaged.",
    ),
]
MaxEpochsOpt = Annotated[
    int,
    typer.Option("--max-epochs", help="Most passes over the training lists (early stopping may end sooner)."),
]
PatienceOpt = Annotated[
    int, typer.Option("--patience", help="Epochs without a lower validation loss before training stops.")
]
BaselinesOpt = Annotated[
    bool,
    typer.Option("--baselines/--no-baselines", help="Also train the text-only and final-layer baselines."),
]
DataOpt = Annotated[
    list[Path] | None,
    typer.Option("--data", help="Reuse lists built earlier (skips generation); repeat to pool directories."),
]
SaveDataOpt = Annotated[
    Path | None, typer.Option("--save-data", help="Also keep the lists built for this evaluation.")
]
ListsOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--lists-out",
        help="Write every list (candidates, labels, the ranker's scores and its choice) to this .jsonl file.",
    ),
]
RelabelJudgeOpt = Annotated[
    str | None,
    typer.Option(
        "--judge",
        help="Judge of the labels (default: substring when building; with --data, the stored labels "
        "unless a judge is named, which re-labels them).",
    ),
]
PromptArg = Annotated[str, typer.Argument(help="The instruction to answer.")]
OptionalSeedOpt = Annotated[int | None, typer.Option("--seed")]


def _prompts(spec: str | None, limit: int | None) -> PromptSet | None:
    """An instruction set (``None`` when not given), whole or ``--limit`` instructions evenly spaced."""
    from lens_safety.prompts import PromptSet

    if spec is None:
        return None
    prompts = PromptSet.load(spec)
    if limit is None or limit >= len(prompts):
        return prompts
    if limit < 1:
        raise LensSafetyError(f"--limit must be >= 1, got {limit}", "pass a positive number of instructions")
    # evenly spaced, so that files grouped by category keep every category
    return prompts.subset([i * len(prompts) // limit for i in range(limit)])


def _sampling(
    n: int, temperature: float, max_new_tokens: int, seed: int, jailbreak_fraction: float
) -> dict[str, Any]:
    """The sampling keywords of :func:`~lens_safety.srr.build.build_dataset`, which ``srr build-data``
    and ``srr eval`` take as the same options."""
    return {
        "n": n,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "jailbreak_fraction": jailbreak_fraction,
    }


@srr_app.command("build-data")
def build_data(
    model: options.ModelArg,
    harmful: OptionalHarmfulOpt = None,
    harmless: OptionalHarmlessOpt = None,
    *,
    out: BuildOutOpt,
    n: options.NOpt = 8,
    temperature: options.TemperatureOpt = 1.0,
    max_new_tokens: options.CandidateTokensOpt = 48,
    seed: options.SeedOpt = 0,
    jailbreak_fraction: options.JailbreakOpt = 0.5,
    judge: options.LabelJudgeOpt = "substring",
    layers: FeatureLayersOpt = None,
    contexts: ContextsOpt = None,
    limit: options.InstructionLimitOpt = None,
    overwrite: options.OverwriteOpt = False,
    device: options.DeviceOpt = None,
    dtype: options.DtypeOpt = None,
    engine: options.EngineOpt = "hf",
    json_out: options.JsonOpt = False,
) -> None:
    """Sample, label and featurise candidate lists for harmful and/or harmless instructions."""
    from lens_safety.evaluation.vllm_engine import engine_for, require_engine_name
    from lens_safety.srr.build import build_dataset
    from lens_safety.srr.features import CONTEXTS

    require_engine_name(engine)

    if harmful is None and harmless is None:
        raise LensSafetyError("no instructions given", "pass --harmful FILE and/or --harmless FILE")
    require_free(out, overwrite)
    chosen_contexts = tuple(c.strip() for c in contexts.split(",") if c.strip()) if contexts else CONTEXTS
    chat_model = load_cli_model(model, device, dtype, selfcheck=True)
    generator = engine_for(engine, chat_model)
    try:
        dataset = build_dataset(
            chat_model,
            _prompts(harmful, limit),
            _prompts(harmless, limit),
            **_sampling(n, temperature, max_new_tokens, seed, jailbreak_fraction),
            judge=judge,
            layers=None if layers is None else parse_list(layers, "--layers", int, "0,6,12"),
            contexts=chosen_contexts,
            engine=generator,
            progress=True,
        )
    finally:
        if generator is not None:
            generator.close()
    dataset.save(out, overwrite=overwrite)
    summary = {
        "out": str(out),
        **dataset.counts(),
        "layers": list(dataset.layers),
        "seconds": dataset.meta["total_seconds"],
    }
    print_json(summary) if json_out else typer.echo(json.dumps(summary))


@srr_app.command("train")
def train(
    data_dirs: DataDirsArg,
    out: RankerOutOpt,
    layer: RankerLayerOpt = None,
    context: ContextOpt = "with_instruction",
    width: WidthOpt = 256,
    tau: TauOpt = 0.1,
    dropout: DropoutOpt = 0.1,
    weight_decay: WeightDecayOpt = 1e-4,
    members: MembersOpt = 1,
    seed: options.SeedOpt = 0,
    max_epochs: MaxEpochsOpt = 200,
    patience: PatienceOpt = 15,
    baselines: BaselinesOpt = True,
    overwrite: options.OverwriteOpt = False,
    json_out: options.JsonOpt = False,
) -> None:
    """Train a ranker (and its baselines) on built candidate lists."""
    from lens_safety.srr.train_job import train_ranker_directory

    result = train_ranker_directory(
        data_dirs,
        out,
        layer=layer,
        context=context,
        width=width,
        tau=tau,
        dropout=dropout,
        weight_decay=weight_decay,
        members=members,
        seed=seed,
        max_epochs=max_epochs,
        patience=patience,
        baselines=baselines,
        overwrite=overwrite,
        progress=True,
    )
    if json_out:
        print_json(result.to_dict())
    else:
        report = result.report
        typer.echo(
            f"ranker: {result.ranker.n_parameters():,} parameters, layer {result.layer}, {context}; "
            f"{report.n_train_lists} train / {report.n_val_lists} val lists, best epoch {report.best_epoch} -> {out}"
        )


@srr_app.command("eval")
def eval_command(
    ranker_dir: options.RankerDirArg,
    harmful: options.HarmfulOpt = "builtin:harmful:test",
    harmless: options.HarmlessOpt = "builtin:harmless:test",
    data: DataOpt = None,
    save_data: SaveDataOpt = None,
    n: options.NOpt = 8,
    temperature: options.TemperatureOpt = 1.0,
    max_new_tokens: options.CandidateTokensOpt = 48,
    seed: options.SeedOpt = 1,
    jailbreak_fraction: options.JailbreakOpt = 0.5,
    judge: RelabelJudgeOpt = None,
    limit: options.InstructionLimitOpt = None,
    device: options.DeviceOpt = None,
    lists_out: ListsOutOpt = None,
    overwrite: options.OverwriteOpt = False,
    json_out: options.JsonOpt = False,
) -> None:
    """Build lists for held-out prompts with the ranker's base model and score ranker and baselines."""
    from lens_safety.srr.baselines import load_baselines
    from lens_safety.srr.build import build_dataset, default_layers
    from lens_safety.srr.combine import load_datasets
    from lens_safety.srr.evaluate import evaluate, ranked_lists
    from lens_safety.srr.ranker import check_base_model, load_ranker, read_ranker_record

    record = read_ranker_record(ranker_dir)
    base = record.get("base_model") or {}
    if save_data is not None:
        require_free(save_data, False, option="--save-data")
    if lists_out is not None:
        check_writable(lists_out, overwrite, "--lists-out")
    if data:
        dataset = load_datasets(data)
        check_base_model(base, dataset.meta.get("model", {}), ranker_dir)
        if judge is not None:
            from lens_safety.srr.labels import relabel_dataset

            dataset = relabel_dataset(dataset, judge)[0]
    else:
        model = load_cli_model(str(base.get("spec", "")), device, None)
        load_ranker(ranker_dir, model)  # refuses a ranker trained on another model
        dataset = build_dataset(
            model,
            _prompts(harmful, limit),
            _prompts(harmless, limit),
            **_sampling(n, temperature, max_new_tokens, seed, jailbreak_fraction),
            judge=judge or "substring",
            layers=default_layers(model, record["config"].get("layer")),
            progress=True,
        )
        if save_data is not None:
            dataset.save(save_data)
    ranker = load_ranker(ranker_dir)
    result = evaluate(ranker, dataset, load_baselines(ranker_dir), seed=seed)
    if lists_out is not None:
        write_jsonl(lists_out, ranked_lists(ranker, dataset))
    if json_out:
        print_json(result.to_dict())
    else:
        _print_evaluation(result)


def _print_evaluation(result: SRREvaluation) -> None:
    """The ranker's and each baseline's metrics on mixed lists, the rate over every list, and
    which judge labelled which instructions."""
    quiet_libraries()
    rows = [("ranker", result.ranker), *result.baselines.items()]
    typer.echo(f"{'scorer':<14}{'pairwise':>10}{'harm top1':>11}{'harmless top1':>15}{'ndcg':>8}")
    for name, m in rows:
        typer.echo(
            f"{name:<14}{m.pairwise_accuracy:>10.3f}{m.harmful_top1_safe:>11.3f}{m.harmless_top1_helpful:>15.3f}{m.ndcg:>8.3f}"
        )
    first = result.baselines.get("first_sample")
    plain = (
        f" (first sample {first.harmful_selected_safe:.3f} / {first.harmless_selected_helpful:.3f})"
        if first
        else ""
    )
    typer.echo(
        f"over every list ({result.ranker.n_all_harmful} harmful, {result.ranker.n_all_harmless} harmless): "
        f"the ranker's choice is safe {result.ranker.harmful_selected_safe:.3f}, helpful "
        f"{result.ranker.harmless_selected_helpful:.3f}{plain}"
    )
    typer.echo(
        f"mixed lists: {result.ranker.n_lists_harmful} harmful, {result.ranker.n_lists_harmless} harmless; "
        f"ranker parameters: {result.n_parameters:,}"
    )
    for source in result.labels:  # which judge decided "safe", on which instructions
        typer.echo(f"labels: judge {source['judge']} on {source['harmful']} / {source['harmless']}")


@srr_app.command("generate")
def generate_command(
    ranker_dir: options.RankerDirArg,
    prompt: PromptArg,
    n: options.NOpt = 8,
    temperature: options.TemperatureOpt = 1.0,
    max_new_tokens: options.CandidateTokensOpt = 48,
    seed: OptionalSeedOpt = None,
    device: options.DeviceOpt = None,
    json_out: options.JsonOpt = False,
) -> None:
    """Sample N answers, rank them with the ranker, print the best (or the full ranking with --json)."""
    from lens_safety.srr.ranker import load_ranker, read_ranker_record
    from lens_safety.srr.select import select

    base = read_ranker_record(ranker_dir).get("base_model") or {}
    model = load_cli_model(str(base.get("spec", "")), device, None)
    ranker = load_ranker(ranker_dir, model)
    result = select(
        model, ranker, prompt, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
    )
    if json_out:
        print_json({**result.to_dict(), "n_parameters": ranker.n_parameters()})
        return
    typer.echo(result.chosen)
    typer.echo(
        f"[{len(result.ranking)} unique of {n}; ranker overhead {100 * result.overhead_fraction:.2f}% of generation; "
        f"{ranker.n_parameters():,} parameters]",
        err=True,
    )
