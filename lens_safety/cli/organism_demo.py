"""``lens-safety organism demo``: organism -> refusal direction -> abliteration -> ROSI and
conditional-ROSI repair, measured on held-out prompts (:func:`lens_safety.organism.demonstration.demonstrate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lens_safety.cli import options, organism_app
from lens_safety.cli.common import (
    given,
    parse_alphas,
    parse_blocks,
    parse_heldout_pairs,
    parse_injections,
    parse_prompt_sets,
    parse_starts,
    print_json,
    quiet_libraries,
)
from lens_safety.errors import LensSafetyError
from lens_safety.organism.sets import HELDOUT_PAIRS

DemoLayerOpt = Annotated[
    int | None,
    typer.Option(
        "--layer", help="Fix the refusal direction's block instead of selecting it over every layer."
    ),
]
QuickOpt = Annotated[
    bool,
    typer.Option(
        "--quick",
        help="The first run (minutes on a CPU): 16 + 16 test prompts, 12 tokens, small sweeps, "
        "no base stages; the options below still override it.",
    ),
]
OrganismOpt = Annotated[
    str | None,
    typer.Option(
        "--organism", help="The model to abliterate and repair (default: the shipped smollm2-refusal)."
    ),
]
DemoOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", help="Keep the verified exports as OUT/abliterated, OUT/rosi and OUT/conditional-rosi."
    ),
]
MaxNewTokensOpt = Annotated[
    int | None, typer.Option("--max-new-tokens", help="Greedy tokens generated per prompt (default 48).")
]
TargetsOpt = Annotated[
    str | None,
    typer.Option(
        "--targets",
        help="Writer kinds the repair edits, comma-separated (attn_out, mlp_out; default: both).",
    ),
]
ConditionalOpt = Annotated[
    bool,
    typer.Option(
        "--conditional/--no-conditional",
        help="Also repair with conditional ROSI (refusal injected along a harmfulness read direction).",
    ),
]
HeldoutOpt = Annotated[
    str | None,
    typer.Option(
        "--heldout",
        help="Extra held-out pairs 'HARMFUL,HARMLESS' (';'-separated; none for none) on which the "
        "organism, abliterated and repaired stages are also scored "
        f"(default {';'.join(','.join(pair) for pair in HELDOUT_PAIRS)}).",
    ),
]


def _demo_overrides(
    alphas: str | None,
    blocks: str | None,
    targets: str | None,
    starts: str | None,
    injections: str | None,
    read_harmless: str | None,
    heldout: str | None,
    limit: int | None,
) -> dict[str, Any]:
    """Parse the grid options of ``organism demo`` into :class:`DemoSettings` fields."""
    if limit is not None and limit < 2:
        raise LensSafetyError(f"--limit {limit} leaves too few prompts", "use --limit 2 or more")
    kinds = None if targets is None else tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [k for k in kinds or () if k not in ("attn_out", "mlp_out")]
    if unknown or kinds == ():
        raise LensSafetyError(
            f"--targets {targets} names no residual writer kind", "use attn_out, mlp_out or both"
        )
    chosen_blocks = parse_blocks(blocks, n_layers=None)  # demonstrate() checks the range
    grid = parse_alphas(alphas)
    return given(
        limit=limit,
        alphas=None if grid is None else tuple(grid),
        blocks=None if chosen_blocks is None else tuple(chosen_blocks),
        targets=kinds,
        starts=parse_starts(starts),
        relative_injections=parse_injections(injections),
        read_harmless=None if read_harmless is None else tuple(parse_prompt_sets(read_harmless)),
        heldout=None if heldout is None else tuple(parse_heldout_pairs(heldout)),
    )


@organism_app.command("demo")
def demo_cmd(
    quick: QuickOpt = False,
    organism: OrganismOpt = None,
    out: DemoOutOpt = None,
    overwrite: options.OverwriteOpt = False,
    limit: options.LimitOpt = None,
    layer: DemoLayerOpt = None,
    alphas: options.AlphasOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    blocks: options.BlocksOpt = None,
    targets: TargetsOpt = None,
    conditional: ConditionalOpt = True,
    starts: options.StartsOpt = None,
    injections: options.InjectionsOpt = None,
    shrinkage: options.ShrinkageOpt = 1.0,
    template: options.TemplateBlindOpt = False,
    read_harmless: options.ReadHarmlessOpt = None,
    refine: options.RefineOpt = None,
    heldout: HeldoutOpt = None,
    json: options.JsonOpt = False,
) -> None:
    """Organism -> refusal direction -> abliteration -> ROSI / conditional-ROSI repair -> the base, held out.

    Options left out keep the preset's value (the full study, or --quick). Conditional ROSI's
    --injections are in gaps, as in conditional-rosi. Every refusal rate is judged by the
    substring judge.
    """
    overrides = _demo_overrides(alphas, blocks, targets, starts, injections, read_harmless, heldout, limit)
    overrides.update(
        given(organism_spec=organism, max_new_tokens=max_new_tokens, refine=refine, direction_layer=layer),
        conditional=conditional,
        template=template,
        shrinkage=shrinkage or None,
    )
    quiet_libraries()
    from lens_safety.organism.demonstration import DemoSettings, demonstrate

    settings = DemoSettings.quick() if quick else DemoSettings()
    result = demonstrate(settings, out=out, overwrite=overwrite, progress=not json, **overrides)
    if json:
        print_json(result.to_dict())
        return
    if not quick:
        for stage in result.stages:
            typer.echo(stage.line())
    typer.echo(result.summary())
