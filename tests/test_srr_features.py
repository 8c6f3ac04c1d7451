"""SRR features: last-token residual reads of arbitrary sequences, checked against vanilla transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lens_safety import collect_activations, load_model
from lens_safety.errors import LensSafetyError
from lens_safety.srr.features import list_features, prompt_token_ids, read_token_states, response_token_ids

RESPONSES = ["Sure, here is a short answer.", "I can't help with that.", ""]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma2"])
def tiny(request: pytest.FixtureRequest, tiny_dirs):
    return request.param, tiny_dirs[request.param], load_model(tiny_dirs[request.param], device="cpu")


def _reference_states(path, ids: list[int]) -> tuple[torch.Tensor, ...]:
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_hidden_states=True).hidden_states


def test_read_token_states_matches_vanilla_hf_float64(tiny) -> None:
    arch, path, model = tiny
    prompt = prompt_token_ids(model, "Explain photosynthesis.")
    rows = [prompt + response_token_ids(model, r) for r in RESPONSES]
    layers = [0, 1, model.n_layers]
    got = read_token_states(model, rows, [[len(prompt) - 1, -1]] * len(rows), layers)
    assert got.shape == (3, 2, 3, model.d_model)
    for i, row in enumerate(rows):
        hidden = _reference_states(path, row)
        for j, layer in enumerate(layers[:2]):
            for k, pos in enumerate([len(prompt) - 1, len(row) - 1]):
                ref = hidden[layer][0, pos].float()
                assert torch.allclose(got[i, k, j], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()), (
                    arch,
                    i,
                    layer,
                )
    # the final feature is the pre-norm residual: HF's last hidden state is its final norm
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    norm = hf.model.norm if hasattr(hf, "model") else hf.transformer.ln_f
    with torch.no_grad():
        ref_last = hf(torch.tensor([rows[0]]), output_hidden_states=True).hidden_states[-1][0, -1]
        assert torch.allclose(norm(got[0, 1, 2]), ref_last, atol=1e-4 * ref_last.abs().max().item())


def test_batched_read_equals_one_at_a_time(tiny) -> None:
    _, _, model = tiny
    rows = [[1, 5, 9, 13, 2], [1, 7], [1, 8, 8, 8]]
    together = read_token_states(model, rows, [[-1], [-1], [-1]], [1, 2])
    for i, row in enumerate(rows):
        alone = read_token_states(model, [row], [[-1]], [1, 2])
        assert torch.allclose(together[i], alone[0], atol=1e-5)


def test_instruction_feature_equals_collect_activations(tiny) -> None:
    _, _, model = tiny
    h_inst, h_resp = list_features(model, "Explain photosynthesis.", RESPONSES, [0, 2])
    ref = collect_activations(model, ["Explain photosynthesis."], layers=[0, 2])
    assert torch.allclose(h_inst, ref.tensor[0, :, 0], atol=1e-5)
    assert set(h_resp) == {"with_instruction", "response_only"}
    assert h_resp["with_instruction"].shape == (3, 2, model.d_model)
    # an empty response read with its instruction IS the instruction's last token
    assert torch.allclose(h_resp["with_instruction"][2], h_inst, atol=1e-5)
    # and the two encodings differ for a real response
    assert not torch.allclose(h_resp["with_instruction"][0], h_resp["response_only"][0])


def test_bad_layers_and_positions_are_one_line_errors(tiny) -> None:
    _, _, model = tiny
    with pytest.raises(LensSafetyError, match="out of range"):
        read_token_states(model, [[1, 2]], [[-1]], [model.n_layers + 1])
    with pytest.raises(LensSafetyError, match="outside"):
        read_token_states(model, [[1, 2]], [[5]], [0])
    with pytest.raises(LensSafetyError, match="response context"):
        list_features(model, "x", ["y"], [0], ["bogus"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_states_read_while_sampling_equal_a_separate_pass(tiny_dirs, arch: str) -> None:
    """``generated`` features == ``read_token_states`` over prompt + the tokens the model read."""
    from lens_safety.srr.capture import read_call, sample_with_states

    model = load_model(tiny_dirs[arch], device="cpu")
    prompts = ["Explain photosynthesis.", "Write a haiku about tea.", "How do locks work?"]
    layers = [0, 2, model.n_layers]
    sampled = sample_with_states(
        model, prompts, n=3, layers=layers, max_new_tokens=6, seed=3, batch_size=2, temperature=1.5
    )
    gens = sampled.generations
    assert sampled.responses.shape == (9, 3, model.d_model) and sampled.instruction.shape == (
        3,
        3,
        model.d_model,
    )
    assert gens.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    seen_cut = False
    for j, ids in enumerate(gens.token_ids):
        prompt = prompt_token_ids(model, prompts[gens.prompt_index[j]])
        read = ids[: read_call(gens.n_tokens[j], gens.truncated[j])]  # response tokens the model read
        seen_cut |= gens.truncated[j]
        ref = read_token_states(model, [prompt + read], [[len(prompt) - 1, -1]], layers)[0]
        scale = ref.abs().max().item()
        assert torch.allclose(sampled.responses[j], ref[1], atol=1e-4 * scale), (arch, j)
        assert torch.allclose(sampled.instruction[gens.prompt_index[j]], ref[0], atol=1e-4 * scale)
        # generated_mean: the float64 mean of the states of every response token read
        span = list(range(len(prompt), len(prompt) + len(read))) or [len(prompt) - 1]
        every = read_token_states(model, [prompt + read], [span], layers)[0].double()
        assert torch.allclose(sampled.responses_mean[j].double(), every.mean(0), atol=1e-4 * scale), (arch, j)
    assert seen_cut  # the truncated rule was exercised (random tiny models rarely stop early)
    again = sample_with_states(
        model, prompts, n=3, layers=layers, max_new_tokens=6, seed=3, batch_size=2, temperature=1.5
    )
    assert again.generations.completions == gens.completions and torch.equal(
        again.responses, sampled.responses
    )
    last_only = sample_with_states(
        model,
        prompts,
        n=3,
        layers=layers,
        max_new_tokens=6,
        seed=3,
        batch_size=2,
        temperature=1.5,
        pooled=False,
    )
    assert torch.equal(last_only.responses, sampled.responses)
    with pytest.raises(LensSafetyError, match="mean response states were not computed"):
        last_only.response_states("generated_mean")
    plain = sample_with_states(model, prompts, n=3, max_new_tokens=6, seed=3, batch_size=2, temperature=1.5)
    assert plain.generations.completions == gens.completions  # capturing does not change the samples
    with pytest.raises(LensSafetyError, match="read while sampling"):
        list_features(model, prompts[0], ["x"], layers, ["generated"])


def test_states_of_completions_that_ended_are_read_at_their_last_token(smollm2) -> None:
    """A completion that emitted end-of-sequence had ALL its tokens read: its feature is the last one's."""
    from lens_safety.srr.capture import sample_with_states

    prompts = ["What is the capital of France?"]
    sampled = sample_with_states(
        smollm2, prompts, n=2, layers=[3], max_new_tokens=48, seed=0, temperature=0.3
    )
    gens = sampled.generations
    assert not all(gens.truncated), gens.completions  # a short answer that stopped by itself
    prompt = prompt_token_ids(smollm2, prompts[0])
    for j, ids in enumerate(gens.token_ids):
        if gens.truncated[j]:
            continue
        ref = read_token_states(smollm2, [prompt + ids], [[-1]], [3])[0, 0]
        assert torch.allclose(sampled.responses[j], ref, atol=1e-4 * ref.abs().max().item())


def test_mean_of_read_states_averages_calls_one_to_step_and_falls_back_to_the_prompt() -> None:
    from lens_safety.srr.capture import mean_of_read_states

    states = torch.randn(5, 3, 2, 4)  # [calls, rows, layers, d]
    steps = torch.tensor([0, 1, 4])
    out = mean_of_read_states(states, steps)
    assert torch.equal(out[0], states[0, 0])  # an empty completion: the prompt's last state
    assert torch.allclose(out[1], states[1, 1])
    assert torch.allclose(out[2], states[1:5, 2].double().mean(0).float(), atol=1e-6)
