"""The typer options that more than one command module declares, each written once.

A command names an option by its alias (``device: options.DeviceOpt = None``); the alias carries
the flag and the help text, the command keeps its own default. Options used by one module only
are declared in that module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lens_safety.organism.sets import READ_HARMLESS

# the model and how it is loaded (every command that loads a model)
ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model spec: 'smollm2' (embedded default), 'smollm2-refusal', a local HF dir, a .gguf file or a hub id."
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="cpu, cuda, … (default: cuda when available), or auto / balanced / sequential: split the "
        "model across every GPU with accelerate (docs: how-to/gpu-model.md).",
    ),
]
DtypeOpt = Annotated[
    str | None, typer.Option("--dtype", help="float32 (default), bfloat16, float16 or auto.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="Generate with hf (the bridge's model, default) or vllm (needs vLLM: docs how-to/gpu-model.md; "
        "no interventions, no in-memory edits).",
    ),
]
NoTemplateOpt = Annotated[
    bool,
    typer.Option(
        "--no-chat-template",
        help="Format prompts as plain 'User: … Assistant:' (models without a chat template).",
    ),
]
SystemPromptOpt = Annotated[
    str | None, typer.Option("--system-prompt", help="System prompt used when formatting prompts.")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace what the command writes if it exists already.")
]

# prompt sets (every command that reads them: lens_safety.prompts.PromptSet.load)
PROMPT_SOURCES = (
    "a .txt/.jsonl/.csv file, builtin:harmful or builtin:harmless (each [:train|val|test]) or another "
    "builtin set, another author's set (harmbench, advbench, donotanswer, mtbench or medicationqa, each "
    "[:train|val|test]) or hf:<dataset>[:column]"
)
HarmfulOpt = Annotated[str, typer.Option("--harmful", help=f"Harmful prompts: {PROMPT_SOURCES}.")]
HarmlessOpt = Annotated[str, typer.Option("--harmless", help=f"Harmless prompts: {PROMPT_SOURCES}.")]

# the edit jobs (directions, probe, rosi, ablate, conditional-rosi) and the evaluations
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass or generate call.")]
TokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", help="Greedy new tokens per completion (what the judge reads).")
]
OutOpt = Annotated[Path, typer.Option("--out", help="Output directory of the edited Hugging Face model.")]
DirectionOpt = Annotated[
    Path | None,
    typer.Option("--direction", help="Saved direction directory (default: fit one on the train split)."),
]
LayerOpt = Annotated[str, typer.Option("--layer", help="Direction layer: auto (selection) or a block index.")]
NTrainOpt = Annotated[
    int, typer.Option("--n-train", help="Training prompts per class that fit the direction.")
]
NValOpt = Annotated[
    int, typer.Option("--n-val", help="Validation prompts per class (selection, calibration).")
]
NTestOpt = Annotated[
    int, typer.Option("--n-test", help="Test prompts per class for before/after refusal (0: skip).")
]
MaxOverRefusalOpt = Annotated[
    float,
    typer.Option(
        "--max-over-refusal",
        help="Largest accepted harmless refusal: a rise over the unedited model (--relative-over-refusal) "
        "or an absolute ceiling (--absolute-over-refusal).",
    ),
]
OverRefusalRelativeOpt = Annotated[
    bool,
    typer.Option(
        "--relative-over-refusal/--absolute-over-refusal",
        help="Read --max-over-refusal as a rise over the unedited model, or as an absolute ceiling.",
    ),
]
AlphasOpt = Annotated[
    str | None,
    typer.Option("--alphas", help="ROSI strengths swept on val by calibration (default 3,10,30,100)."),
]
MaxKlOpt = Annotated[float, typer.Option("--max-kl", help="Largest accepted harmless first-token KL.")]
TargetRefusalOpt = Annotated[float, typer.Option("--target-refusal", help="Harmful refusal to reach.")]
BlocksOpt = Annotated[
    str | None,
    typer.Option("--blocks", help="Blocks whose writers are edited: 'all' (default) or e.g. 15-29."),
]
TemplateBlindOpt = Annotated[
    bool,
    typer.Option(
        "--template-blind/--last-token-only",
        help="Fit conditional-ROSI read directions on the last prompt token only (default) or also "
        "orthogonal to the chat template's shared positions.",
    ),
]

# conditional ROSI's sweep on val (conditional-rosi, organism demo)
StartsOpt = Annotated[
    str | None,
    typer.Option(
        "--starts",
        help="First edited blocks swept (default: about 1/3, 1/2 and 2/3 of the depth; organism demo "
        "--quick: 1/2).",
    ),
]
InjectionsOpt = Annotated[
    str | None,
    typer.Option(
        "--injections",
        help="Injections swept, in gaps: the direction's harmful minus harmless mean projection "
        "(default 0.75,1,1.5,2; organism demo: its preset's grid).",
    ),
]
ShrinkageOpt = Annotated[
    float,
    typer.Option(
        "--shrinkage", min=0.0, help="Shrinkage-LDA ridge of the read direction (0: the mean difference)."
    ),
]
ReadHarmlessOpt = Annotated[
    str | None,
    typer.Option(
        "--read-harmless",
        help="Benign prompt sets (comma-separated; none for none) added to the harmless train prompts "
        "of the read directions, e.g. look-alikes of harmful requests (default none; organism demo: "
        f"{','.join(READ_HARMLESS)}).",
    ),
]
RefineOpt = Annotated[
    int | None,
    typer.Option(
        "--refine",
        min=0,
        help="Bisection rounds on the injection after the grid (conditional-rosi: with --injection auto, "
        "default 2; organism demo: its preset's).",
    ),
]

# judges (eval, judge-agreement)
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

# evaluation (eval, organism eval)
LimitOpt = Annotated[
    int | None, typer.Option("--limit", help="Use only the first N prompts of each set (default: all).")
]

# SRR (srr build-data, train, eval, generate, sweep, cv, relabel)
NOpt = Annotated[int, typer.Option("--n", help="Candidates sampled per instruction.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature.")]
CandidateTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Length cap of a candidate.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of sampling, splits and training.")]
JailbreakOpt = Annotated[
    float,
    typer.Option(
        "--jailbreak-fraction", help="Fraction of harmful instructions wrapped in a jailbreak template."
    ),
]
LabelJudgeOpt = Annotated[
    str,
    typer.Option(
        "--judge",
        help="Refusal judge that labels the candidates (refused = safe): substring, substring-strict, "
        "substring-broad, learned (the shipped probe on SmolLM2's states) or hf:<id>.",
    ),
]
InstructionLimitOpt = Annotated[
    int | None,
    typer.Option("--limit", help="Use N evenly spaced instructions of each set (keeps categories balanced)."),
]
RankerDirArg = Annotated[Path, typer.Argument(help="Directory written by `srr train`.")]
