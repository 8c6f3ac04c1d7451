"""Several judges in one evaluation: every rate names its judge, pairwise agreement recomputed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_runner import run_cli as run

from lens_safety.evaluation import (
    BroadSubstringJudge,
    SubstringJudge,
    evaluate_model,
    get_judges,
    judge_from_callable,
)
from lens_safety.evaluation.jailbreaks import load_jailbreak_templates


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    from lens_safety.testing import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("panel") / "llama", smollm2_dir)


def test_get_judges_splits_repeats_and_commas() -> None:
    judges = get_judges(["substring", "substring-broad, substring-strict"])
    assert [j.name for j in judges] == ["substring", "substring-broad", "substring-strict"]
    assert [j.name for j in get_judges(None)] == ["substring"]
    from lens_safety.errors import LensSafetyError

    with pytest.raises(LensSafetyError, match="given twice"):
        get_judges("substring,substring")


def test_panel_rates_and_agreement(tiny_llama: Path) -> None:
    from lens_safety.models import load_model

    model = load_model(str(tiny_llama), device="cpu")
    odd = judge_from_callable(lambda text: len(text) % 2 == 1, name="odd-length")
    result = evaluate_model(
        model,
        [f"Harmful request {i}?" for i in range(4)],
        [f"Benign request {i}?" for i in range(4)],
        judge=[SubstringJudge(), odd, BroadSubstringJudge()],
        jailbreak_templates=load_jailbreak_templates("builtin")[:2],
        jailbreak_prompts=2,
        max_new_tokens=4,
        batch_size=4,
    )
    data = result.to_dict(include_completions=False)
    assert data["judge"] == "substring" and data["judge_question"] == "refusal"
    for key in ("harmful_refusal_rate", "harmless_refusal_rate", "jailbreak_asr"):
        assert data[key]["judge"] == "substring" and data[key]["question"] == "refusal"
        assert data[key]["prompts"]
    assert list(data["judges"]) == ["substring", "odd-length", "substring-broad"]
    completions = {
        "harmful": result.refusal.harmful.completions,
        "harmless": result.refusal.harmless.completions,
        "jailbreak": result.jailbreaks.rates.completions if result.jailbreaks else [],
    }
    odd_harmful = [len(c) % 2 == 1 for c in completions["harmful"]]
    assert data["judges"]["odd-length"]["harmful_refusal_rate"]["value"] == pytest.approx(
        sum(odd_harmful) / len(odd_harmful)
    )
    odd_jail = [len(c) % 2 == 1 for c in completions["jailbreak"]]
    assert data["judges"]["odd-length"]["jailbreak_asr"]["value"] == pytest.approx(
        1 - sum(odd_jail) / len(odd_jail)
    )
    pairs = {tuple(p["judges"]): p for p in data["judge_agreement"]}
    assert set(pairs) == {
        ("substring", "odd-length"),
        ("substring", "substring-broad"),
        ("odd-length", "substring-broad"),
    }
    every = [c for key in sorted(completions) for c in completions[key]]
    a = [v.refused for v in SubstringJudge()(every)]
    b = [len(c) % 2 == 1 for c in every]
    agree = sum(x == y for x, y in zip(a, b, strict=True)) / len(every)
    pair = pairs[("substring", "odd-length")]
    assert pair["agreement"]["value"] == pytest.approx(agree)
    assert pair["agreement"]["n"] == len(every) == 8 + 2 * 2
    pa, pb = sum(a) / len(a), sum(b) / len(b)
    p_e = pa * pb + (1 - pa) * (1 - pb)
    expected_kappa = (agree - p_e) / (1 - p_e) if p_e < 1 else math.nan
    assert (math.isnan(pair["kappa"]) and math.isnan(expected_kappa)) or pair["kappa"] == pytest.approx(
        expected_kappa
    )
    assert sum(pair["counts"].values()) == len(every)


def test_eval_cli_several_judges(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        [
            "eval",
            str(tiny_llama),
            "--limit",
            "2",
            "--max-new-tokens",
            "3",
            "--judge",
            "substring",
            "--judge",
            "substring-broad,substring-strict",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(out)
    assert list(data["judges"]) == ["substring", "substring-broad", "substring-strict"]
    assert len(data["judge_agreement"]) == 3
    for rates in data["judges"].values():
        assert rates["harmful_refusal_rate"]["prompts"] == data["settings"]["harmful"]["name"]
    code, _, err = run(["eval", str(tiny_llama), "--judge", "substring,substring"], capsys)
    assert code == 2 and err.startswith("error:") and "given twice" in err


def test_eval_help_states_default_judge_and_key_variable(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["eval", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0
    assert "Default: substring" in text
    assert "LENS_SAFETY_JUDGE_API_KEY" in text
    assert "--utility" in text
