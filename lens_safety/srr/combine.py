"""Combine candidate-list datasets built separately (more prompts, more seeds) into one.

Lists are only comparable when they were sampled from, and encoded by, the same frozen model in
the same basis at the same layers: :func:`concat_datasets` checks the recorded model identity
(``weights_sha256``), the feature space and the stored layers, and keeps the response contexts that
every part stores (a context missing from one part cannot be used for training on the whole). The
result records each part's provenance under ``meta["parts"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lens_safety.errors import LensSafetyError
from lens_safety.srr.data import SRRDataset


def _model_key(dataset: SRRDataset) -> Any:
    model = dataset.meta.get("model") or {}
    return model.get("weights_sha256") or model.get("spec")


def concat_datasets(datasets: Sequence[SRRDataset], names: Sequence[str] | None = None) -> SRRDataset:
    """One dataset holding every list of ``datasets`` in order (features concatenated).

    Raises a :class:`~lens_safety.errors.LensSafetyError` when the parts were built by different
    models, in different spaces, at different layers, or share no response context.
    """
    parts = list(datasets)
    if not parts:
        raise LensSafetyError("no datasets to combine", "pass at least one SRR data directory")
    if len(parts) == 1:
        return parts[0]
    labels = list(names) if names is not None else [f"part {i}" for i in range(len(parts))]
    first = parts[0]
    for label, part in zip(labels[1:], parts[1:], strict=True):
        if _model_key(part) != _model_key(first):
            raise LensSafetyError(
                f"{label} was built with another model than {labels[0]}",
                "build every data directory with the same model (same weights)",
            )
        if part.meta.get("space") != first.meta.get("space"):
            raise LensSafetyError(
                f"{label} stores features in another space than {labels[0]}",
                "rebuild it with the same lens-safety version",
            )
        if tuple(part.layers) != tuple(first.layers):
            raise LensSafetyError(
                f"{label} stores layers {list(part.layers)}, {labels[0]} stores {list(first.layers)}",
                "rebuild with the same --layers",
            )
    contexts = sorted(set.intersection(*(set(p.responses) for p in parts)))
    if not contexts:
        raise LensSafetyError(
            "the data directories share no response context", "rebuild them storing the same contexts"
        )
    offsets = [0]
    for part in parts:
        start = offsets[-1]
        offsets.extend([start + x for x in part.offsets[1:]])
    meta = {
        key: value for key, value in first.meta.items() if key in ("model", "space", "feature_layers_note")
    }
    meta["parts"] = [
        {
            "name": label,
            "settings": p.meta.get("settings"),
            "prompts": p.meta.get("prompts"),
            "counts": p.counts(),
        }
        for label, p in zip(labels, parts, strict=True)
    ]
    return SRRDataset(
        [item for part in parts for item in part.lists],
        first.layers,
        torch.cat([p.instruction for p in parts]),
        {c: torch.cat([p.responses[c] for p in parts]) for c in contexts},
        offsets,
        meta,
    )


def load_datasets(directories: Sequence[str | Path]) -> SRRDataset:
    """Load one or several SRR data directories as one dataset (see :func:`concat_datasets`)."""
    paths = [Path(d) for d in directories]
    return concat_datasets([SRRDataset.load(p) for p in paths], [str(p) for p in paths])
