"""SRR features read WHILE the candidates are sampled (response contexts ``generated`` and
``generated_mean``).

Sampling with the KV cache already computes the residual stream of every token it reads: the
prompt in the first (prefill) forward call, then one new token per call. Hooks on the feature
layers keep, per call, the state at the last position of every row, so the features cost no
extra forward pass (the point of SRR's "negligible overhead" claim).

Which token: call 0 reads the prompt, its last state is the instruction feature (the same token
:func:`~lens_safety.srr.features.list_features` reads). Call ``t >= 1`` reads response token
``g_t``. A completion with ``c`` content tokens that ended with an end-of-sequence token had
``g_c`` read at call ``c``; one cut at ``max_new_tokens`` (``c`` tokens, no end token) never had its
last sampled token ``g_c`` read, so its feature is the state of ``g_{c-1}`` (call ``c - 1``). An
empty completion's feature is the prompt's last state. Up to that one token, the feature equals a
separate ``with_instruction`` pass over ``prompt + g_1..g_k`` (tested to float tolerance; the KV
cache changes the order of floating-point sums, not the maths).

``generated_mean`` is the mean of the states of every response token read, calls ``1 ..`` the call
above (the prompt's last state for an empty completion): a pooled view of the whole response,
which a keyword-style label ("does it refuse anywhere?") can depend on more than on its last token.

Space: raw HF residual basis; layer ``l < n_layers`` is ``blocks.{l}.hook_resid_pre``, layer
``n_layers`` is the final block's ``hook_resid_post`` (pre-norm), as in :mod:`.features`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch
from jaxtyping import Float

from lens_safety.activations import hooks
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import GenerationEngine, Generations, generate
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.srr.features import check_layers, hook_for_layer, read_token_states


@dataclass
class SampledStates:
    """Samples and their features: ``instruction[i]`` for prompt ``i``, ``responses[j]`` for
    completion ``j`` (prompt-major, as in :class:`~lens_safety.evaluation.Generations`)."""

    generations: Generations
    layers: tuple[int, ...]
    instruction: Float[torch.Tensor, "n_prompts n_layers d_model"]
    responses: Float[torch.Tensor, "n_completions n_layers d_model"]
    responses_mean: Float[torch.Tensor, "n_completions n_layers d_model"]

    def response_states(self, context: str) -> Float[torch.Tensor, "n_completions n_layers d_model"]:
        """``responses`` for ``generated``, ``responses_mean`` for ``generated_mean``."""
        if context == "generated_mean" and len(self.responses_mean) != len(self.responses):
            raise LensSafetyError(
                "the mean response states were not computed", "sample with pooled=True for generated_mean"
            )
        return self.responses_mean if context == "generated_mean" else self.responses


def read_call(n_tokens: int, truncated: bool) -> int:
    """Index of the forward call that read a completion's last read token (module docstring)."""
    return max(0, n_tokens - 1) if truncated else n_tokens


@contextmanager
def _record_last_positions(
    model: ChatModel, layers: Sequence[int], calls: list[dict[int, list[torch.Tensor]]]
) -> Iterator[None]:
    """Append, per forward call, the last-position state of every row at each layer."""
    record: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    calls.append(record)

    def make_hook(layer: int):
        def read(activation: torch.Tensor, hook: object) -> torch.Tensor:
            record[layer].append(activation[:, -1].detach().float().cpu())
            return activation

        return read

    with hooks(model, [(hook_for_layer(model, layer), make_hook(layer)) for layer in layers]):
        yield


def mean_of_read_states(
    states: Float[torch.Tensor, "n_calls rows n_layers d_model"], steps: torch.Tensor
) -> Float[torch.Tensor, "rows n_layers d_model"]:
    """Per row ``r``: the mean of ``states[1 .. steps[r], r]`` (``states[0, r]`` when ``steps[r] == 0``)."""
    prefix = states.double().cumsum(dim=0)
    rows = torch.arange(states.shape[1])
    summed = prefix[steps, rows] - prefix[0, rows]
    mean = summed / steps.clamp(min=1).double()[:, None, None]
    return torch.where((steps == 0)[:, None, None], states[0, rows].double(), mean).float()


