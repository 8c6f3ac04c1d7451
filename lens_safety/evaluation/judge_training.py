"""Training the learned judge: features, layer choice on validation, probe, calibration, file.

Deterministic: the same data, reader and settings give the same weights (no random state: the
splits are hashes, the folds are :func:`~lens_safety.splits.stratified_folds`, the fit is lbfgs).

1. Read the ``train`` and ``val`` pairs of the data (:mod:`~lens_safety.evaluation.judge_data`;
   ``test`` rows are never read here). With ``with_promptless``, every pair is also used a second
   time without its prompt, so the judge works on labelled files that carry no prompts.
2. Features of every pair at the union of the candidate layer sets, one reader pass
   (:func:`~lens_safety.evaluation.learned_features.pair_features`; with ``relevance``, each
   layer's block also compares the prompt's mean state with the response's).
3. For each candidate layer set, in order: standardise on ``train``, fit the probe on ``train``
   (C chosen by 5-fold CV there, unless ``regularization`` fixes it), measure accuracy on ``val``.
   The first best set wins.
4. With that set: standardise and fit on ``train`` + ``val`` (C by CV again); out-of-fold logits
   of the same data (5 stratified folds, same C) give the Platt calibration ``(a, c)``.
5. With ``relevance`` (and without ``with_promptless``): steps 3-4 again on the response-mean
   columns alone, without the pairs whose label depends on the prompt
   (:data:`~lens_safety.evaluation.judge_data.PROMPT_DEPENDENT_KINDS`), give the fallback probe
   the judge uses for pairs that come without a prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.judge_data import (
    PROMPT_DEPENDENT_KINDS,
    TRAIN_FILE,
    LabelledPair,
    in_splits,
    load_pairs,
    pairs_sha256,
)
from lens_safety.evaluation.learned_features import FeatureSpec, pair_features
from lens_safety.evaluation.learned_judge import STD_FLOOR, JudgeWeights
from lens_safety.evaluation.logistic import fit_logistic
from lens_safety.fsutil import require_free, staged_directory, write_file_atomic
from lens_safety.models import ChatModel, load_model
from lens_safety.splits import stratified_folds

#: Layer sets tried, cheapest first (a read stops after its deepest layer).
CANDIDATE_LAYERS: tuple[tuple[int, ...], ...] = ((10,), (12,), (14,), (16,))
CALIBRATION_C = 1000.0


@dataclass
class TrainSettings:
    """What :func:`train_learned_judge` fits (module docstring)."""

    data: Path = TRAIN_FILE
    reader: str = "smollm2"
    candidates: tuple[tuple[int, ...], ...] = CANDIDATE_LAYERS
    max_prompt_tokens: int = 128
    max_response_tokens: int = 384
    with_promptless: bool = False
    relevance: bool = True
    regularization: float | Literal["cv"] = "cv"
    batch_size: int = 8
    limit: int | None = None
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": Path(self.data).name,
            "reader": self.reader,
            "candidates": [list(c) for c in self.candidates],
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_response_tokens": self.max_response_tokens,
            "with_promptless": self.with_promptless,
            "relevance": self.relevance,
            "limit": self.limit,
            "regularization": self.regularization,
        }


@dataclass
class JudgeTraining:
    """The trained judge, where it was written, and the layer selection on validation."""

    weights: JudgeWeights
    path: Path | None
    selection: list[dict[str, Any]]
    settings: TrainSettings
    n_train: int
    n_val: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "spec": self.weights.spec.to_dict(),
            "reader_sha256": self.weights.reader_sha256,
            "data_sha256": self.weights.data_sha256,
            "regularization": self.weights.info.get("regularization"),
            "calibration": list(self.weights.calibration),
            "selection": self.selection,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "settings": self.settings.to_dict(),
        }


def _columns(spec_layers: Sequence[int], chosen: Sequence[int], block: int) -> list[int]:
    """The feature columns of the ``chosen`` layers in a vector read at ``spec_layers`` (``block`` per layer)."""
    return [spec_layers.index(layer) * block + k for layer in chosen for k in range(block)]


def _standardiser(x: Float[torch.Tensor, "n w"]) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0, unbiased=False).clamp_min(STD_FLOOR)


def _fit(
    x: Float[torch.Tensor, "n w"],
    y: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    c: float | str = "cv",
) -> tuple[torch.Tensor, float, float]:
    z = (x - mean) / std
    fit = fit_logistic(z[y], z[~y], regularization=c)  # type: ignore[arg-type]
    return torch.from_numpy(fit.weights), fit.bias, fit.regularization


def _out_of_fold_logits(
    x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, c: float
) -> torch.Tensor:
    logits = torch.zeros(len(y), dtype=torch.float64)
    for train, test in stratified_folds(y.numpy().astype(np.float64), 5):
        w, b, _ = _fit(x[train], y[train], mean, std, c)
        logits[test] = ((x[test] - mean) / std) @ w + b
    return logits


def _rows(
    pairs: Sequence[LabelledPair], with_promptless: bool
) -> tuple[list[str | None], list[str], torch.Tensor]:
    prompts: list[str | None] = [p.prompt for p in pairs]
    responses = [p.response for p in pairs]
    labels = [p.label for p in pairs]
    if with_promptless:
        prompts, responses, labels = prompts + [None] * len(pairs), responses * 2, labels * 2
    return prompts, responses, torch.tensor(labels, dtype=torch.bool)


def _check_classes(y: torch.Tensor, part: str) -> None:
    if int(y.sum()) < 2 or int((~y).sum()) < 2:
        raise LensSafetyError(
            f"the {part} pairs need at least 2 refusals and 2 non-refusals",
            "add labelled pairs of both classes",
        )


def _select(
    x: torch.Tensor,
    y: torch.Tensor,
    is_val: torch.Tensor,
    settings: TrainSettings,
    layers: list[int],
    block: int,
) -> tuple[tuple[int, ...], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    for chosen in settings.candidates:
        cols = _columns(layers, chosen, block)
        xt, yt, xv, yv = x[~is_val][:, cols], y[~is_val], x[is_val][:, cols], y[is_val]
        mean, std = _standardiser(xt)
        w, b, c = _fit(xt, yt, mean, std, settings.regularization)
        accuracy = float((((((xv - mean) / std) @ w + b) >= 0) == yv).double().mean())
        rows.append({"layers": list(chosen), "val_accuracy": accuracy, "regularization": c})
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_accuracy"], -i))
    return tuple(settings.candidates[best]), rows


def fit_pairs_of(pairs: Sequence[LabelledPair], settings: TrainSettings) -> list[LabelledPair]:
    """The ``train`` / ``val`` pairs a judge is fitted on (the first ``limit`` per split and class)."""
    fit_pairs = in_splits(pairs, ("train", "val"))
    if settings.limit is None:
        return fit_pairs
    return [
        p
        for part in ("train", "val")
        for label in (True, False)
        for p in [q for q in fit_pairs if q.split == part and q.label == label][: settings.limit]
    ]


def feature_spec_of(settings: TrainSettings) -> FeatureSpec:
    """The spec that reads every candidate layer at once (the union of the candidate sets)."""
    layers = tuple(sorted({layer for chosen in settings.candidates for layer in chosen}))
    return FeatureSpec(
        settings.reader, layers, settings.max_prompt_tokens, settings.max_response_tokens, settings.relevance
    )


def fit_judge(
    reader: ChatModel, pairs: Sequence[LabelledPair], settings: TrainSettings, *, progress: bool = False
) -> JudgeTraining:
    """Fit a judge on the ``train`` / ``val`` pairs with an already loaded reader (module docstring)."""
    fit_pairs = fit_pairs_of(pairs, settings)
    prompts, responses, y = _rows(fit_pairs, settings.with_promptless)
    is_val = torch.tensor([p.split == "val" for p in fit_pairs] * (2 if settings.with_promptless else 1))
    _check_classes(y[~is_val], "train")
    _check_classes(y[is_val], "val")
    spec_all = feature_spec_of(settings)
    x = pair_features(reader, prompts, responses, spec_all, batch_size=settings.batch_size, progress=progress)
    return fit_features(x, fit_pairs, settings, reader.weights_hash, reader.d_model)


def fit_features(
    x: Float[torch.Tensor, "n width"],
    fit_pairs: Sequence[LabelledPair],
    settings: TrainSettings,
    reader_sha256: str,
    d_model: int,
) -> JudgeTraining:
    """Steps 3-4 of the module docstring on features ``x`` read with :func:`feature_spec_of` (one row
    per fitted pair, then one per pair without its prompt with ``with_promptless``)."""
    _, _, y = _rows(fit_pairs, settings.with_promptless)
    is_val = torch.tensor([p.split == "val" for p in fit_pairs] * (2 if settings.with_promptless else 1))
    spec_all = feature_spec_of(settings)
    layers, block = list(spec_all.layers), spec_all.block(d_model)
    chosen, selection = _select(x, y, is_val, settings, layers, block)
    x_all, x = x, x[:, _columns(layers, chosen, block)]
    mean, std = _standardiser(x)
    w, b, c = _fit(x, y, mean, std, settings.regularization)
    oof = _out_of_fold_logits(x, y, mean, std, c)
    platt = fit_logistic(oof[y][:, None], oof[~y][:, None], regularization=CALIBRATION_C)
    spec = FeatureSpec(
        settings.reader, chosen, settings.max_prompt_tokens, settings.max_response_tokens, settings.relevance
    )
    info = {"regularization": c, "n_fit_rows": len(y), "selection": selection}
    weights = JudgeWeights(
        spec,
        mean,
        std,
        w,
        b,
        (float(platt.weights[0]), platt.bias),
        reader_sha256,
        pairs_sha256(fit_pairs),
        info,
    )
    if settings.relevance and not settings.with_promptless:
        weights.fallback = _fallback(x_all, fit_pairs, settings, reader_sha256, d_model)
    n_val = sum(p.split == "val" for p in fit_pairs)
    return JudgeTraining(weights, None, selection, settings, len(fit_pairs) - n_val, n_val)


def _fallback(
    x: Float[torch.Tensor, "n width"],
    fit_pairs: Sequence[LabelledPair],
    settings: TrainSettings,
    reader_sha256: str,
    d_model: int,
) -> JudgeWeights:
    """Step 5: the response-only probe for pairs without a prompt, fitted the same way on the
    response-mean columns of ``x``, without the pairs whose label depends on the prompt."""
    spec = feature_spec_of(settings)
    block = spec.block(d_model)
    plain = [j * block + k for j in range(len(spec.layers)) for k in range(d_model)]
    rows = [i for i, p in enumerate(fit_pairs) if p.kind not in PROMPT_DEPENDENT_KINDS]
    kept = [fit_pairs[i] for i in rows]
    return fit_features(
        x[rows][:, plain], kept, replace(settings, relevance=False), reader_sha256, d_model
    ).weights


def train_learned_judge(
    out: str | Path,
    settings: TrainSettings | None = None,
    *,
    overwrite: bool = False,
    reader: ChatModel | None = None,
    progress: bool = False,
) -> JudgeTraining:
    """Train the learned judge and write ``out/learned_judge.safetensors`` and ``out/training.json``."""
    settings = settings or TrainSettings()
    require_free(out, overwrite)
    pairs = load_pairs(settings.data)
    model = reader if reader is not None else load_model(settings.reader, device=settings.device)
    run = fit_judge(model, pairs, settings, progress=progress)
    with staged_directory(out, overwrite=overwrite) as tmp:
        run.weights.save(tmp / "learned_judge.safetensors")
        write_file_atomic(tmp / "training.json", json.dumps(run.to_dict(), indent=2) + "\n")
    run.path = Path(out) / "learned_judge.safetensors"
    return run
