"""Shared-prefix passes (the chat template's leading tokens computed once per batch) equal the
plain left-padded batch, on every tiny architecture, with and without position-independent hooks."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
import torch

from lens_safety.evaluation.divergence import last_token_log_probs
from lens_safety.evaluation.generation import generate
from lens_safety.forward_pass import MIN_SHARED_PREFIX, shared_prefix_batch
from lens_safety.interventions import ablate_direction, add_direction
from lens_safety.models import ChatModel, load_model
from lens_safety.prompts import PromptSet

PROMPTS = [
    "Name a colour.",
    "Write one short sentence about the sea and the sky at dawn, please.",
    "How do bees make honey?",
    "List three prime numbers.",
    "Explain in a few words why the sky looks blue on a clear afternoon in summer.",
]


def _hooks(model: ChatModel, kind: str) -> AbstractContextManager[object]:
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    if kind == "ablate":
        return ablate_direction(model, vector)
    if kind == "add":
        return add_direction(model, 4.0 * vector, layer=1)
    return nullcontext()


@pytest.mark.parametrize("hooks", ["none", "ablate", "add"])
def test_shared_prefix_last_token_log_probs_equal_the_plain_batch(
    tiny_dirs: dict[str, Path], tiny_arch: str, hooks: str
) -> None:
    model = load_model(tiny_dirs[tiny_arch], device="cpu")
    rows = [model.chat.token_ids(model.chat.format(p)) for p in PROMPTS]
    prefixed = shared_prefix_batch(model, rows)
    assert prefixed is not None and prefixed.prefix >= MIN_SHARED_PREFIX
    assert prefixed.prefix < min(len(r) for r in rows)
    with _hooks(model, hooks):
        plain = last_token_log_probs(model, PROMPTS, batch_size=4)
        shared = last_token_log_probs(model, PROMPTS, batch_size=4, share_prefix=True)
    assert shared.shape == plain.shape
    assert torch.allclose(shared, plain, atol=2e-5, rtol=0), float((shared - plain).abs().max())
    # an intervention changes the distributions at all: the comparison is not vacuous
    if hooks != "none":
        untouched = last_token_log_probs(model, PROMPTS, batch_size=4)
        assert float((untouched - plain).abs().max()) > 1e-3


def test_no_shared_prefix_falls_back_to_the_plain_batch(tiny_dirs: dict[str, Path]) -> None:
    model = load_model(tiny_dirs["llama"], device="cpu")
    rows = [[5, 6, 7, 8, 9], [6, 6, 7, 8, 9, 10]]
    assert shared_prefix_batch(model, rows) is None
    identical = [model.chat.token_ids(model.chat.format(PROMPTS[0]))] * 2
    prefixed = shared_prefix_batch(model, identical)
    assert prefixed is not None and prefixed.prefix == len(identical[0]) - 1


def test_first_log_probs_are_the_last_prompt_positions_distribution(tiny_dirs: dict[str, Path]) -> None:
    model = load_model(tiny_dirs["qwen2"], device="cpu")
    reference = last_token_log_probs(model, PROMPTS, batch_size=3)
    plain = generate(model, PROMPTS, max_new_tokens=3, batch_size=3, first_log_probs=True)
    shared = generate(model, PROMPTS, max_new_tokens=3, batch_size=3, first_log_probs=True, share_prefix=True)
    assert plain.first_log_probs is not None and shared.first_log_probs is not None
    assert torch.equal(plain.first_log_probs, reference)  # the same pass, bit for bit
    assert torch.allclose(shared.first_log_probs, reference, atol=2e-5, rtol=0)
    assert generate(model, PROMPTS, max_new_tokens=3).first_log_probs is None


def test_shared_prefix_generation_gives_the_same_completions(smollm2: ChatModel) -> None:
    prompts = PromptSet.load("builtin:harmless:test").head(8)
    plain = generate(smollm2, prompts, max_new_tokens=12, batch_size=8)
    shared = generate(smollm2, prompts, max_new_tokens=12, batch_size=8, share_prefix=True)
    assert shared.token_ids == plain.token_ids
    assert shared.completions == plain.completions
