"""Best-of-N with a ranker: sample N candidates, one forward pass for features, pick the best.

:func:`select` generates ``n`` candidates with the model's own decoding (sampling, seeded),
deduplicates them, reads their features in ONE batched pass that stops at the ranker's layer
(``with_instruction``: the prompt's last token and each response's last token in the same pass;
``generated``: no extra pass, the features are read while sampling), scores them and returns the
whole ranking. The ranker's overhead is reported as
``ranking_seconds / generation_seconds`` (features + ranker forward, over candidate generation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import generate
from lens_safety.models import ChatModel
from lens_safety.records import Record
from lens_safety.srr.capture import sample_with_states
from lens_safety.srr.data import first_occurrences
from lens_safety.srr.features import SAMPLED_CONTEXTS, list_features
from lens_safety.srr.inputs import hashed_text_features
from lens_safety.srr.metrics import ranking
from lens_safety.srr.ranker import SafetyRanker, check_base_model, load_ranker


@dataclass
class RankedCandidate(Record):
    """One candidate: its sampling index (after deduplication), text and ranker score."""

    index: int
    text: str
    score: float


@dataclass
class BestOfN:
    """Result of best-of-N: the chosen response, the full ranking (best first) and the timings."""

    prompt: str
    chosen: str
    ranking: list[RankedCandidate]
    n_sampled: int
    generation_seconds: float
    ranking_seconds: float

    @property
    def overhead_fraction(self) -> float:
        """Ranker time (features + scoring) as a fraction of candidate generation time."""
        return self.ranking_seconds / self.generation_seconds if self.generation_seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "chosen": self.chosen,
            "ranking": [x.to_dict() for x in self.ranking],
            "n_sampled": self.n_sampled,
            "generation_seconds": self.generation_seconds,
            "ranking_seconds": self.ranking_seconds,
            "overhead_fraction": self.overhead_fraction,
        }


def score_candidates(
    model: ChatModel, ranker: SafetyRanker, prompt: str, candidates: list[str]
) -> torch.Tensor:
    """Ranker scores of ``candidates`` for ``prompt`` (features read from ``model``)."""
    cfg = ranker.config
    if cfg.features == "text":
        inst = hashed_text_features([prompt], cfg.d_input)
        resp = hashed_text_features(candidates, cfg.d_input)
    else:
        if cfg.layer is None:
            raise LensSafetyError(
                "the ranker records no feature layer", "retrain it with `lens-safety srr train`"
            )
        h_inst, h_resp = list_features(model, prompt, candidates, [cfg.layer], [cfg.context])
        inst, resp = h_inst[:1, :], h_resp[cfg.context][:, 0]
    ranker.eval()
    with torch.no_grad():
        return ranker(inst, resp.unsqueeze(0))[0]


def select(
    model: ChatModel,
    ranker: SafetyRanker | str | Path,
    prompt: str,
    *,
    n: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int | None = None,
) -> BestOfN:
    """Sample ``n`` answers to ``prompt`` and return them ranked by the ranker, best first.

    ``ranker`` may be a loaded :class:`SafetyRanker` or its directory; either way a ranker trained
    on another base model is refused.
    """
    if isinstance(ranker, str | Path):
        ranker = load_ranker(ranker, model)
    elif ranker.base_model is not None:
        check_base_model(ranker.base_model, model.identity(), Path("<in memory>"))
    if n < 1:
        raise LensSafetyError(f"n must be >= 1, got {n}", "pass a positive --n")
    sampled = None
    if ranker.config.features != "text" and ranker.config.context in SAMPLED_CONTEXTS:
        if ranker.config.layer is None:
            raise LensSafetyError(
                "the ranker records no feature layer", "retrain it with `lens-safety srr train`"
            )
        sampled = sample_with_states(
            model,
            [prompt],
            n=n,
            layers=[ranker.config.layer],
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=1,
            pooled=ranker.config.context == "generated_mean",
        )
        gens = sampled.generations
    else:
        gens = generate(
            model,
            [prompt],
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            seed=seed,
            num_return_sequences=n,
            batch_size=1,
        )
    keep = first_occurrences(gens.completions)
    candidates = [gens.completions[i] for i in keep]
    started = time.perf_counter()
    if sampled is not None:  # features were read while sampling: only the ranker runs now
        ranker.eval()
        with torch.no_grad():
            layer = sampled.layers.index(int(ranker.config.layer))  # type: ignore[arg-type]
            inst = sampled.instruction[:1, layer]
            resp = sampled.response_states(ranker.config.context)[keep, layer]
            scores = ranker(inst, resp.unsqueeze(0))[0]
    else:
        scores = score_candidates(model, ranker, prompt, candidates)
    ranking_seconds = time.perf_counter() - started
    ranked = [RankedCandidate(i, candidates[i], float(scores[i])) for i in ranking(scores)]
    return BestOfN(prompt, ranked[0].text, ranked, n, gens.seconds, ranking_seconds)