def sample_with_states(
    model: ChatModel,
    prompts: Sequence[str],
    *,
    n: int,
    layers: Sequence[int] = (),
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int | None = 0,
    batch_size: int = 8,
    progress: bool = False,
    pooled: bool = True,
    engine: GenerationEngine | None = None,
) -> SampledStates:
    """Sample ``n`` completions per prompt and keep their ``generated``-context features, and with
    ``pooled`` their ``generated_mean`` ones (a float64 running sum over every step: skip it when
    only the last-token features are wanted).

    With ``engine`` (e.g. vLLM) the candidates are sampled there, all prompts in one call, and the
    features are read afterwards by teacher forcing (:func:`teacher_forced_states`).

    Prompts go ``batch_size`` at a time, batch ``b`` seeded with ``seed + b`` (reproducible, and
    the same candidates whether or not ``layers`` are captured); each batch's states are reduced
    to one row per completion before the next batch, so memory does not grow with the steps.
    With ``layers=()`` nothing is captured (the feature tensors are empty).
    """
    layer_ids = check_layers(model, layers) if layers else ()
    if engine is not None:
        gens = generate(
            model,
            list(prompts),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            seed=seed,
            num_return_sequences=n,
            progress=progress,
            engine=engine,
        )
        return teacher_forced_states(model, gens, layer_ids, pooled=pooled, batch_size=batch_size)
    batches = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    parts: list[Generations] = []
    instruction, responses, means = [], [], []
    for b, batch in enumerate(track(batches, "sampling candidates", len(batches), progress)):
        calls: list[dict[int, list[torch.Tensor]]] = []
        gens = generate(
            model,
            batch,
            max_new_tokens=max_new_tokens,
            batch_size=len(batch),
            do_sample=True,
            temperature=temperature,
            seed=None if seed is None else seed + b,
            num_return_sequences=n,
            intervention=partial(_record_last_positions, model, layer_ids, calls) if layer_ids else None,
        )
        parts.append(gens)
        if not layer_ids:
            continue
        (record,) = calls
        states = torch.stack([torch.stack(record[layer]) for layer in layer_ids], dim=2)
        instruction.append(states[0, ::n])  # [n_calls, rows, n_layers, d] -> call 0, one row per prompt
        steps = torch.tensor(
            [read_call(k, cut) for k, cut in zip(gens.n_tokens, gens.truncated, strict=True)]
        )
        responses.append(states[steps, torch.arange(len(steps))])
        if pooled:
            means.append(mean_of_read_states(states, steps))
    merged = concatenate(parts)
    empty = torch.zeros(0, len(layer_ids), model.d_model)
    return SampledStates(
        merged,
        layer_ids,
        torch.cat(instruction) if instruction else empty,
        torch.cat(responses) if responses else empty,
        torch.cat(means) if means else empty,
    )


def teacher_forced_states(
    model: ChatModel,
    gens: Generations,
    layers: Sequence[int],
    *,
    pooled: bool = True,
    batch_size: int = 8,
) -> SampledStates:
    """The features :func:`sample_with_states` reads while sampling, for completions sampled
    elsewhere: one forward pass per batch over ``prompt + g_1 .. g_s`` (``s`` =
    :func:`read_call`) reads the states of the prompt's last token and of ``g_1 .. g_s``, which the
    sampling calls ``0 .. s`` would have read (causal attention: the same maths, another order of
    floating-point sums)."""
    layer_ids = tuple(layers)
    empty = torch.zeros(0, len(layer_ids), model.d_model)
    if not layer_ids:
        return SampledStates(gens, (), empty, empty, empty)
    prompts = [model.chat.token_ids(model.chat.format(p, gens.system_prompt)) for p in gens.prompts]
    steps = [read_call(k, cut) for k, cut in zip(gens.n_tokens, gens.truncated, strict=True)]
    first, last, means = [], [], []
    for start in range(0, len(gens), batch_size):
        rows = range(start, min(start + batch_size, len(gens)))
        width = max(steps[j] for j in rows) + 1
        seqs, positions = [], []
        for j in rows:
            prompt = prompts[gens.prompt_index[j]]
            seqs.append(prompt + gens.token_ids[j][: steps[j]])
            positions.append([len(prompt) - 1 + min(t, steps[j]) for t in range(width)])
        states = read_token_states(model, seqs, positions, layer_ids).transpose(0, 1)  # [calls, rows, ...]
        taken = torch.tensor([steps[j] for j in rows])
        first.append(states[0])
        last.append(states[taken, torch.arange(len(taken))])
        if pooled:
            means.append(mean_of_read_states(states, taken))
    k = gens.num_return_sequences
    return SampledStates(
        gens,
        layer_ids,
        torch.cat(first)[::k],
        torch.cat(last),
        torch.cat(means) if means else empty,
    )


def concatenate(parts: Sequence[Generations]) -> Generations:
    """One :class:`Generations` from consecutive batches with the same settings."""
    first = parts[0]
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + len(part.prompts))
    return replace(
        first,
        prompts=tuple(p for part in parts for p in part.prompts),
        completions=[c for part in parts for c in part.completions],
        n_tokens=[k for part in parts for k in part.n_tokens],
        truncated=[t for part in parts for t in part.truncated],
        prompt_index=[i + off for part, off in zip(parts, offsets, strict=False) for i in part.prompt_index],
        token_ids=[t for part in parts for t in part.token_ids],
        seconds=sum(part.seconds for part in parts),
        seed=first.seed,
    )
