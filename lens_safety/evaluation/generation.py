"""Batched generation with the KV cache, optionally under an inference-time intervention.

:func:`generate` formats instructions with the model's chat template, LEFT pads them into
batches and calls Hugging Face ``generate`` on the wrapped model (``model.hf_model``) with the
attention mask, ``use_cache=True`` and an explicit ``pad_token_id``. The bridge's hook points sit
inside the wrapped modules, so an intervention context manager (``add_direction``,
``ablate_direction``, or any other one) edits every token, prompt and generated, as it is produced.
The bridge's own ``generate`` is never used (without a KV cache it is about 11x slower).

Decoding is greedy by default. ``do_sample=True`` samples from ``softmax(logits / temperature)``
over the whole vocabulary (no top-k / top-p truncation); with ``seed`` set the draws are
reproducible and the global torch RNG is left untouched.

``share_prefix=True`` computes the leading tokens every prompt of a batch shares (the chat
template's system prompt and user header) once and starts each batch from their KV cache
(:func:`~lens_safety.forward_pass.shared_prefix_batch`): the same completions up to float rounding,
for less prefill. Only valid under hooks that treat every position alike (weight edits,
``add_direction``, ``ablate_direction``). ``first_log_probs=True`` also keeps the float64
``log_softmax`` of the raw logits of the first new token (the last prompt position, before any
logits processor): the next-token distribution a first-token KL needs, without another pass.

A completion is the decoded text of the new tokens up to (not including) the first end-of-sequence
token, with special tokens removed and surrounding whitespace stripped. ``n_tokens`` counts those
tokens; ``truncated`` is true when no end-of-sequence token appeared within ``max_new_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from jaxtyping import Float, Int

from lens_safety.errors import LensSafetyError
from lens_safety.forward_pass import cache_argument, shared_prefix_batch
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.prompts import PromptSet, PromptSource

if TYPE_CHECKING:
    from transformers import Cache

#: A zero-argument factory returning a context manager that is active while the model generates,
#: e.g. ``lambda: add_direction(model, r, layer=12, coeff=4.0)``.
Intervention = Callable[[], AbstractContextManager[Any]]


@dataclass
class Generations:
    """Completions of a prompt set.

    With ``num_return_sequences = k`` there are ``k`` completions per prompt, stored prompt-major:
    completion ``j`` of prompt ``i`` is at index ``i * k + j`` (``prompt_index`` maps back).

    Attributes:
        prompts: the instructions (raw user text, before the chat template).
        completions: decoded new tokens (special tokens stripped, whitespace trimmed).
        n_tokens: number of new tokens before the first end-of-sequence token, per completion.
        truncated: whether the completion hit ``max_new_tokens`` without an end-of-sequence token.
        prompt_index: index into ``prompts`` of each completion.
        max_new_tokens, do_sample, temperature, seed, num_return_sequences: the decoding settings.
        system_prompt: the system prompt used when formatting (``None``: the template default).
        seconds: wall time spent generating.
        first_log_probs: ``[n_completions, vocab]`` float64 log-probabilities of the first new
            token (with ``first_log_probs=True``; module docstring), else ``None``.
    """

    prompts: tuple[str, ...]
    completions: list[str]
    n_tokens: list[int]
    truncated: list[bool]
    prompt_index: list[int]
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    seed: int | None = None
    num_return_sequences: int = 1
    system_prompt: str | None = None
    seconds: float = 0.0
    token_ids: list[list[int]] = field(default_factory=list, repr=False)
    first_log_probs: Float[torch.Tensor, "n vocab"] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def prompt_of_completion(self) -> list[str]:
        """The instruction each completion answers (same length as ``completions``)."""
        return [self.prompts[i] for i in self.prompt_index]

    @property
    def tokens_per_second(self) -> float:
        """New tokens (up to the end-of-sequence token) per second of generation."""
        return sum(self.n_tokens) / self.seconds if self.seconds > 0 else float("nan")

    def grouped(self) -> list[list[str]]:
        """Completions grouped by prompt: ``grouped()[i]`` holds the ``k`` answers to prompt ``i``."""
        k = self.num_return_sequences
        return [self.completions[i * k : (i + 1) * k] for i in range(len(self.prompts))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": {
                "max_new_tokens": self.max_new_tokens,
                "do_sample": self.do_sample,
                "temperature": self.temperature,
                "seed": self.seed,
                "num_return_sequences": self.num_return_sequences,
                "system_prompt": self.system_prompt,
            },
            "seconds": self.seconds,
            "records": [
                {"prompt": self.prompts[p], "completion": c, "n_tokens": n, "truncated": t}
                for p, c, n, t in zip(
                    self.prompt_index, self.completions, self.n_tokens, self.truncated, strict=True
                )
            ],
        }


def end_of_sequence_ids(model: ChatModel) -> set[int]:
    """Token ids that end a completion (the generation config's and the tokenizer's EOS)."""
    ids: set[int] = set()
    configured = getattr(model.hf_model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(x) for x in configured)
    if model.tokenizer.eos_token_id is not None:
        ids.add(int(model.tokenizer.eos_token_id))
    return ids


def completion_length(new_tokens: Sequence[int], eos_ids: set[int]) -> tuple[int, bool]:
    """``(n_tokens, truncated)`` of one row of new tokens: tokens before the first EOS, and no-EOS."""
    for position, token in enumerate(new_tokens):
        if int(token) in eos_ids:
            return position, False
    return len(new_tokens), True


@dataclass(frozen=True)
class Decoding:
    """How every chat-formatted row is decoded: at most ``max_new_tokens`` new tokens, greedily or
    (``do_sample``) drawn from ``softmax(logits / temperature)`` over the whole vocabulary,
    ``num_return_sequences`` completions per row, reproducibly when ``seed`` is set (module
    docstring). Every engine takes these settings (:class:`GenerationEngine`)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    seed: int | None = None
    num_return_sequences: int = 1


