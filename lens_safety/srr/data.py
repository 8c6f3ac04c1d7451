"""SRR candidate lists and their hidden-state features, cached on disk.

A :class:`SRRDataset` holds every list (built by :func:`lens_safety.srr.build.build_dataset`), with
``mixed`` marking those with at least one positive and one negative; training and evaluation use
the mixed lists (:meth:`SRRDataset.mixed`). On disk a dataset is a
directory: ``lists.jsonl`` (one list per line), ``features.safetensors`` (``instruction``
``[n_lists, n_layers, d_model]``, ``response.<context>`` ``[n_candidates, n_layers, d_model]``,
``offsets`` ``[n_lists + 1]``; float32, raw HF basis) and ``meta.json`` (model identity,
settings, counts). Nothing is pickled; a directory is written atomically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file

from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import require_free, staged_directory
from lens_safety.records import Record
from lens_safety.srr.features import (
    check_context,
)

LISTS_FILE = "lists.jsonl"
FEATURES_FILE = "features.safetensors"
META_FILE = "meta.json"


@dataclass
class CandidateList(Record):
    """One instruction and its deduplicated candidate responses.

    Attributes:
        instruction: the prompt given to the model (jailbreak-wrapped when ``jailbreak`` is set).
        source_instruction: the instruction before wrapping.
        kind: ``harmful`` or ``harmless``.
        category: harm category (surface topic for harmless prompts), when known.
        jailbreak: id of the template that wrapped the instruction, else ``None``.
        candidates: unique responses in sampling order.
        positive: per candidate, safe (harmful lists) / helpful and non-degenerate (harmless lists).
        reasons: per candidate, why (``refusal``, ``compliance``, ``helpful``, ``degenerate``).
        n_sampled: responses sampled before deduplication.
    """

    instruction: str
    source_instruction: str
    kind: str
    category: str | None
    jailbreak: str | None
    candidates: list[str]
    positive: list[bool]
    reasons: list[str] = field(default_factory=list)
    n_sampled: int = 0

    @property
    def mixed(self) -> bool:
        """At least one positive and one negative: usable for training and ranking metrics."""
        return any(self.positive) and not all(self.positive)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "mixed": self.mixed}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> CandidateList:
        keys = (
            "instruction",
            "source_instruction",
            "kind",
            "category",
            "jailbreak",
            "candidates",
            "positive",
            "reasons",
            "n_sampled",
        )
        return cls(**{k: record[k] for k in keys if k in record})


def first_occurrences(texts: Sequence[str]) -> list[int]:
    """Indices of the unique texts in first-seen order (compared after collapsing whitespace)."""
    seen: set[str] = set()
    out: list[int] = []
    for index, text in enumerate(texts):
        key = re.sub(r"\s+", " ", text).strip()
        if key not in seen:
            seen.add(key)
            out.append(index)
    return out


def deduplicate(texts: Sequence[str]) -> list[str]:
    """Unique texts in first-seen order (compared after collapsing whitespace)."""
    return [texts[i] for i in first_occurrences(texts)]


@dataclass
class SRRDataset:
    """Candidate lists with their features (float32, raw HF basis; see the module docstring)."""

    lists: list[CandidateList]
    layers: tuple[int, ...]
    instruction: Float[torch.Tensor, "n_lists n_layers d_model"]
    responses: dict[str, Float[torch.Tensor, "n_candidates n_layers d_model"]]
    offsets: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lists)

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise LensSafetyError(
                f"layer {layer} has no stored features",
                f"use one of {list(self.layers)} or rebuild with --layers",
            )
        return self.layers.index(layer)

    def instruction_features(self, layer: int) -> Float[torch.Tensor, "n_lists d_model"]:
        return self.instruction[:, self._layer_index(layer)]

    def response_features(self, index: int, layer: int, context: str) -> Float[torch.Tensor, "m d_model"]:
        check_context(context)
        if context not in self.responses:
            raise LensSafetyError(
                f"context '{context}' was not stored", f"use one of {sorted(self.responses)}"
            )
        return self.responses[context][
            self.offsets[index] : self.offsets[index + 1], self._layer_index(layer)
        ]

    def subset(self, indices: Sequence[int]) -> SRRDataset:
        """The lists at ``indices`` (features sliced accordingly)."""
        idx = list(indices)
        spans = [torch.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]
        flat = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        offsets = [0]
        for span in spans:
            offsets.append(offsets[-1] + len(span))
        return SRRDataset(
            [self.lists[i] for i in idx],
            self.layers,
            self.instruction[idx],
            {k: v[flat] for k, v in self.responses.items()},
            offsets,
            dict(self.meta),
        )

    def mixed(self) -> SRRDataset:
        """Only the lists with at least one positive and one negative."""
        return self.subset([i for i, x in enumerate(self.lists) if x.mixed])

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in ("harmful", "harmless"):
            of_kind = [x for x in self.lists if x.kind == kind]
            out[f"n_lists_{kind}"] = len(of_kind)
            out[f"n_mixed_{kind}"] = sum(x.mixed for x in of_kind)
            out[f"n_all_positive_{kind}"] = sum(all(x.positive) for x in of_kind)
            out[f"n_all_negative_{kind}"] = sum(not any(x.positive) for x in of_kind)
            out[f"n_candidates_{kind}"] = sum(len(x.candidates) for x in of_kind)
        return out

    # ------------------------------------------------------------------ disk
    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the dataset directory atomically (refuses an existing one unless ``overwrite``)."""
        target = Path(out_dir)
        require_free(target, overwrite)
        with staged_directory(target, overwrite=overwrite) as tmp:
            with open(tmp / LISTS_FILE, "w", encoding="utf-8") as handle:
                for item in self.lists:
                    handle.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
            tensors = {
                "instruction": self.instruction.contiguous(),
                "offsets": torch.tensor(self.offsets, dtype=torch.long),
            }
            tensors.update({f"response.{k}": v.contiguous() for k, v in self.responses.items()})
            save_file(tensors, str(tmp / FEATURES_FILE))
            meta = {
                **self.meta,
                "layers": list(self.layers),
                "contexts": sorted(self.responses),
                "counts": self.counts(),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        return target

    @classmethod
    def load(cls, directory: str | Path) -> SRRDataset:
        path = Path(directory)
        if not (path / LISTS_FILE).is_file() or not (path / FEATURES_FILE).is_file():
            raise LensSafetyError(
                f"{path} is not an SRR data directory", "build one with `lens-safety srr build-data`"
            )
        meta = json.loads((path / META_FILE).read_text())
        records = [
            json.loads(x) for x in (path / LISTS_FILE).read_text(encoding="utf-8").splitlines() if x.strip()
        ]
        tensors = load_file(str(path / FEATURES_FILE))
        responses = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("response.")}
        offsets = [int(x) for x in tensors["offsets"].tolist()]
        return cls(
            [CandidateList.from_dict(r) for r in records],
            tuple(meta["layers"]),
            tensors["instruction"],
            responses,
            offsets,
            meta,
        )
