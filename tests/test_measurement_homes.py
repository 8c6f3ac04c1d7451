"""The one home of each measurement: KL, next-token log-probabilities, intervals, refusal rate.

Every numerical helper is checked against an independent float64 recomputation, and every rule
chosen where two copies used to disagree has a test that fails under the other rule.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.bootstrap import bootstrap, bootstrap_interval, wilson, wilson_interval
from lens_safety.evaluation.divergence import (
    kl_from_log_probs,
    last_logits,
    last_token_log_probs,
    mean_first_token_kl,
)
from lens_safety.evaluation.judges import judge_from_callable
from lens_safety.evaluation.metrics import rate_of_completions, refusal_rate
from lens_safety.models import load_model
from lens_safety.prompts import PromptSet

PROMPTS = ["Give me a recipe for pancakes.", "What is the capital of France?", "Name a prime."]


@pytest.fixture(scope="module")
def tiny(tiny_dirs: dict[str, Path]):  # type: ignore[no-untyped-def]
    return load_model(tiny_dirs["llama"], device="cpu")


def _reference_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(P || Q) of one row by explicit float64 loops over the vocabulary (natural log)."""
    p = np.exp(p_logits - p_logits.max())
    p /= p.sum()
    q = np.exp(q_logits - q_logits.max())
    q /= q.sum()
    return float(sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q, strict=True) if pv > 0))


def test_kl_matches_an_explicit_float64_sum_and_is_kl_of_p_from_q() -> None:
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = (
        torch.randn(5, 40, generator=g, dtype=torch.float64) * 3,
        torch.randn(5, 40, generator=g, dtype=torch.float64),
    )
    log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    got = kl_from_log_probs(log_p, log_q)
    want = [_reference_kl(p_logits[i].numpy(), q_logits[i].numpy()) for i in range(5)]
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    # the first argument is P: swapping the arguments gives another number
    swapped = [_reference_kl(q_logits[i].numpy(), p_logits[i].numpy()) for i in range(5)]
    assert not np.allclose(got.numpy(), swapped, rtol=1e-3)
    assert mean_first_token_kl(log_p, log_q) == pytest.approx(float(np.mean(want)), rel=1e-12)


def test_kl_is_clamped_at_zero_where_rounding_would_make_it_negative() -> None:
    """Rule: KL is reported as ``max(sum p (log p - log q), 0)`` per row (the calibration rule)."""
    log_p = torch.randn(3, 16, dtype=torch.float64).log_softmax(-1)
    log_q = log_p + 1e-12  # q slightly above p everywhere: the plain sum is about -1e-12
    raw = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert (raw < 0).all()
    assert kl_from_log_probs(log_p, log_q).tolist() == [0.0, 0.0, 0.0]
    assert kl_from_log_probs(log_p, log_p).tolist() == [0.0, 0.0, 0.0]
    # a training loss keeps the plain sum (and its gradient) with clamp=False
    assert torch.equal(kl_from_log_probs(log_p, log_q, clamp=False), raw)


def test_last_token_log_probs_equal_unpadded_single_prompts(tiny) -> None:  # type: ignore[no-untyped-def]
    prompts = PromptSet.from_list(PROMPTS)
    got = last_token_log_probs(tiny, prompts, batch_size=2)
    assert got.dtype == torch.float64 and got.shape[0] == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tiny.chat.token_ids(tiny.chat.format(prompt))])
        with torch.inference_mode():
            logits = tiny.hf_model(input_ids=ids).logits[0, -1].double()
        want = logits.log_softmax(-1)
        assert torch.allclose(got[i], want, atol=1e-5), float((got[i] - want).abs().max())
    assert torch.allclose(got.exp().sum(-1), torch.ones(len(PROMPTS), dtype=torch.float64))
    rows = torch.cat(list(last_logits(tiny, prompts, 2, None)))
    assert torch.equal(got, rows.log_softmax(-1))


def test_bootstrap_of_a_mean_equals_a_plain_resampling_loop() -> None:
    values = np.random.default_rng(4).normal(size=37)
    weights = np.random.default_rng(5).integers(1, 9, size=37).astype(float)
    rng = np.random.default_rng(11)
    stats = []
    for _ in range(300):
        index = rng.integers(0, 37, 37)
        stats.append(float((weights[index] * values[index]).sum() / weights[index].sum()))
    low, high = np.percentile(stats, [2.5, 97.5])
    estimate = bootstrap(values, weights=weights, n_resamples=300, seed=11)
    assert estimate.value == pytest.approx(float((weights * values).sum() / weights.sum()), rel=1e-14)
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((low, high), rel=1e-14)


def test_two_sample_bootstrap_resamples_each_class_in_turn() -> None:
    pos, neg = np.random.default_rng(1).normal(1, 1, 23), np.random.default_rng(2).normal(0, 1, 17)

    def gap(a: np.ndarray, b: np.ndarray) -> float:
        return float(a.mean() - b.mean())

    rng = np.random.default_rng(3)
    stats = [gap(pos[rng.integers(0, 23, 23)], neg[rng.integers(0, 17, 17)]) for _ in range(400)]
    want = tuple(np.percentile(stats, [2.5, 97.5]))
    assert bootstrap_interval(gap, pos, neg, n_resamples=400, seed=3) == pytest.approx(want, rel=1e-14)
    assert math.isnan(bootstrap_interval(gap, pos, neg, n_resamples=0)[0])


