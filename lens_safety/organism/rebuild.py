"""Evaluate an adapter directory on held-out prompts, compare a rebuild with the shipped adapter,
and the ``organism train`` job (:func:`rebuild_organism`): retrain a shipped organism's adapter from
its recorded config into a staged directory, measure it, compare it, optionally install it."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import staged_directory
from lens_safety.hashing import sha256_file
from lens_safety.models import load_model
from lens_safety.organism.adapter import (
    adapter_dir_of,
    load_adapter_tensors,
    materialize_organism,
    shipped_adapter_dir,
    verify_adapter,
)
from lens_safety.organism.build import (
    ADAPTER_FILE,
    BASE_SPEC,
    TRAINING_FILE,
    TrainingRun,
    read_training_record,
    train_organism,
)
from lens_safety.organism.evaluate import OrganismEvaluation, evaluate_organism
from lens_safety.organism.train import TrainingConfig
from lens_safety.prompts import PromptSet
from lens_safety.selfcheck import require_sound_generation
from lens_safety.sources import cache_dir


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


#: the files ``--install`` copies from a rebuild into the shipped organism's directory
INSTALLED_FILES = (ADAPTER_FILE, "adapter_config.json", TRAINING_FILE)


@dataclass
class Rebuild:
    """A rebuilt adapter (``organism train``): its training run, the ``training.json`` it wrote
    (with the held-out evaluation when measured), how it compares with the ``--like`` organism's
    shipped adapter and that adapter's recorded evaluation (when one is shipped), and where it was
    installed (``--install``)."""

    out_dir: Path
    run: TrainingRun
    record: dict[str, Any]
    matches_shipped: AdapterComparison | None = None
    shipped_evaluation: dict[str, Any] | None = None
    installed_to: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"out_dir": str(self.out_dir), **self.record}
        if self.matches_shipped is not None:
            summary["matches_shipped"] = self.matches_shipped.to_dict()
            summary["shipped_evaluation"] = self.shipped_evaluation
        if self.installed_to is not None:
            summary["installed_to"] = str(self.installed_to)
        return summary


def rebuild_config(shipped: Path, overrides: dict[str, Any]) -> TrainingConfig:
    """The shipped adapter's recorded training config (:class:`TrainingConfig`'s defaults when it
    records none), with ``overrides`` (field name -> value) replacing its fields."""
    base_config = dict(read_training_record(shipped).get("config") or TrainingConfig().to_dict())
    base_config["target_modules"] = tuple(base_config.get("target_modules", TrainingConfig().target_modules))
    base_config["more_harmless"] = tuple(base_config.get("more_harmless", ()))
    return TrainingConfig(**{**base_config, **overrides})


def rebuild_organism(
    out: Path | None = None,
    *,
    like: str = "smollm2-refusal",
    epochs: int | None = None,
    seed: int | None = None,
    threads: int | None = None,
    more_harmless: Sequence[str] | None = None,
    more_harmful: Sequence[str] | None = None,
    init_adapter: str | None = None,
    lr: float | None = None,
    max_steps: int | None = None,
    evaluate: bool = True,
    install: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Rebuild:
    """Retrain the ``like`` organism's adapter from its recorded config (each option given replaces
    its field; ``more_*`` replace the recorded lists; ``init_adapter="none"``: peft's
    initialisation) into ``out`` (default: a new ``organism/rebuild-<time>`` cache directory),
    staged so that a failed or killed run leaves nothing at ``out``; with ``evaluate`` measure it on
    the held-out ``test`` split (recorded in its ``training.json``); compare it with the shipped
    adapter; with ``install`` copy it over the shipped one (:data:`INSTALLED_FILES`).

    Raises a :class:`~lens_safety.errors.LensSafetyError` before any work for an unknown ``like`` or
    ``init_adapter`` or a non-empty ``out`` without ``overwrite`` (an empty ``out`` is replaced).
    """
    shipped = shipped_adapter_dir(like)
    given = {"epochs": epochs, "seed": seed, "threads": threads, "lr": lr, "max_steps": max_steps}
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if more_harmless is not None:
        overrides["more_harmless"] = tuple(more_harmless)
    if more_harmful is not None:
        overrides["more_harmful"] = tuple(more_harmful)
    if init_adapter is not None:
        overrides["init_adapter"] = None if init_adapter == "none" else init_adapter
        if overrides["init_adapter"] is not None:
            adapter_dir_of(overrides["init_adapter"])  # an unknown name fails before any work
    config = rebuild_config(shipped, overrides)
    target = (
        out if out is not None else cache_dir() / "organism" / f"rebuild-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise LensSafetyError(
            f"output directory {target} already exists and is not empty",
            "pass --overwrite or choose another --out",
        )
    replace = overwrite or (target.exists() and not any(target.iterdir()))  # an empty directory may go
    with staged_directory(target, overwrite=replace) as tmp:
        run = train_organism(config, tmp, progress=progress)
        if evaluate:
            record_evaluation(tmp, evaluate_adapter(tmp, progress=progress), "test")
    result = Rebuild(target, TrainingRun(target, run.record), read_training_record(target))
    if (shipped / ADAPTER_FILE).is_file():
        result.matches_shipped = compare_adapters(target, shipped)
        result.shipped_evaluation = read_training_record(shipped).get("evaluation")
    if install:
        _install(target, shipped)
        result.installed_to = shipped
    return result


def _install(rebuilt: Path, shipped: Path) -> None:
    """Replace :data:`INSTALLED_FILES` of ``shipped`` by the rebuild's, all at once: a copy of the
    shipped directory with the new files is staged and swapped in (its other files, such as the
    README, are kept), so an interrupted install leaves the old organism whole."""
    with staged_directory(shipped, overwrite=True) as tmp:
        for path in shipped.iterdir():
            if path.is_file() and path.name not in INSTALLED_FILES:
                shutil.copy2(path, tmp / path.name)
        for name in INSTALLED_FILES:
            shutil.copy2(rebuilt / name, tmp / name)
