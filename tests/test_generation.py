"""Batched generation: equals vanilla Hugging Face generate, seeded sampling, interventions, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation import generate
from lens_safety.evaluation.generation import completion_length, end_of_sequence_ids
from lens_safety.interventions import add_direction
from lens_safety.models import load_model

PROMPTS = ["Give me a recipe for pancakes.", "What is the capital of France?", "Write a haiku about rain."]


#: instructions of clearly different lengths, so a batch of them is left-padded
UNEVEN = [
    "Hi.",
    "What is the capital of France?",
    "Write a haiku about rain falling on a quiet city street late at night, then explain its imagery.",
]


def vanilla_new_tokens(hf_dir: Path, model, prompts: list[str], max_new_tokens: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Greedy new tokens (up to EOS) from a separately loaded plain AutoModelForCausalLM, one
    prompt at a time without padding."""
    from transformers import AutoModelForCausalLM

    vanilla = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    eos = end_of_sequence_ids(model)
    rows = []
    for prompt in prompts:
        ids = torch.tensor([model.chat.token_ids(model.chat.format(prompt))])
        with torch.no_grad():
            out = vanilla.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_k=None,
                top_p=None,
                pad_token_id=model.tokenizer.pad_token_id,
            )
        row = out[0, ids.shape[1] :].tolist()
        rows.append(row[: completion_length(row, eos)[0]])
    return rows


def zero_intervention(model):  # type: ignore[no-untyped-def]
    """An activation addition of strength zero in a middle block: the hooks run, nothing changes."""
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    return lambda: add_direction(model, vector, layer=model.n_layers // 2, coeff=0.0)


def assert_greedy_equals_vanilla(model, hf_dir: Path, max_new_tokens: int) -> None:  # type: ignore[no-untyped-def]
    batch = model.chat.encode(UNEVEN)
    assert (batch.attention_mask == 0).any(), "the batch must be left-padded"
    expected = vanilla_new_tokens(hf_dir, model, UNEVEN, max_new_tokens)
    assert all(len(row) >= 2 for row in expected), "too short to exercise the KV cache"
    plain = generate(model, UNEVEN, max_new_tokens=max_new_tokens, batch_size=3)
    hooked = generate(
        model, UNEVEN, max_new_tokens=max_new_tokens, batch_size=3, intervention=zero_intervention(model)
    )
    assert plain.token_ids == expected
    assert hooked.token_ids == expected
    for got, text in zip(expected, plain.completions, strict=True):
        assert text == model.tokenizer.decode(got, skip_special_tokens=True).strip()


@pytest.mark.compat
def test_greedy_batched_equals_vanilla_hf_one_at_a_time(smollm2, smollm2_dir: Path) -> None:  # type: ignore[no-untyped-def]
    assert_greedy_equals_vanilla(smollm2, smollm2_dir, max_new_tokens=24)
    gens = generate(smollm2, PROMPTS, max_new_tokens=12, batch_size=3)
    assert gens.prompts == tuple(PROMPTS) and gens.prompt_index == [0, 1, 2]
    # greedy is deterministic and batch size does not change the tokens
    assert generate(smollm2, PROMPTS, max_new_tokens=12, batch_size=2).completions == gens.completions


@pytest.mark.compat
@pytest.mark.organism
def test_organism_greedy_batched_equals_vanilla_hf_one_at_a_time(organism) -> None:  # type: ignore[no-untyped-def]
    assert_greedy_equals_vanilla(organism, organism.hf_path, max_new_tokens=24)


def test_truncation_and_token_counts(smollm2) -> None:  # type: ignore[no-untyped-def]
    gens = generate(smollm2, PROMPTS[:2], max_new_tokens=3)
    assert gens.truncated == [True, True] and gens.n_tokens == [3, 3]
    assert all(c and "<|im_end|>" not in c for c in gens.completions)
    record = gens.to_dict()["records"][0]
    assert set(record) == {"prompt", "completion", "n_tokens", "truncated"}


def test_completion_length_stops_at_first_eos() -> None:
    assert completion_length([5, 6, 2, 2, 2], {2}) == (2, False)
    assert completion_length([2, 5], {2, 9}) == (0, False)
    assert completion_length([5, 6, 7], {2}) == (3, True)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(smollm2) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(
        smollm2,
        PROMPTS[:2],
        max_new_tokens=8,
        do_sample=True,
        temperature=1.5,
        seed=7,
        num_return_sequences=3,
    )
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(
        smollm2,
        PROMPTS[:2],
        max_new_tokens=8,
        do_sample=True,
        temperature=1.5,
        seed=7,
        num_return_sequences=3,
    )
    c = generate(
        smollm2,
        PROMPTS[:2],
        max_new_tokens=8,
        do_sample=True,
        temperature=1.5,
        seed=8,
        num_return_sequences=3,
    )
    assert a.completions == b.completions
    assert a.token_ids != c.token_ids
    assert len(a) == 6 and a.prompt_index == [0, 0, 0, 1, 1, 1]
    assert [len(g) for g in a.grouped()] == [3, 3]
    assert len(set(a.grouped()[0])) > 1  # temperature 1.5 gives different draws per prompt


def test_intervention_changes_generation_like_the_context_manager(smollm2) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    vector = torch.randn(smollm2.d_model) * 8.0
    plain = generate(smollm2, PROMPTS[:2], max_new_tokens=8)
    steered = generate(
        smollm2,
        PROMPTS[:2],
        max_new_tokens=8,
        intervention=lambda: add_direction(smollm2, vector, layer=5, coeff=4.0),
    )
    with add_direction(smollm2, vector, layer=5, coeff=4.0):
        wrapped = generate(smollm2, PROMPTS[:2], max_new_tokens=8)
    assert steered.token_ids == wrapped.token_ids
    assert steered.token_ids != plain.token_ids
    # hooks are gone afterwards
    assert generate(smollm2, PROMPTS[:2], max_new_tokens=8).token_ids == plain.token_ids


@pytest.mark.compat
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "phi3"])
def test_tiny_architectures_match_vanilla_batched_generate(arch: str, tiny_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_dirs[arch], device="cpu")
    gens = generate(model, PROMPTS, max_new_tokens=6, batch_size=3)
    batch = model.chat.encode(PROMPTS)
    vanilla = AutoModelForCausalLM.from_pretrained(str(tiny_dirs[arch]), dtype=torch.float32).eval()
    with torch.no_grad():
        out = vanilla.generate(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    eos = {
        model.tokenizer.eos_token_id,
        *(
            [vanilla.generation_config.eos_token_id]
            if isinstance(vanilla.generation_config.eos_token_id, int)
            else []
        ),
    }
    for got, row in zip(gens.token_ids, out[:, batch.input_ids.shape[1] :].tolist(), strict=True):
        n, _ = completion_length(row, eos)
        assert got == row[:n]


def test_bad_input(smollm2) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LensSafetyError, match="empty"):
        generate(smollm2, [])
    with pytest.raises(LensSafetyError, match="max_new_tokens"):
        generate(smollm2, PROMPTS, max_new_tokens=0)
    with pytest.raises(LensSafetyError, match="greedy"):
        generate(smollm2, PROMPTS, num_return_sequences=2)
    with pytest.raises(LensSafetyError, match="temperature"):
        generate(smollm2, PROMPTS, do_sample=True, temperature=0.0)
