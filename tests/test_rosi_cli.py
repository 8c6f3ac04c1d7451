"""``lens-safety rosi`` / ``amplify`` / ``ablate`` end to end (tiny model, and SmolLM2 once) and their bad inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli as run
from transformers import AutoModelForCausalLM

from lens_safety.cli.common import print_export_summary
from lens_safety.directions import Direction, DirectionMismatchWarning

FAST = ["--n-train", "16", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "4"]


def test_rosi_end_to_end_on_a_tiny_model(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "edited"
    argv = ["rosi", str(tiny_dirs["llama"]), "--out", str(out), "--layer", "1", "--alphas", "10,100"]
    code, stdout, err = run([*argv, *FAST, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    for key in ("alpha", "layer", "targets", "max_abs_logit_diff", "harmful_refusal", "harmless_refusal"):
        assert key in summary, key
    assert summary["layer"] == 1 and summary["targets"] == ["attn_out", "mlp_out", "mixer_out"]
    assert summary["alpha"] in (10.0, 100.0) and summary["max_abs_logit_diff"] <= 1e-4
    assert set(summary["harmful_refusal"]) == {"before", "after"}
    # every rate names its judge and prompt sets, in the JSON and in the text output
    assert summary["judge"] == "substring" and summary["n_test"] == [4, 4]
    assert summary["prompts"] == {"harmful": "harmful:test", "harmless": "harmless:test"}
    print_export_summary(summary, as_json=False)
    text = capsys.readouterr().out
    assert "judged by substring on harmful:test (n=4) / harmless:test (n=4)" in text
    assert [p["alpha"] for p in summary["calibration"]] == [10.0, 100.0]
    # a random tiny model never refuses: the choice must say so, not pretend
    assert summary["alpha_choice"] == "fallback" and "no alpha met" in summary["message"]
    assert "no alpha met" in err
    record = json.loads((out / "edit.json").read_text())
    assert record["alpha"] == summary["alpha"] and record["measurements"]["alpha_choice"] == "fallback"
    assert json.loads((out / "calibration.json").read_text())["parameter"] == "alpha"
    assert (out / "calibration.html").is_file() and "harmful_refusal" in (out / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))  # vanilla transformers loads it
    assert reloaded.config.num_hidden_layers == 3
    # the saved direction repairs another model with a fixed alpha (no sweep), then ablate uses it too
    code, stdout, err = run(
        [
            "rosi",
            str(tiny_dirs["llama"]),
            "--out",
            str(tmp_path / "fixed"),
            "--direction",
            str(out),
            "--alpha",
            "20",
            "--n-test",
            "0",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    fixed = json.loads(stdout)
    assert fixed["alpha"] == 20.0 and fixed["alpha_choice"] == "fixed" and "harmful_refusal" not in fixed
    code, stdout, err = run(
        [
            "ablate",
            str(tiny_dirs["llama"]),
            "--out",
            str(tmp_path / "ablated"),
            "--direction",
            str(out),
            "--n-test",
            "0",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    ablated = json.loads(stdout)
    assert ablated["method"] == "orthogonalize" and "embed" in ablated["targets"]
    assert json.loads((tmp_path / "ablated" / "config.json").read_text())["tie_word_embeddings"] is False
    # getting started's chain: ROSI on the ablated EXPORT with the original's direction; the export's
    # lineage names the direction's model, so no other-checkpoint warning, and the chain is recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error", DirectionMismatchWarning)
        code, stdout, err = run(
            [
                *["rosi", str(tmp_path / "ablated"), "--out", str(tmp_path / "safer")],
                *["--direction", str(out), "--alpha", "5", "--n-test", "0", "--json"],
            ],
            capsys,
        )
    assert code == 0, err
    lineage = json.loads((tmp_path / "safer" / "edit.json").read_text())
    assert lineage["method"] == "rosi"
    assert Direction.load(out).metadata["model"]["weights_sha256"] in lineage["ancestors_weights_sha256"]


def test_amplify_writes_i_plus_alpha_s_s_transpose_times_every_block_writer(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lens-safety amplify --alpha A`` exports ``W' = (I + A s s^T) W`` on every attention / MLP
    writer (float64 recomputation from the source weights) and leaves every other tensor bitwise
    unchanged; its alpha range and default sweep are amplify's registry entry's, not ROSI's."""
    from safetensors.torch import load_file

    source = tiny_dirs["llama"]
    width = json.loads((source / "config.json").read_text())["hidden_size"]
    saved = tmp_path / "direction"
    Direction(torch.randn(3, width, generator=torch.Generator().manual_seed(0)), layer=1, position=-1,
              method="mean-diff").save(saved)  # fmt: skip
    out = tmp_path / "amplified"
    argv = ["amplify", str(source), "--direction", str(saved), "--n-test", "0"]
    code, stdout, err = run([*argv, "--alpha", "-0.5", "--out", str(out), "--json"], capsys)
    assert code == 0, err  # -0.5 is in amplify's range (>= -1), though not in ROSI's
    summary = json.loads(stdout)
    assert summary["method"] == "amplify" and summary["alpha"] == -0.5 and summary["alpha_choice"] == "fixed"
    s = Direction.load(saved).directions[1].double()
    s = s / s.norm()
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    writers = {k for k in before if k.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))}
    assert len(writers) == 6 and before.keys() == after.keys()
    for name, weight in before.items():
        if name in writers:
            w = weight.double()
            expected = (w - 0.5 * torch.outer(s, s @ w)).to(weight.dtype)
            torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)
            assert not torch.equal(after[name], weight), name
        else:
            assert torch.equal(after[name], weight), name
    # below -1 flips the direction: one line naming amplify's bound, nothing written
    message = _bad([*argv, "--alpha", "-2", "--out", str(tmp_path / "flipped")], capsys)
    assert "--alpha must be a finite number >= -1" in message and "amplify" in message
    assert not (tmp_path / "flipped").exists()
    message = _bad([*argv, "--alphas", "-0.5,0.3", "--out", str(tmp_path / "weaker")], capsys)
    assert "--alphas must be positive numbers" in message and "0.03,0.1,0.3,1" in message
    # --alpha auto sweeps amplify's own default grid (ROSI's is 3..100)
    code, stdout, err = run(
        [*argv, "--n-val", "4", "--max-new-tokens", "4", "--out", str(tmp_path / "auto"), "--json"], capsys
    )
    assert code == 0, err
    assert [p["alpha"] for p in json.loads(stdout)["calibration"]] == [0.03, 0.1, 0.3, 1.0]
    # after abliteration with the same direction, amplify is inert: nothing is left along s
    code, _, err = run(["ablate", str(source), "--direction", str(saved), "--n-test", "0",
                        "--out", str(tmp_path / "ablated")], capsys)  # fmt: skip
    assert code == 0, err
    ablated_argv = [*argv[:1], str(tmp_path / "ablated"), *argv[2:]]
    code, _, err = run([*ablated_argv, "--alpha", "1", "--out", str(tmp_path / "inert")], capsys)
    assert code == 0, err
    ablated, inert = (
        load_file(tmp_path / "ablated" / "model.safetensors"),
        load_file(tmp_path / "inert" / "model.safetensors"),
    )
    for name in writers:
        assert (inert[name] - ablated[name]).abs().max() <= 1e-6 * ablated[name].abs().max(), name


