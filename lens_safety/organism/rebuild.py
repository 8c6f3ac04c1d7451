"""Evaluate an adapter directory on held-out prompts and compare a rebuild with the shipped adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lens_safety.hashing import sha256_file
from lens_safety.models import load_model
from lens_safety.organism.adapter import load_adapter_tensors, materialize_organism, verify_adapter
from lens_safety.organism.build import ADAPTER_FILE, BASE_SPEC, TRAINING_FILE
from lens_safety.organism.evaluate import OrganismEvaluation, evaluate_organism
from lens_safety.prompts import PromptSet
from lens_safety.selfcheck import require_sound_generation


def held_out_sets(split: str = "test", limit: int | None = None) -> tuple[PromptSet, PromptSet]:
    """Harmful and harmless prompts of ``split`` (first ``limit`` of each when given: deterministic)."""
    harmful = PromptSet.load(f"builtin:harmful:{split}")
    harmless = PromptSet.load(f"builtin:harmless:{split}")
    if limit is not None:
        harmful, harmless = harmful.head(limit), harmless.head(limit)
    return harmful, harmless


def evaluate_adapter(
    adapter_dir: Path | None = None,
    split: str = "test",
    limit: int | None = None,
    max_new_tokens: int = 48,
    with_kl: bool = True,
    progress: bool = False,
) -> OrganismEvaluation:
    """Merge the adapter (hash-checked), load organism and base, evaluate on the ``split`` prompts."""
    merged = materialize_organism(adapter_dir)
    organism = load_model(merged, device="cpu")
    require_sound_generation(organism)
    base = load_model(BASE_SPEC, device="cpu") if with_kl else None
    harmful, harmless = held_out_sets(split, limit)
    return evaluate_organism(organism, harmful, harmless, base, max_new_tokens, progress)


def record_evaluation(adapter_dir: Path, evaluation: OrganismEvaluation, split: str) -> None:
    """Add the held-out numbers to the adapter's ``training.json`` (the adapter hash is unaffected)."""
    file = adapter_dir / TRAINING_FILE
    record = json.loads(file.read_text(encoding="utf-8"))
    record.setdefault("evaluation", {})[split] = evaluation.to_dict()
    file.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclass
class AdapterComparison:
    """How a rebuilt adapter compares with a reference one."""

    sha256_equal: bool
    same_tensors: bool
    max_abs_diff: float | None
    rebuilt_sha256: str
    reference_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compare_adapters(rebuilt_dir: Path, reference_dir: Path) -> AdapterComparison:
    """SHA-256 equality and max |difference| over the adapter tensors (``None`` if names differ)."""
    verify_adapter(reference_dir)
    rebuilt, reference = load_adapter_tensors(rebuilt_dir), load_adapter_tensors(reference_dir)
    same = set(rebuilt) == set(reference) and all(rebuilt[k].shape == reference[k].shape for k in rebuilt)
    diff = (
        max((float((rebuilt[k].float() - reference[k].float()).abs().max()) for k in rebuilt), default=0.0)
        if same
        else None
    )
    return AdapterComparison(
        sha256_file(rebuilt_dir / ADAPTER_FILE) == sha256_file(reference_dir / ADAPTER_FILE),
        same and diff == 0.0 and all(torch.equal(rebuilt[k], reference[k]) for k in rebuilt),
        diff,
        sha256_file(rebuilt_dir / ADAPTER_FILE),
        sha256_file(reference_dir / ADAPTER_FILE),
    )
