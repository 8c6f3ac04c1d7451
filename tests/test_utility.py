"""Utility benchmarks through lm-evaluation-harness, offline, on a 12-question task shipped in tests/data.

lm-eval's accuracy and per-choice log-likelihoods are checked against an independent computation
of the same log-likelihood choice with vanilla transformers on the tiny model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli as run

from lens_safety.errors import LensSafetyError

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval_tiny"
TASK = "lens_safety_tiny_mc"


@pytest.fixture(autouse=True)
def _offline_in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the task's data file path is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    from lens_safety.testing import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("utility") / "llama", smollm2_dir, seed=1)


def _vanilla_logliks(model: object, tokenizer: object) -> list[list[float]]:
    """sum_t log p(choice token t | "Question: q\\nAnswer:", earlier choice tokens), float64."""
    import torch

    rows = [json.loads(line) for line in (TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    out = []
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        scores = []
        for choice in row["choices"]:
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            assert whole[: len(ctx)] == ctx
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].double()  # type: ignore[operator]
            logp = logits.log_softmax(-1)
            scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        out.append(scores)
    return out


def _accuracy(logliks: list[list[float]]) -> float:
    rows = [json.loads(line) for line in (TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    hits = [
        max(range(len(s)), key=s.__getitem__) == row["answer"] for s, row in zip(logliks, rows, strict=True)
    ]
    return sum(hits) / len(hits)


def test_tiny_task_accuracy_matches_vanilla_transformers(tiny_llama: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lens_safety.evaluation.utility import evaluate_utility

    result = evaluate_utility(
        str(tiny_llama), TASK, include_path=TASK_DIR, log_samples=True, batch_size=4, device="cpu"
    )
    task = result[TASK]
    assert task.n == 12 and set(task.metrics) == {"acc"}
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    expected = _vanilla_logliks(model, AutoTokenizer.from_pretrained(str(tiny_llama)))
    got = [s["loglikelihoods"] for s in sorted(task.samples, key=lambda s: s["doc_id"])]
    for mine, theirs in zip(expected, got, strict=True):
        assert theirs == pytest.approx(mine, rel=1e-4, abs=1e-4)
    acc = task.metrics["acc"]
    assert acc["value"] == pytest.approx(_accuracy(expected))
    p = acc["value"]
    assert acc["stderr"] == pytest.approx((p * (1 - p) / (12 - 1)) ** 0.5)  # sample standard error of a mean
    limited = evaluate_utility(
        str(tiny_llama), TASK, include_path=TASK_DIR, limit=5, batch_size=4, device="cpu"
    )
    assert limited[TASK].n == 5 and limited[TASK].limit == 5


def test_in_memory_edit_is_what_lm_eval_scores(tiny_llama: Path) -> None:
    import torch

    from lens_safety.evaluation.utility import evaluate_utility
    from lens_safety.models import load_model

    model = load_model(str(tiny_llama), device="cpu")
    before = evaluate_utility(model, TASK, include_path=TASK_DIR, log_samples=True, batch_size=4)[TASK]
    with torch.no_grad():
        edited = [param for name, param in model.hf_model.named_parameters() if "down_proj" in name]
        assert len(edited) == 3
        for param in edited:
            param.mul_(3.0)
    after = evaluate_utility(model, TASK, include_path=TASK_DIR, log_samples=True, batch_size=4)[TASK]
    expected = _vanilla_logliks(model.hf_model, model.tokenizer)
    got = [s["loglikelihoods"] for s in sorted(after.samples, key=lambda s: s["doc_id"])]
    for mine, theirs in zip(expected, got, strict=True):
        assert theirs == pytest.approx(mine, rel=1e-4, abs=1e-4)
    assert got != [s["loglikelihoods"] for s in sorted(before.samples, key=lambda s: s["doc_id"])]
    assert after.metrics["acc"]["value"] == pytest.approx(_accuracy(expected))


def test_unknown_task_and_missing_folder_are_one_line(tiny_llama: Path) -> None:
    from lens_safety.evaluation.utility import evaluate_utility, parse_tasks

    assert parse_tasks("paper") == ["mmlu", "hellaswag", "arc_easy", "arc_challenge", "boolq"]
    assert parse_tasks("boolq, mmlu,boolq") == ["boolq", "mmlu"]
    with pytest.raises(LensSafetyError, match="no task 'no_such_task'"):
        evaluate_utility(str(tiny_llama), "no_such_task", include_path=TASK_DIR, device="cpu")
    with pytest.raises(LensSafetyError, match="does not exist"):
        evaluate_utility(str(tiny_llama), TASK, include_path=TASK_DIR / "missing", device="cpu")


def test_eval_cli_utility_in_json(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        [
            "eval",
            str(tiny_llama),
            "--limit",
            "1",
            "--max-new-tokens",
            "2",
            "--utility",
            TASK,
            "--utility-limit",
            "6",
            "--utility-include",
            str(TASK_DIR),
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(out)
    entry = data["utility"]["tasks"][TASK]
    assert entry["n"] == 6 and entry["limit"] == 6
    assert {"value", "stderr"} == set(entry["metrics"]["acc"])
    assert data["utility"]["harness"] == "lm-evaluation-harness"
    code, _, err = run(["eval", str(tiny_llama), "--utility", TASK, "--utility-limit", "0"], capsys)
    assert code == 2 and err.startswith("error:") and "--utility-limit" in err


def test_missing_lm_eval_names_the_extra(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lens_safety.evaluation.utility import evaluate_utility

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(LensSafetyError, match=r"lens-safety\[utility\]"):
        evaluate_utility(str(tiny_llama), TASK, include_path=TASK_DIR, device="cpu")