def _check_request(prompts: PromptSet, batch_size: int, decoding: Decoding) -> None:
    """Refuse an empty prompt set, a batch size below 1 or a bad decoding setting."""
    d = decoding
    if len(prompts) == 0:
        raise LensSafetyError("no prompts to generate from", "pass at least one prompt")
    if d.max_new_tokens < 1:
        raise LensSafetyError(
            f"max_new_tokens must be >= 1, got {d.max_new_tokens}", "pass a positive --max-new-tokens"
        )
    if batch_size < 1:
        raise LensSafetyError(f"batch_size must be >= 1, got {batch_size}", "pass a positive batch size")
    if d.num_return_sequences < 1:
        raise LensSafetyError(
            f"num_return_sequences must be >= 1, got {d.num_return_sequences}", "pass a positive number"
        )
    if d.num_return_sequences > 1 and not d.do_sample:
        raise LensSafetyError(
            "greedy decoding returns one completion per prompt", "pass do_sample=True to draw several"
        )
    if d.do_sample and not d.temperature > 0:
        raise LensSafetyError(
            f"temperature must be > 0 when sampling, got {d.temperature}", "pass a positive temperature"
        )


def _generate_batch(
    model: ChatModel,
    input_ids: Int[torch.Tensor, "batch seq"],
    attention_mask: Int[torch.Tensor, "batch seq"],
    decoding: Decoding,
    *,
    suppress_first_tokens: Sequence[int] | None = None,
    cache: Cache | None = None,
    first_log_probs: bool = False,
) -> tuple[Int[torch.Tensor, "batch_times_k new"], Float[torch.Tensor, "batch_times_k vocab"] | None]:
    """New token ids (and the first step's float64 log-probabilities with ``first_log_probs``);
    ``cache``: the KV cache of the batch's shared prefix (:class:`~lens_safety.forward_pass.PrefixedBatch`)."""
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": decoding.temperature, "top_k": None, "top_p": None}
        if decoding.do_sample
        else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    )
    output = model.hf_model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        max_new_tokens=decoding.max_new_tokens,
        min_new_tokens=0,
        num_return_sequences=decoding.num_return_sequences,
        pad_token_id=int(model.tokenizer.pad_token_id),
        use_cache=True,
        **({"begin_suppress_tokens": list(suppress_first_tokens)} if suppress_first_tokens else {}),
        **({cache_argument(model): cache} if cache is not None else {}),
        **({"output_logits": True, "return_dict_in_generate": True} if first_log_probs else {}),
        **sampling,
    )
    if not first_log_probs:
        return output[:, input_ids.shape[1] :].cpu(), None
    first = torch.log_softmax(output.logits[0].double(), dim=-1).cpu()
    return output.sequences[:, input_ids.shape[1] :].cpu(), first


