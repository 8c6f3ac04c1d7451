"""Residual reads equal vanilla transformers hidden states; batched equals one-at-a-time."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lens_safety import collect_activations, load_model, sum_activations
from lens_safety.errors import LensSafetyError

PROMPTS = [
    "How do I bake sourdough bread at home?",
    "Write a haiku about autumn.",
    "hi",
    "Explain, in two sentences, why the sky looks blue during the day.",
]


def hf_reference(model, prompt: str, positions: tuple[int, ...]) -> torch.Tensor:
    """[n_layers, n_positions, d_model] from vanilla transformers' hidden_states, unpadded, float64."""
    hf = AutoModelForCausalLM.from_pretrained(str(model.hf_path), dtype=torch.float64).eval()
    ids = torch.tensor([model.chat.token_ids(model.chat.format(prompt))])
    with torch.no_grad():
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states
    stacked = torch.stack(hidden[: model.n_layers], dim=0)[:, 0]  # [layers, seq, d]
    return stacked[:, list(positions)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_tiny_architectures_match_hf_hidden_states(tiny_dirs, tiny_arch):
    model = load_model(tiny_dirs[tiny_arch], device="cpu")
    positions = model.chat.post_instruction_positions()
    acts = collect_activations(model, PROMPTS, positions="post_instruction", batch_size=4)
    assert acts.tensor.shape == (len(PROMPTS), model.n_layers, len(positions), model.d_model)
    assert acts.space == "raw_hf"
    for i, prompt in enumerate(PROMPTS):
        assert relative_error(acts.tensor[i], hf_reference(model, prompt, positions)) < 1e-3


def test_tiny_batched_equals_single(tiny_dirs, tiny_arch):
    model = load_model(tiny_dirs[tiny_arch], device="cpu")
    batched = collect_activations(model, PROMPTS, positions=(-3, -1), batch_size=4).tensor
    single = torch.cat([collect_activations(model, [p], positions=(-3, -1)).tensor for p in PROMPTS])
    assert relative_error(batched, single) < 1e-5


def test_embedded_model_matches_hf(smollm2):
    positions = (-2, -1)
    acts = collect_activations(smollm2, PROMPTS[:2], positions=positions, batch_size=2)
    for i, prompt in enumerate(PROMPTS[:2]):
        assert relative_error(acts.tensor[i], hf_reference(smollm2, prompt, positions)) < 1e-3


def test_layer_subset_and_streaming_sums(smollm2):
    acts = collect_activations(smollm2, PROMPTS, layers=[3, 10], positions=(-1,), batch_size=3)
    assert acts.layers == (3, 10)
    sums = sum_activations(smollm2, PROMPTS, layers=[3, 10], positions=(-1,), batch_size=3)
    assert sums.count == len(PROMPTS)
    assert sums.sums.dtype == torch.float64
    torch.testing.assert_close(sums.mean, acts.tensor.double().mean(0), rtol=1e-6, atol=1e-6)
    assert torch.equal(acts.at(10, -1), acts.tensor[:, 1, 0])


def test_bad_layers_positions_and_empty_prompts(smollm2):
    with pytest.raises(LensSafetyError, match="out of range"):
        collect_activations(smollm2, PROMPTS, layers=[99])
    with pytest.raises(LensSafetyError, match="negative"):
        collect_activations(smollm2, PROMPTS, positions=(0,))
    with pytest.raises(LensSafetyError, match="empty"):
        collect_activations(smollm2, [])


def test_read_hook_points_reduces_each_point_in_order_and_stops_after_the_last(tiny_dirs):
    from lens_safety.activations import hook_point_name, hooks, read_hook_points

    model = load_model(tiny_dirs["llama"], device="cpu")
    rows = [model.chat.token_ids(model.chat.format(p)) for p in PROMPTS]
    batch = model.chat.pad(rows)
    weights = batch.attention_mask.double() / batch.attention_mask.sum(1, keepdim=True)

    def mean_over_tokens(activation: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bs,bsd->bd", weights, activation.double())

    points = [hook_point_name("resid_pre", 2), hook_point_name("resid_pre", 0)]  # deepest first
    deeper: list[int] = []
    last = hook_point_name("resid_post", model.n_layers - 1)
    with hooks(model, [(last, lambda activation, hook: deeper.append(1))]):
        deep, shallow = read_hook_points(model, batch, points, mean_over_tokens)
    assert not deeper  # the pass stopped at layer 2: the last block never ran
    hf = AutoModelForCausalLM.from_pretrained(str(model.hf_path), dtype=torch.float64).eval()
    for i, row in enumerate(rows):
        with torch.no_grad():
            hidden = hf(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states
        assert relative_error(deep[i], hidden[2][0].mean(0)) < 1e-3
        assert relative_error(shallow[i], hidden[0][0].mean(0)) < 1e-3
