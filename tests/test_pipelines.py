"""The jobs as library functions: the one rule choosing a calibrated point, and run_edit /
run_conditional called directly on a tiny model (their exports are the CLI's, byte for byte)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
from cli_runner import run_cli

from lens_safety.calibration import CalibrationBounds, CalibrationPoint, CalibrationResult
from lens_safety.errors import LensSafetyError, LensSafetyWarning

FAST_CLI = ["--n-train", "16", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "4"]
FAST = {"n_train": 16, "n_val": 4, "n_test": 4, "max_new_tokens": 4}


def _point(
    alpha: float, harmful: float, harmless: float, kl: float, bounds: CalibrationBounds
) -> CalibrationPoint:
    return CalibrationPoint(
        f"alpha={alpha:g}",
        alpha,
        1,
        None,
        harmful,
        harmless,
        kl,
        meets_target=harmful >= bounds.target_refusal,
        within_over_refusal=harmless <= bounds.max_over_refusal,
        within_kl=kl <= bounds.max_kl,
    )


def _result(
    points: list[CalibrationPoint], chosen: CalibrationPoint | None, fallback: CalibrationPoint | None
) -> CalibrationResult:
    bounds = CalibrationBounds(0.9, 0.1, 0.1, over_refusal_relative=False)
    baseline = _point(0.0, 0.0, 0.0, 0.0, bounds)
    return CalibrationResult(
        "alpha", "rosi", bounds, baseline, points, chosen, "no alpha met the bounds", fallback
    )


def test_one_rule_chooses_the_passing_point_else_a_recorded_fallback_else_refuses() -> None:
    bounds = CalibrationBounds(0.9, 0.1, 0.1, over_refusal_relative=False)
    weak, strong, broken = (
        _point(10.0, 0.3, 0.0, 0.01, bounds),
        _point(30.0, 0.95, 0.05, 0.05, bounds),
        _point(100.0, 1.0, 0.6, 0.9, bounds),
    )
    passing = _result([weak, strong, broken], strong, weak)
    choice = passing.choose()
    assert (choice.point, choice.rule, choice.fallback) == (strong, "chosen", False)
    assert passing.selected() == (strong, "chosen")

    none_passing = _result([weak, broken], None, weak)
    choice = none_passing.choose()
    assert choice.point is weak and choice.rule == "fallback" and choice.fallback
    assert choice.message.startswith("no alpha met the bounds; exported alpha=10, the point with the highest")
    assert choice.to_dict()["point"]["alpha"] == 10.0

    # every point breaks a collateral bound: the old selected() exported the first point swept
    # anyway ("first point"); the one rule refuses, in one line, and names what to change
    hopeless = _result([broken, _point(300.0, 1.0, 0.9, 2.0, bounds)], None, None)
    with pytest.raises(LensSafetyError, match="every alpha broke the over-refusal or KL bound"):
        hopeless.choose()
    with pytest.raises(LensSafetyError, match="loosen the over-refusal / KL bounds"):
        hopeless.selected()


def _sha(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def test_run_edit_as_a_library_function_exports_what_the_cli_exports(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lens_safety import EditSettings, run_edit

    model = tiny_dirs["llama"]
    settings = EditSettings(layer=1, alphas=(10.0, 100.0), **FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LensSafetyWarning)
        result = run_edit(model, tmp_path / "lib", settings)
    # a random tiny model never refuses: the fallback is taken, recorded and warned about
    assert result.alpha_choice == "fallback" and result.choice is not None and result.choice.fallback
    assert any("no alpha met" in str(w.message) for w in caught)
    assert result.spec.method == "rosi" and result.spec.alpha == result.choice.point.alpha
    assert result.direction.layer == 1 and result.export.max_abs_logit_diff <= result.export.bound <= 1e-4
    assert result.calibration is not None and [p.alpha for p in result.calibration.points] == [10.0, 100.0]
    assert set(result.measurements["harmful_refusal"]) == {"before", "after"}
    summary = result.to_dict()
    assert summary["alpha"] == result.spec.alpha and summary["seconds"] == result.seconds > 0
    record = json.loads((tmp_path / "lib" / "edit.json").read_text())
    assert record["measurements"]["alpha_choice"] == "fallback" and record["alpha"] == summary["alpha"]
    assert record["verification"]["max_abs_logit_diff"] == result.export.max_abs_logit_diff

    argv = ["rosi", str(model), "--out", str(tmp_path / "cli"), "--layer", "1", "--alphas", "10,100"]
    code, stdout, err = run_cli([*argv, *FAST_CLI, "--json"], capsys)
    assert code == 0, err
    cli = json.loads(stdout)
    assert _sha(tmp_path / "cli") == _sha(tmp_path / "lib") and len(_sha(tmp_path / "lib")) == 2
    for key in ("alpha", "layer", "targets", "alpha_choice", "message", "calibration", "harmful_refusal"):
        assert cli[key] == summary[key], key

    with pytest.raises(LensSafetyError, match="unknown edit method"):
        EditSettings(method="sharpen")  # type: ignore[arg-type]
    with pytest.raises(LensSafetyError, match=r"outside the model's blocks 0\.\.2"):
        run_edit(model, tmp_path / "never", EditSettings(layer=1, alpha=5.0, blocks=(7,), **FAST))
    assert not (tmp_path / "never").exists()


def test_run_edit_ablates_and_amplifies_with_a_loaded_model(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from lens_safety import EditSettings, load_model, run_edit

    model = load_model(tiny_dirs["llama"], device="cpu")
    ablated = run_edit(model, tmp_path / "ablated", EditSettings(method="orthogonalize", layer=1, **FAST))
    assert ablated.alpha_choice is None and "embed" in ablated.spec.targets
    amplified = run_edit(
        model,
        tmp_path / "amplified",
        EditSettings(method="amplify", direction=tmp_path / "ablated", alpha=0.5, n_test=0),
    )
    assert amplified.alpha_choice == "fixed" and amplified.spec.alpha == 0.5 and amplified.measurements == {}
    assert amplified.export.max_abs_logit_diff <= amplified.export.bound


def test_run_conditional_as_a_library_function(tiny_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    from lens_safety import ConditionalSettings, run_conditional

    settings = ConditionalSettings(layer=1, injections=(0.5, 1.0), **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LensSafetyWarning)
        result = run_conditional(tiny_dirs["llama"], tmp_path / "lib", settings)
    assert result.choice.rule == "fallback" and result.picked.read.start == 1
    assert result.gap_source == "direction" and result.export.max_abs_logit_diff <= 1e-4
    summary = result.to_dict()
    assert summary["injection_gaps"] in (0.5, 1.0) and summary["choice"] == "fallback"
    argv = ["conditional-rosi", str(tiny_dirs["llama"]), "--out", str(tmp_path / "cli"), "--layer", "1"]
    code, stdout, err = run_cli([*argv, "--injections", "0.5,1", *FAST_CLI, "--json"], capsys)
    assert code == 0, err
    assert _sha(tmp_path / "cli") == _sha(tmp_path / "lib") and len(_sha(tmp_path / "lib")) == 3
    assert json.loads(stdout)["message"] == summary["message"]


@pytest.mark.parametrize("job", ["edit", "conditional"])
def test_a_misspelt_job_option_is_refused_before_any_work(job: str, tmp_path: Path) -> None:
    """The jobs' keyword options (overwrite, device, dtype, progress) are checked by name: a
    misspelt one stops the job before the model or the prompts are touched."""
    from lens_safety import ConditionalSettings, EditSettings, run_conditional, run_edit

    out = tmp_path / "out"
    with pytest.raises(TypeError, match="overwite"):
        if job == "edit":
            run_edit("no-such-model", out, EditSettings(harmful="no-such-file.txt"), overwite=True)
        else:
            run_conditional(
                "no-such-model", out, ConditionalSettings(harmful="no-such-file.txt"), overwite=True
            )
    assert list(tmp_path.iterdir()) == []
