"""Generation engines of the safeguard server: who samples the N candidates.

An :class:`Engine` samples ``n`` completions for each of several instructions in one call, with
the same settings (:class:`SamplingSettings`). It may also return the ranker's features read
WHILE sampling (:class:`Capture`; the ``generated`` / ``generated_mean`` contexts of
:mod:`lens_safety.srr.capture`): an engine that cannot (``exposes_states = False``) serves only
rankers whose features come from a separate teacher-forced pass (``with_instruction``,
``response_only``) or from text.

:class:`HFEngine` is the in-process Hugging Face engine: :func:`lens_safety.srr.capture.sample_with_states`
on the loaded :class:`~lens_safety.models.ChatModel` (the same sampling as ``srr build-data``, so a
seeded request alone in its batch reproduces ``generate(model, [prompt], do_sample=True, seed=s,
num_return_sequences=n)``). Other engines register in :data:`ENGINES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from jaxtyping import Float

from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel
from lens_safety.srr.capture import sample_with_states


@dataclass(frozen=True)
class SamplingSettings:
    """Settings shared by every instruction of one engine call (requests are grouped by them)."""

    n: int
    temperature: float
    max_new_tokens: int
    seed: int | None = None


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
    """Samples candidates; owned by one worker thread (never called concurrently)."""

    name: str
    exposes_states: bool

    def sample(
        self, instructions: Sequence[str], settings: SamplingSettings, capture: Capture | None
    ) -> EngineOutput: ...


class HFEngine:
    """Sampling with Hugging Face ``generate`` on the loaded model (module docstring)."""

    name = "hf"
    exposes_states = True

    def __init__(self, model: ChatModel) -> None:
        self.model = model

    def sample(
        self, instructions: Sequence[str], settings: SamplingSettings, capture: Capture | None
    ) -> EngineOutput:
        started = time.perf_counter()
        sampled = sample_with_states(
            self.model,
            list(instructions),
            n=settings.n,
            layers=[capture.layer] if capture is not None else (),
            temperature=settings.temperature,
            max_new_tokens=settings.max_new_tokens,
            seed=settings.seed,
            batch_size=len(instructions),
            pooled=capture is not None and capture.pooled,
        )
        gens = sampled.generations
        out = EngineOutput(list(gens.completions), list(gens.n_tokens), list(gens.truncated), 0.0)
        if capture is not None:
            out.instruction = sampled.instruction[:, 0]
            out.responses = sampled.response_states("generated_mean" if capture.pooled else "generated")[:, 0]
        out.seconds = time.perf_counter() - started
        return out


#: engine name -> factory; another engine (e.g. vLLM) registers here
ENGINES: dict[str, Callable[[ChatModel], Engine]] = {"hf": HFEngine}


def check_engine(name: str) -> None:
    """Raise a one-line error unless an engine called ``name`` is registered."""
    if name not in ENGINES:
        hint = (
            "the vLLM engine is not part of this version of lens-safety; use --engine hf"
            if name == "vllm"
            else f"use one of {', '.join(sorted(ENGINES))}"
        )
        raise LensSafetyError(f"unknown generation engine '{name}'", hint)


def load_engine(name: str, model: ChatModel) -> Engine:
    """The engine called ``name`` on ``model``, or a one-line error naming the ones available."""
    check_engine(name)
    return ENGINES[name](model)
