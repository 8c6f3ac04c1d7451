"""Generation engines of the safeguard server: who samples the N candidates.

An :class:`Engine` samples ``n`` completions for each of several instructions in one call, with
the same settings (one :class:`~lens_safety.evaluation.generation.Decoding`, sampled). It also returns the ranker's ``generated`` /
``generated_mean`` features (:class:`Capture`, :mod:`lens_safety.srr.capture`) when asked; an
engine that cannot (``exposes_states = False``) serves only rankers whose features come from a
separate teacher-forced pass (``with_instruction``, ``response_only``) or from text.

:class:`GenerateEngine` is :func:`lens_safety.srr.capture.sample_with_states`, the sampling of
``srr build-data``, on the loaded :class:`~lens_safety.models.ChatModel`:

* ``hf``: decoded by the bridge's Hugging Face model, the features read by hooks WHILE sampling
  (no extra pass); a seeded request alone in its batch reproduces ``generate(model, [prompt],
  do_sample=True, seed=s, num_return_sequences=n)``;
* ``vllm``: decoded by :class:`~lens_safety.evaluation.vllm_engine.VLLMEngine` from the checkpoint
  on disk (the ``vllm`` extra), the same features read afterwards by ONE teacher-forced bridge
  pass over ``prompt + candidate`` (:func:`~lens_safety.srr.capture.teacher_forced_states`: the
  same maths, another order of floating-point sums); vLLM's seeded draws are its own random
  stream, not the Hugging Face engine's.

Other engines register a factory in :data:`ENGINES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from jaxtyping import Float

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import Decoding, GenerationEngine
from lens_safety.evaluation.vllm_engine import VLLMEngine, require_vllm
from lens_safety.models import ChatModel
from lens_safety.srr.capture import sample_with_states


@dataclass(frozen=True)
class Capture:
    """Features to read while sampling: one feature layer (``0 .. n_layers``), and with ``pooled``
    the mean over the response tokens (``generated_mean``) instead of the last read token."""

    layer: int
    pooled: bool


@dataclass
class EngineOutput:
    """Completions of one call, prompt-major: completion ``j`` of prompt ``i`` at ``i * n + j``.

    ``instruction`` / ``responses`` are the captured features at the capture layer (raw HF basis),
    ``None`` when nothing was captured.
    """

    completions: list[str]
    n_tokens: list[int]
    truncated: list[bool]
    seconds: float
    instruction: Float[torch.Tensor, "n_prompts d_model"] | None = None
    responses: Float[torch.Tensor, "n_completions d_model"] | None = None


class Engine(Protocol):
    """Samples candidates; owned by one worker thread (never called concurrently); ``close`` runs
    once at shutdown, after the last call."""

    name: str
    exposes_states: bool

    def sample(
        self, instructions: Sequence[str], decoding: Decoding, capture: Capture | None
    ) -> EngineOutput: ...

    def close(self) -> None: ...


class GenerateEngine:
    """Sampling through :func:`~lens_safety.srr.capture.sample_with_states` (module docstring):
    the bridge's Hugging Face model, or ``decoder`` (e.g. a vLLM engine) with teacher-forced features."""

    exposes_states = True

    def __init__(self, model: ChatModel, decoder: GenerationEngine | None = None) -> None:
        self.model = model
        self.decoder = decoder
        self.name = "hf" if decoder is None else decoder.name

    def sample(
        self, instructions: Sequence[str], decoding: Decoding, capture: Capture | None
    ) -> EngineOutput:
        started = time.perf_counter()
        sampled = sample_with_states(
            self.model,
            list(instructions),
            n=decoding.num_return_sequences,
            layers=[capture.layer] if capture is not None else (),
            temperature=decoding.temperature,
            max_new_tokens=decoding.max_new_tokens,
            seed=decoding.seed,
            batch_size=len(instructions)
            if self.decoder is None
            else 64,  # else: rows per teacher-forced pass
            pooled=capture is not None and capture.pooled,
            engine=self.decoder,
        )
        gens = sampled.generations
        out = EngineOutput(list(gens.completions), list(gens.n_tokens), list(gens.truncated), 0.0)
        if capture is not None:
            out.instruction = sampled.instruction[:, 0]
            out.responses = sampled.response_states("generated_mean" if capture.pooled else "generated")[:, 0]
        out.seconds = time.perf_counter() - started
        return out

    def close(self) -> None:
        """Stop the decoder (a vLLM engine frees its memory); nothing to do for ``hf``."""
        close = getattr(self.decoder, "close", None)
        if close is not None:
            close()


def _vllm(model: ChatModel) -> Engine:
    return GenerateEngine(model, VLLMEngine(model))


#: engine name -> factory; another engine (e.g. vLLM) registers here
ENGINES: dict[str, Callable[[ChatModel], Engine]] = {"hf": GenerateEngine, "vllm": _vllm}


def check_engine(name: str) -> None:
    """Raise a one-line error unless an engine called ``name`` is registered."""
    if name not in ENGINES:
        raise LensSafetyError(
            f"unknown generation engine '{name}'", f"use one of {', '.join(sorted(ENGINES))}"
        )
    if name == "vllm":
        require_vllm()  # before the model loads: one line saying how to install it


def load_engine(name: str, model: ChatModel) -> Engine:
    """The engine called ``name`` on ``model``, or a one-line error naming the ones available."""
    check_engine(name)
    return ENGINES[name](model)