class GenerationEngine(Protocol):
    """An engine other than the bridge's wrapped Hugging Face model that decodes the same
    chat-formatted token rows (e.g. :class:`lens_safety.evaluation.vllm_engine.VLLMEngine`).

    It generates from the checkpoint on disk, so it sees neither interventions nor in-memory edits
    (:func:`generate` refuses an intervention with an engine)."""

    name: str

    def sample(
        self, model: ChatModel, rows: list[list[int]], decoding: Decoding, *, progress: bool
    ) -> list[list[int]]:
        """New token ids of every completion, prompt-major (``decoding.num_return_sequences`` per row)."""
        ...


def _hf_rows(
    model: ChatModel,
    rows: list[list[int]],
    decoding: Decoding,
    batch_size: int,
    intervention: Intervention | None,
    progress: bool,
    share_prefix: bool = False,
    **batch_options: Any,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """New token ids of every completion from the bridge's wrapped model, batch by batch, and the
    first step's log-probabilities of each batch (with ``first_log_probs`` in ``batch_options``)."""
    out: list[list[int]] = []
    firsts: list[torch.Tensor] = []
    n_batches = -(-len(rows) // batch_size)
    for start in track(range(0, len(rows), batch_size), "generating", total=n_batches, enabled=progress):
        chunk = rows[start : start + batch_size]
        with intervention() if intervention is not None else nullcontext():
            prefixed = shared_prefix_batch(model, chunk) if share_prefix else None
            batch = model.chat.pad(chunk) if prefixed is None else prefixed.batch
            cache = None if prefixed is None else prefixed.cache
            new, first = _generate_batch(
                model, batch.input_ids, batch.attention_mask, decoding, cache=cache, **batch_options
            )
        out += new.tolist()
        firsts += [] if first is None else [first]
    return out, firsts


def _check_engine(
    engine: GenerationEngine | None,
    intervention: Intervention | None,
    suppress_first_tokens: Sequence[int] | None,
    first_log_probs: bool,
) -> None:
    """Refuse what an engine decoding from the checkpoint on disk cannot do."""
    if engine is not None and (intervention is not None or suppress_first_tokens or first_log_probs):
        raise LensSafetyError(
            f"the {engine.name} engine generates from the checkpoint on disk and cannot apply "
            "an intervention, suppress first tokens or return first-token log-probabilities",
            "generate with the Hugging Face engine (engine=None, --engine hf) for this run",
        )


def _new_rows(
    model: ChatModel,
    rows: list[list[int]],
    engine: GenerationEngine | None,
    decoding: Decoding,
    progress: bool,
    hf_options: dict[str, Any],
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """New token ids of every completion from ``engine`` or, without one, from :func:`_hf_rows`
    (with ``hf_options``) under inference mode, and the first step's log-probabilities of each HF
    batch. With ``decoding.seed`` the HF run seeds the torch RNG (CPU and every CUDA device of the
    model) and restores it afterwards."""
    if engine is not None:
        return engine.sample(model, rows, decoding, progress=progress), []
    seed = decoding.seed
    devices = [device for device in model.devices if device.type == "cuda"]
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        return _hf_rows(model, rows, decoding, progress=progress, **hf_options)


def _decode(
    model: ChatModel, new_rows: list[list[int]], eos_ids: set[int]
) -> tuple[list[str], list[list[int]], list[tuple[int, bool]]]:
    """Completions (text), their token ids up to the first EOS, and ``(n_tokens, truncated)`` per row."""
    lengths = [completion_length(row, eos_ids) for row in new_rows]
    token_ids = [row[:n] for row, (n, _) in zip(new_rows, lengths, strict=True)]
    completions = [str(model.tokenizer.decode(ids, skip_special_tokens=True)).strip() for ids in token_ids]
    return completions, token_ids, lengths


def generate(
    model: ChatModel,
    prompts: PromptSource,
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    system_prompt: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    num_return_sequences: int = 1,
    intervention: Intervention | None = None,
    suppress_first_tokens: Sequence[int] | None = None,
    progress: bool = False,
    engine: GenerationEngine | None = None,
    share_prefix: bool = False,
    first_log_probs: bool = False,
) -> Generations:
    """Generate completions for instructions, in left-padded batches with the KV cache.

    Args:
        model: a loaded :class:`~lens_safety.models.ChatModel`.
        prompts: instructions (formatted here with the chat template).
        max_new_tokens: new tokens per completion at most.
        batch_size: prompts per ``generate`` call.
        system_prompt: overrides the formatter's default system prompt.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (ignored when greedy).
        seed: makes sampling reproducible (the global RNG state is restored afterwards).
        num_return_sequences: completions per prompt (sampling only).
        intervention: factory of a context manager active during generation (e.g.
            ``lambda: add_direction(model, r, layer=l, coeff=c)``); you may instead wrap the call in
            the context manager yourself.
        suppress_first_tokens: token ids the FIRST new token may not be (e.g.
            :func:`~lens_safety.selection.refusal_token_ids`: answers that cannot open with a refusal).
        progress: show a progress bar.
        engine: decode with another engine (:class:`GenerationEngine`, e.g. vLLM) instead of the
            bridge's model: same prompts, same post-processing; no intervention, no first-token
            suppression.
        share_prefix: compute each batch's shared leading tokens once (module docstring; only
            under hooks that treat every position alike; not with ``num_return_sequences > 1``).
        first_log_probs: keep the first new token's log-probabilities
            (:attr:`Generations.first_log_probs`; not with an engine).
    """
    prompt_set = PromptSet.load(prompts) if not isinstance(prompts, PromptSet) else prompts
    decoding = Decoding(max_new_tokens, do_sample, temperature, seed, num_return_sequences)
    _check_request(prompt_set, batch_size, decoding)
    _check_engine(engine, intervention, suppress_first_tokens, first_log_probs)
    rows = [model.chat.token_ids(model.chat.format(p, system_prompt)) for p in prompt_set.prompts]
    model.chat.check_fit(rows, extra_tokens=max_new_tokens, name=prompt_set.source)
    eos_ids = end_of_sequence_ids(model)
    hf_options: dict[str, Any] = {
        "batch_size": batch_size,
        "intervention": intervention,
        "share_prefix": share_prefix and num_return_sequences == 1,
        "suppress_first_tokens": suppress_first_tokens,
        "first_log_probs": first_log_probs,
    }
    started = time.perf_counter()
    new_rows, firsts = _new_rows(model, rows, engine, decoding, progress, hf_options)
    completions, token_ids, lengths = _decode(model, new_rows, eos_ids)
    seconds = time.perf_counter() - started
    return Generations(
        prompts=prompt_set.prompts,
        completions=completions,
        n_tokens=[n for n, _ in lengths],
        truncated=[cut for _, cut in lengths],
        prompt_index=[i for i in range(len(prompt_set)) for _ in range(num_return_sequences)],
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        seed=seed,
        num_return_sequences=num_return_sequences,
        system_prompt=system_prompt,
        seconds=seconds,
        token_ids=token_ids,
        first_log_probs=torch.cat(firsts) if firsts else None,
    )