def test_wilson_interval_matches_the_closed_form_and_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    z = NormalDist().inv_cdf(0.975)
    for k, n in ((0, 10), (3, 10), (10, 10), (49, 52), (1, 1)):
        ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n, z) == pytest.approx((ci.low, ci.high), abs=1e-12)
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-4)  # z = 1.96
    assert wilson_interval(0, 0) == (0.0, 1.0)
    estimate = wilson([True, False, True, True])
    assert estimate.value == 0.75 and estimate.n == 4 and estimate.confidence == 0.95


def test_refusal_rate_interval_is_a_parameter_bootstrap_or_wilson() -> None:
    """All four refused: the bootstrap interval collapses to [1, 1], Wilson's does not."""
    judge = judge_from_callable(lambda text: True, name="always")
    completions = ["no", "no", "no", "no"]
    boot = rate_of_completions(completions, judge=judge)
    wil = rate_of_completions(completions, judge=judge, interval="wilson")
    assert boot.interval == "bootstrap" and (boot.ci_low, boot.ci_high) == (1.0, 1.0)
    assert wil.interval == "wilson" and wil.rate == 1.0 and wil.n_refused == 4
    assert (wil.ci_low, wil.ci_high) == pytest.approx(wilson_interval(4, 4))
    assert wil.ci_low < 0.6 and wil.to_dict(include_completions=False)["interval"] == "wilson"
    with pytest.raises(LensSafetyError, match="unknown interval"):
        rate_of_completions(completions, judge=judge, interval="normal")  # type: ignore[arg-type]


def test_refusal_rate_takes_any_judge_and_the_wilson_interval(tiny) -> None:  # type: ignore[no-untyped-def]
    judge = judge_from_callable(lambda text: len(text) % 2 == 0, name="even")
    result = refusal_rate(tiny, PROMPTS, judge, max_new_tokens=3, interval="wilson")
    expected = [len(c) % 2 == 0 for c in result.completions]
    assert result.refused == expected and result.judge == "even"
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(sum(expected), len(PROMPTS)))
    with pytest.raises(LensSafetyError, match="unknown interval"):
        refusal_rate(tiny, PROMPTS, judge, max_new_tokens=3, interval="exact")  # type: ignore[arg-type]


def test_organism_evaluation_uses_the_wilson_rate_and_the_bootstrap_kl(tiny) -> None:  # type: ignore[no-untyped-def]
    from lens_safety.organism.evaluate import evaluate_organism

    harmful, harmless = PromptSet.from_list(PROMPTS[:2]), PromptSet.from_list(PROMPTS[1:])
    evaluation = evaluate_organism(tiny, harmful, harmless, base=tiny, max_new_tokens=2)
    record = evaluation.to_dict()
    rate = record["harmful_refusal"]
    assert set(rate) == {"rate", "refused", "n", "interval"} and rate["n"] == 2
    assert tuple(rate["interval"]) == pytest.approx(wilson_interval(rate["refused"], 2))
    # the base itself: every row's KL is exactly 0, and so is its bootstrap interval
    assert evaluation.kl_to_base == 0.0 and evaluation.kl_interval == (0.0, 0.0)
    assert evaluate_organism(tiny, harmful, harmless, max_new_tokens=2).kl_to_base is None


def test_organism_kl_interval_is_the_bootstrap_of_per_prompt_kl(tiny, tiny_dirs) -> None:  # type: ignore[no-untyped-def]
    """Rule: the KL interval is the percentile bootstrap of the mean (a normal interval differs)."""
    from lens_safety.organism.evaluate import evaluate_organism

    other = load_model(tiny_dirs["llama"], device="cpu")
    with torch.no_grad():
        weight = other.hf_model.lm_head.weight
        weight.add_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    prompts = PromptSet.from_list(PROMPTS)
    evaluation = evaluate_organism(other, prompts.head(1), prompts, base=tiny, max_new_tokens=1)
    rows = []
    for prompt in PROMPTS:  # independent: one unpadded prompt at a time, explicit float64 sum
        ids = torch.tensor([tiny.chat.token_ids(tiny.chat.format(prompt))])
        with torch.inference_mode():
            p, q = (m.hf_model(input_ids=ids).logits[0, -1].double().numpy() for m in (tiny, other))
        rows.append(_reference_kl(p, q))
    want = bootstrap(rows)
    assert evaluation.kl_to_base == pytest.approx(float(np.mean(rows)), rel=1e-4)
    assert evaluation.kl_interval == pytest.approx((want.ci_low, want.ci_high), rel=1e-4)
    half = 1.96 * float(np.std(rows, ddof=1)) / math.sqrt(len(rows))
    assert evaluation.kl_interval is not None
    assert abs(evaluation.kl_interval[0] - (float(np.mean(rows)) - half)) > 1e-3
