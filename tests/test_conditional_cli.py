"""``lens-safety conditional-rosi`` end to end on a tiny model, its injection unit, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli as run
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lens_safety.activations import collect_activations
from lens_safety.calibration import injection_unit, projection_gap
from lens_safety.cli.edit import parse_start
from lens_safety.directions import Direction
from lens_safety.edits import applied_edit, orthogonalize
from lens_safety.errors import LensSafetyError
from lens_safety.models import load_model
from lens_safety.pipelines import ConditionalSettings, default_starts, resolve_blocks
from lens_safety.prompts import PromptSet

FAST = ["--n-train", "16", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "4"]


def test_conditional_rosi_end_to_end_on_a_tiny_model(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "edited"
    argv = ["conditional-rosi", str(tiny_dirs["llama"]), "--out", str(out), "--layer", "1"]
    code, stdout, err = run([*argv, "--injections", "0.5,1", *FAST, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["method"] == "conditional_rosi" and summary["layer"] == 1
    assert (summary["start"], summary["end"]) == (1, 2) and summary["blocks"] == [1]
    assert summary["injection_gaps"] in (0.5, 1.0) and summary["gap"] > 0
    assert summary["gap_source"] == "direction"  # recorded by the fitted direction
    assert summary["max_abs_logit_diff"] <= 1e-4 and set(summary["harmful_refusal"]) == {"before", "after"}
    # a random tiny model never refuses: the choice says so
    assert summary["choice"] == "fallback" and "warning" in err
    assert summary["template_positions"] == 0  # default read direction: the last prompt token only
    calibration = json.loads((out / "calibration.json").read_text())
    assert (
        calibration["settings"]["refine"] == 2 and calibration["settings"]["template"] is False
    )  # default rounds; none needed (never reaches the target)
    assert [p["label"] for p in calibration["points"]] == [
        f"blocks 1..1, injection {k * summary['gap']:g}" for k in (0.5, 1.0)
    ]
    record = json.loads((out / "edit.json").read_text())
    read = load_file(str(out / "read_direction.safetensors"))["read"]
    assert record["method"] == "conditional_rosi" and abs(float(read.norm()) - 1.0) < 1e-9
    assert record["measurements"]["start"] == 1 and record["alpha"] == pytest.approx(summary["alpha"])
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_hidden_layers == 3


def test_options_left_out_take_the_library_defaults(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --injections, --refine and --read-harmless the job runs ``ConditionalSettings``'
    own defaults: its injection grid (in gaps), its bisection rounds and no extra read prompts."""
    out = tmp_path / "defaults"
    argv = ["conditional-rosi", str(tiny_dirs["llama"]), "--out", str(out), "--layer", "1", "--start", "1"]
    code, stdout, err = run([*argv, *FAST, "--json"], capsys)
    assert code == 0, err
    gap = json.loads(stdout)["gap"]
    calibration = json.loads((out / "calibration.json").read_text())
    library = ConditionalSettings()
    assert calibration["settings"]["refine"] == library.refine
    assert calibration["settings"]["read_harmless"] == list(library.read_harmless)
    grid = [p["label"] for p in calibration["points"]][: len(library.injections)]
    assert grid == [f"blocks 1..1, injection {k * gap:g}" for k in library.injections]


