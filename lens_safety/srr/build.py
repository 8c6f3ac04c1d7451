"""Build SRR candidate lists: sample, deduplicate, wrap, label and featurise.

:func:`build_dataset` samples ``n`` candidates per instruction (seeded, temperature option),
deduplicates them (whitespace-normalised exact text), optionally wraps a deterministic fraction of
the HARMFUL instructions in a jailbreak template (to obtain unsafe candidates from a model that
mostly refuses), labels every candidate (:mod:`lens_safety.srr.labels`) and reads the features
(:mod:`lens_safety.srr.features`: one batched pass per list and post-hoc context; the sampled
contexts are read while sampling, :mod:`lens_safety.srr.capture`). The result is an
:class:`~lens_safety.srr.data.SRRDataset`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import GenerationEngine
from lens_safety.evaluation.jailbreaks import load_jailbreak_templates
from lens_safety.evaluation.judges import Judge, get_judge
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.prompts import PromptSet, PromptSource
from lens_safety.srr.capture import SampledStates, sample_with_states
from lens_safety.srr.data import CandidateList, SRRDataset, first_occurrences
from lens_safety.srr.features import (
    CONTEXTS,
    POST_HOC_CONTEXTS,
    SAMPLED_CONTEXTS,
    check_context,
    check_layers,
    default_ranker_layer,
    list_features,
)
from lens_safety.srr.labels import label_candidates


def _unit_hash(*parts: object) -> float:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def wrap_harmful(prompts: PromptSet, fraction: float, seed: int) -> list[tuple[str, str | None]]:
    """``(prompt, template id)`` per instruction: a deterministic ``fraction`` are jailbreak-wrapped."""
    if not 0.0 <= fraction <= 1.0:
        raise LensSafetyError(
            f"jailbreak fraction {fraction} is outside [0, 1]", "pass a fraction such as 0.5"
        )
    templates = load_jailbreak_templates("builtin")
    out: list[tuple[str, str | None]] = []
    for text in prompts.prompts:
        if _unit_hash("wrap", seed, text) < fraction:
            template = templates[int(_unit_hash("template", seed, text) * len(templates))]
            out.append((template.wrap(text), template.id))
        else:
            out.append((text, None))
    return out


def default_layers(model: ChatModel, ranker_layer: int | None = None) -> tuple[int, ...]:
    """Every third layer, the final (pre-norm) residual stream and the default ranker layer."""
    layers = set(range(0, model.n_layers + 1, 3)) | {model.n_layers, default_ranker_layer(model)}
    if ranker_layer is not None:
        layers.add(ranker_layer)
    return tuple(sorted(layers))


def build_dataset(
    model: ChatModel,
    harmful: PromptSource | None,
    harmless: PromptSource | None,
    *,
    n: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    jailbreak_fraction: float = 0.5,
    judge: Judge | str | None = None,
    layers: Sequence[int] | None = None,
    contexts: Sequence[str] = CONTEXTS,
    progress: bool = False,
    engine: GenerationEngine | None = None,
) -> SRRDataset:
    """Sample, deduplicate, label and featurise candidate lists for harmful and harmless instructions.

    Args:
        model: the frozen model that generates AND encodes the candidates.
        harmful, harmless: instructions (PromptSet, list, file path or ``builtin:…`` spec); either
            may be ``None`` (e.g. extra harmless-only lists), not both.
        n: candidates sampled per instruction (before deduplication).
        temperature: sampling temperature (whole vocabulary, no top-k / top-p).
        max_new_tokens: length cap of a candidate.
        seed: seeds sampling and the choice of jailbreak-wrapped instructions.
        jailbreak_fraction: fraction of harmful instructions wrapped in a jailbreak template.
        judge: refusal judge (default: the substring judge).
        layers: feature layers (default :func:`default_layers`).
        contexts: response encodings to store (``with_instruction``, ``response_only``,
            ``generated`` / ``generated_mean``: read while sampling, see
            :mod:`lens_safety.srr.capture`).
        engine: sample the candidates with another engine (e.g.
            :class:`~lens_safety.evaluation.vllm_engine.VLLMEngine`); every feature is then read
            by the bridge from the sampled tokens (teacher forcing).
    """
    started = time.perf_counter()
    judge_obj = get_judge(judge)
    harmful_set = PromptSet((), "harmful:none") if harmful is None else PromptSet.load(harmful)
    harmless_set = PromptSet((), "harmless:none") if harmless is None else PromptSet.load(harmless)
    layer_ids = check_layers(model, layers if layers is not None else default_layers(model))
    if not contexts:
        raise LensSafetyError("no response context to store", f"pass some of {', '.join(CONTEXTS)}")
    for context in contexts:
        check_context(context)
    specs = _instruction_specs(harmful_set, harmless_set, jailbreak_fraction, seed)
    if n < 2:
        raise LensSafetyError(
            f"n = {n} candidates cannot be ranked", "sample at least 2 candidates per instruction (--n)"
        )
    capture = layer_ids if set(contexts) & set(SAMPLED_CONTEXTS) else ()
    sampled = sample_with_states(
        model,
        [spec[0] for spec in specs],
        n=n,
        layers=capture,
        max_new_tokens=max_new_tokens,
        batch_size=max(1, 64 // n),
        temperature=temperature,
        seed=seed,
        progress=progress,
        pooled="generated_mean" in contexts,
        engine=engine,
    )
    generation_seconds = time.perf_counter() - started
    samples, states = sampled.generations.grouped(), sampled if capture else None
    lists, inst_rows, resp_rows, offsets = _featurise(
        model, judge_obj, specs, samples, states, layer_ids, contexts, progress
    )
    settings: dict[str, Any] = {"n": n, "temperature": temperature, "max_new_tokens": max_new_tokens}
    settings.update(seed=seed, jailbreak_fraction=jailbreak_fraction, judge=judge_obj.name)
    settings.update(engine=engine.name if engine is not None else "hf")
    meta = _meta(model, settings, (harmful_set, harmless_set), generation_seconds, started)
    return SRRDataset(
        lists, layer_ids, inst_rows, {c: torch.cat(v) for c, v in resp_rows.items()}, offsets, meta
    )


def _meta(
    model: ChatModel,
    settings: dict[str, Any],
    prompts: tuple[PromptSet, PromptSet],
    generation_seconds: float,
    started: float,
) -> dict[str, Any]:
    """A dataset's ``meta.json``: the model's identity, the settings, the prompt sets, the feature
    basis and the time taken (``started``: ``time.perf_counter()`` at the start of the build)."""
    n_layers = model.n_layers
    return {
        "model": model.identity(),
        "settings": settings,
        "prompts": {"harmful": prompts[0].metadata(), "harmless": prompts[1].metadata()},
        "space": "raw_hf",
        "feature_layers_note": f"0..{n_layers - 1} = hook_resid_pre; {n_layers} = final resid_post (pre-norm)",
        "generation_seconds": generation_seconds,
        "total_seconds": time.perf_counter() - started,
    }


#: one instruction to sample for: (prompt given, source instruction, kind, category, jailbreak id)
_Spec = tuple[str, str, str, str | None, str | None]


def _instruction_specs(
    harmful: PromptSet, harmless: PromptSet, jailbreak_fraction: float, seed: int
) -> list[_Spec]:
    """The harmful instructions (a deterministic fraction jailbreak-wrapped), then the harmless."""
    wrapped = wrap_harmful(harmful, jailbreak_fraction, seed)
    specs: list[_Spec] = [
        (p, src, "harmful", cat, jb)
        for (p, jb), src, cat in zip(
            wrapped, harmful.prompts, harmful.categories or [None] * len(harmful), strict=True
        )
    ]
    specs += [
        (p, p, "harmless", cat, None)
        for p, cat in zip(harmless.prompts, harmless.categories or [None] * len(harmless), strict=True)
    ]
    if not specs:
        raise LensSafetyError("no instructions to build lists from", "pass harmful and/or harmless prompts")
    return specs


def _featurise(
    model: ChatModel,
    judge: Judge,
    specs: list[_Spec],
    samples: list[list[str]],
    sampled: SampledStates | None,
    layer_ids: tuple[int, ...],
    contexts: Sequence[str],
    progress: bool,
) -> tuple[list[CandidateList], torch.Tensor, dict[str, list[torch.Tensor]], list[int]]:
    """Deduplicate and label each instruction's candidates and gather their features: the lists,
    the instruction features ``[n_lists, n_layers, d]``, per context the response features of
    each list, and the lists' offsets into the response rows. ``samples`` holds each instruction's
    ``n`` drawn completions, ``sampled`` the states read while sampling them (``None`` when no
    sampled context is stored)."""
    post_hoc = [c for c in contexts if c in POST_HOC_CONTEXTS]
    lists: list[CandidateList] = []
    inst_rows: list[torch.Tensor] = []
    resp_rows: dict[str, list[torch.Tensor]] = {c: [] for c in contexts}
    offsets = [0]
    for i, ((prompt, source, kind, category, jb), drawn) in enumerate(
        track(list(zip(specs, samples, strict=True)), "reading features", len(specs), progress)
    ):
        keep = first_occurrences(drawn)
        candidates = [drawn[j] for j in keep]
        positive, reasons = label_candidates(judge, kind, prompt, candidates)
        lists.append(
            CandidateList(prompt, source, kind, category, jb, candidates, positive, reasons, len(drawn))
        )
        h_resp: dict[str, torch.Tensor] = {}
        if post_hoc:
            h_inst, h_resp = list_features(model, prompt, candidates, layer_ids, post_hoc)
        if sampled is not None:
            rows = [i * len(drawn) + j for j in keep]
            h_resp.update({c: sampled.response_states(c)[rows] for c in SAMPLED_CONTEXTS if c in contexts})
            h_inst = h_inst if post_hoc else sampled.instruction[i]
        inst_rows.append(h_inst)
        for context in contexts:
            resp_rows[context].append(h_resp[context])
        offsets.append(offsets[-1] + len(candidates))
    return lists, torch.stack(inst_rows), resp_rows, offsets