def _bad(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, stdout, err = run(argv, capsys)
    assert code == 2, (stdout, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_inputs_fail_in_one_line_and_write_nothing(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_dirs["llama"])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "already exists" in _bad(["rosi", model, "--out", str(taken)], capsys)
    assert (taken / "keep.txt").read_text() == "mine"
    assert "finite" in _bad(["rosi", model, "--out", str(tmp_path / "a"), "--alpha", "nan"], capsys)
    assert "removes safety" in _bad(["rosi", model, "--out", str(tmp_path / "a"), "--alpha", "-3"], capsys)
    assert "--alphas" in _bad(["rosi", model, "--out", str(tmp_path / "a"), "--alphas", "0,1"], capsys)
    assert "--layer" in _bad(["rosi", model, "--out", str(tmp_path / "a"), "--layer", "x"], capsys)
    narrow = tmp_path / "narrow"
    Direction(torch.randn(3, 32), layer=1, position=-1, method="mean-diff").save(narrow)
    message = _bad(
        [
            "rosi",
            model,
            "--out",
            str(tmp_path / "a"),
            "--direction",
            str(narrow),
            "--alpha",
            "5",
            "--n-test",
            "0",
        ],
        capsys,
    )
    assert "width 32" in message
    message = _bad(
        [
            "rosi",
            model,
            "--out",
            str(tiny_dirs["llama"] / "inside"),
            "--direction",
            str(narrow),
            "--alpha",
            "5",
            "--n-test",
            "0",
        ],
        capsys,
    )
    assert "overlaps the input" in message
    assert not (tiny_dirs["llama"] / "inside").exists()
    message = _bad(
        ["ablate", model, "--out", str(tmp_path / "a"), "--blocks", "7-9", "--n-test", "0"], capsys
    )
    assert "--blocks" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow", "taken"]  # nothing else written


def test_rosi_on_smollm2_with_a_tiny_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "smol"
    code, stdout, err = run(
        [
            "rosi",
            "--out",
            str(out),
            "--layer",
            "20",
            "--alphas",
            "30",
            "--max-over-refusal",  # 4 validation prompts: one over-refusal is 0.25; the
            "1",  # collateral bounds are not what this end-to-end run checks
            "--max-kl",
            "100",
            "--n-train",
            "8",
            "--n-val",
            "4",
            "--n-test",
            "4",
            "--max-new-tokens",
            "8",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["layer"] == 20 and summary["alpha"] == 30.0 and summary["max_abs_logit_diff"] <= 1e-4
    assert summary["edited_parameters"] == 60  # o_proj and down_proj of 30 blocks
    point = summary["calibration"][0]
    assert point["harmless_kl"] > 0 and 0 <= point["harmful_refusal"] <= 1
    assert (out / "model.safetensors").is_file() and (out / "direction.safetensors").is_file()


def test_parse_blocks_checks_the_range_only_when_the_depth_is_known() -> None:
    from lens_safety.cli.common import parse_blocks
    from lens_safety.errors import LensSafetyError

    assert parse_blocks("all", 4) is None and parse_blocks(None, None) is None
    assert parse_blocks("1-3", 4) == [1, 2, 3]
    assert parse_blocks("5-14", None) == list(range(5, 15))  # checked later against the model
    with pytest.raises(LensSafetyError, match=r"outside blocks 0\.\.3"):
        parse_blocks("2,7", 4)
    with pytest.raises(LensSafetyError, match="must be 'all'"):
        parse_blocks("3-x", None)