def test_fixed_start_and_injection_use_one_point(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["conditional-rosi", str(tiny_dirs["qwen2"]), "--out", str(tmp_path / "q"), "--layer", "1"]
    blind = ["--template-blind", "--read-harmless", "builtin:harmless_extra_2"]
    code, stdout, err = run(
        [*argv, "--start", "0", "--end", "3", "--injection", "2", *blind, *FAST, "--json"], capsys
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert (summary["start"], summary["end"], summary["blocks"]) == (0, 3, [0, 1, 2])
    model = load_model(tiny_dirs["qwen2"], device="cpu")
    train = PromptSet.load("builtin:harmful:train").head(16)
    prefix = [model.chat.token_ids(model.chat.format(p)) for p in train]
    assert 0 < summary["template_positions"] < min(map(len, prefix))
    assert summary["injection_gaps"] == pytest.approx(2.0)
    calibration = json.loads((tmp_path / "q" / "calibration.json").read_text())
    assert len(calibration["points"]) == 1 and calibration["settings"]["refine"] == 0
    assert calibration["settings"]["read_harmless"] == ["builtin:harmless_extra_2"]
    assert summary["read_prompts"] == {"harmful": 16, "harmless": 16 + 89}  # --n-train plus the extra set


def test_projection_gap_of_a_mean_difference_is_its_norm(tiny_dirs: dict[str, Path]) -> None:
    """On the prompts that fitted it, a mean-difference direction's gap equals |mu_h - mu_b|; an
    abliterated model has no gap left to measure, so the unit then comes from the direction."""
    model = load_model(tiny_dirs["llama"], device="cpu")
    harmful, harmless = (
        PromptSet.load("builtin:harmful").head(12),
        PromptSet.load("builtin:harmless").head(12),
    )
    acts = [collect_activations(model, p, layers=[2]).tensor[:, 0, 0].double() for p in (harmful, harmless)]
    candidates = torch.zeros(model.n_layers, model.d_model)
    candidates[2] = (acts[0].mean(0) - acts[1].mean(0)).float()
    direction = Direction(candidates, 2, -1, "mean-diff")
    gap = projection_gap(model, direction, harmful, harmless)
    assert gap == pytest.approx(float(direction.raw.double().norm()), rel=1e-4)
    assert injection_unit(model, direction, harmful, harmless) == (pytest.approx(gap), "model")
    flipped = Direction(-direction.directions, direction.layer, direction.position, direction.method)
    with pytest.raises(LensSafetyError, match="do not sit above"):
        projection_gap(model, flipped, harmful, harmless)
    recorded = Direction(
        direction.directions,
        2,
        -1,
        "mean-diff",
        {"harmful_projection": [0.0, 0.0, gap + 1.0], "harmless_projection": [0.0, 0.0, 1.0]},
    )
    with applied_edit(model, orthogonalize(direction)):
        with pytest.raises(LensSafetyError, match="abliterated models have no component"):
            projection_gap(model, direction, harmful, harmless)
        assert injection_unit(model, recorded, harmful, harmless) == (pytest.approx(gap), "direction")


def test_repairing_an_ablated_child_uses_the_parents_gap(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent, child, repaired = tmp_path / "parent", tmp_path / "child", tmp_path / "repaired"
    fast = [*FAST, "--n-test", "0", "--json"]
    code, _, err = run(
        ["ablate", str(tiny_dirs["llama"]), "--out", str(child), "--layer", "1", *fast], capsys
    )
    assert code == 0, err
    code, _, err = run(
        ["ablate", str(tiny_dirs["llama"]), "--out", str(parent), "--layer", "1", *fast], capsys
    )
    assert code == 0, err
    recorded = Direction.load(parent)
    expected = recorded.metadata["harmful_projection"][1] - recorded.metadata["harmless_projection"][1]
    argv = ["conditional-rosi", str(child), "--out", str(repaired), "--direction", str(parent)]
    code, stdout, err = run([*argv, "--start", "1", "--injection", "1", *fast], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["gap_source"] == "direction" and summary["gap"] == pytest.approx(expected)
    assert summary["gap"] > 1e-3 and summary["alpha"] > 1e-6


def test_block_choices() -> None:
    assert default_starts(30) == [10, 15, 20] and default_starts(3) == [1]
    assert parse_start("auto", None) is None and resolve_blocks(None, None, 30) == ([10, 15, 20], 29)
    assert parse_start("auto", "4,2,4") == (2, 4) and resolve_blocks((2, 4), 30, 30) == ([2, 4], 30)
    assert parse_start("7", None) == (7,) and resolve_blocks((7,), None, 30) == ([7], 29)
    with pytest.raises(LensSafetyError, match="not 0 <= start < end"):
        resolve_blocks(parse_start("29", None), None, 30)
    with pytest.raises(LensSafetyError, match="one block"):
        parse_start("3,4", None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--start", "7"], "not 0 <= start < end"),
        (["--starts", "a,b"], "--starts must be comma-separated non-negative block indices"),
        (["--injections", "0,1"], "--injections must be comma-separated positive numbers"),
        (["--injection", "1,2"], "--injection must be 'auto' or one number"),
        (["--injection", "nan"], "--injection must be comma-separated positive numbers"),
        (["--end", "9"], "not 0 <= start < end"),
        (["--read-harmless", "builtin:nope"], "builtin:nope"),
    ],
)
def test_bad_input_is_one_line(
    tiny_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "never"
    code, _, err = run(
        ["conditional-rosi", str(tiny_dirs["llama"]), "--out", str(out), *extra, *FAST], capsys
    )
    assert code == 2 and message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0 and not out.exists()


def test_existing_output_is_kept(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["conditional-rosi", str(tiny_dirs["llama"]), "--out", str(out), *FAST], capsys)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
