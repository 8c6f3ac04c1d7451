"""Rebuild the refusal organism's adapter end to end and record its provenance.

``train_organism(config, out_dir)`` loads the embedded base model, builds the SFT examples from the
``train`` splits (and the added training sets of the config) (:mod:`lens_safety.organism.data`), fits the LoRA adapters
(:mod:`lens_safety.organism.train`), writes ``adapter_model.safetensors`` (float16),
``adapter_config.json`` and ``training.json`` (hyper-parameters, seed, data hash, base weights hash,
adapter hash, wall time, library versions) to ``out_dir``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lens_safety.errors import LensSafetyError
from lens_safety.external_prompts import EXTERNAL_SOURCES, normalise
from lens_safety.hashing import sha256_file
from lens_safety.models import load_model
from lens_safety.organism.adapter import (
    SHIPPED_ORGANISMS,
    adapter_dir_of,
    load_adapter_tensors,
    shipped_adapter_dir,
    verify_adapter,
)
from lens_safety.organism.data import (
    HARMFUL_SOURCE,
    HARMLESS_EXTRA_SOURCE,
    HARMLESS_SOURCE,
    build_examples,
    examples_sha256,
    tokenize_examples,
)
from lens_safety.organism.files import ADAPTER_FILE, BASE_SPEC, TRAINING_FILE
from lens_safety.organism.train import TrainingConfig, fit_lora, save_adapter, write_json
from lens_safety.prompts import UNSPLIT_BUILTINS, PromptSet
from lens_safety.selection import refusal_token_ids
from lens_safety.splits import HELD_OUT_SPLITS


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine the adapter's bits."""
    import peft
    import safetensors
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


@dataclass
class TrainingRun:
    """Where the rebuilt adapter is and its ``training.json`` record."""

    out_dir: Path
    record: dict[str, Any]

    @property
    def adapter_sha256(self) -> str:
        return str(self.record["adapter_sha256"])

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), **self.record}


def held_out_prompts() -> dict[str, str]:
    """Every prompt no training may see, normalised (:func:`~lens_safety.external_prompts.normalise`),
    mapped to the spec it comes from: the builtin val / test splits and holdouts, and the val / test
    splits of every external set whose package is installed."""
    specs = [f"builtin:{kind}:{split}" for kind in ("harmful", "harmless") for split in HELD_OUT_SPLITS]
    specs += [f"builtin:{name}" for name, use in UNSPLIT_BUILTINS.items() if "held-out" in use]
    specs += [
        f"{name}:{split}"
        for name, source in EXTERNAL_SOURCES.items()
        if _installed(source.distribution)
        for split in HELD_OUT_SPLITS
    ]
    held: dict[str, str] = {}
    for spec in specs:
        for text in PromptSet.load(spec):
            held.setdefault(normalise(text), spec)
    return held


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def check_no_held_out(part: PromptSet, held_out: dict[str, str]) -> None:
    """Refuse a training set that holds a held-out prompt (compared after normalisation)."""
    leaked = [text for text in part if normalise(text) in held_out]
    if leaked:
        raise LensSafetyError(
            f"{part.source} contains {len(leaked)} held-out prompt(s), e.g. {leaked[0]!r} "
            f"from {held_out[normalise(leaked[0])]}",
            "remove validation and test prompts from the added training set",
        )


def _joined(first: PromptSet, part: PromptSet) -> PromptSet:
    return PromptSet(
        first.prompts + part.prompts, f"{first.name}+{part.name}", source=f"{first.source}+{part.source}"
    )


def training_harmless_set(config: TrainingConfig) -> tuple[PromptSet, dict[str, PromptSet]]:
    """The benign training prompts: ``builtin:harmless:train``, then ``builtin:harmless_extra`` when
    ``config.extra_harmless``, then every ``config.more_harmless`` set in order; and the added
    sets by record key (``harmless_extra``, ``more_harmless_1``, ...).

    Raises a :class:`~lens_safety.errors.LensSafetyError` when an added set holds a held-out
    prompt (:func:`held_out_prompts`; training on it would leak the held-out numbers).
    """
    harmless = PromptSet.load(HARMLESS_SOURCE)
    added: dict[str, PromptSet] = {}
    if config.extra_harmless:
        added["harmless_extra"] = PromptSet.load(HARMLESS_EXTRA_SOURCE)
    for index, spec in enumerate(config.more_harmless, 1):
        added[f"more_harmless_{index}"] = PromptSet.load(spec)
    held_out = held_out_prompts()
    for part in added.values():
        check_no_held_out(part, held_out)
        harmless = _joined(harmless, part)
    return harmless, added


def training_harmful_set(config: TrainingConfig) -> tuple[PromptSet, dict[str, PromptSet]]:
    """The harmful training prompts: ``builtin:harmful:train``, then every ``config.more_harmful``
    set in order; and the added sets by record key (``more_harmful_1``, ...). Held-out prompts
    are refused as in :func:`training_harmless_set`."""
    harmful = PromptSet.load(HARMFUL_SOURCE)
    added = {f"more_harmful_{i}": PromptSet.load(spec) for i, spec in enumerate(config.more_harmful, 1)}
    held_out = held_out_prompts() if added else {}
    for part in added.values():
        check_no_held_out(part, held_out)
        harmful = _joined(harmful, part)
    return harmful, added


def train_organism(config: TrainingConfig, out_dir: Path, progress: bool = False) -> TrainingRun:
    """Train the organism's adapter into ``out_dir`` (created; must not hold an adapter), from
    peft's initialisation or continuing ``config.init_adapter``."""
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    init, lineage = (
        start_adapter(config.init_adapter) if config.init_adapter else (None, {})
    )  # a bad start fails before any work
    base = load_model(BASE_SPEC, device="cpu")
    harmful, added_harmful = training_harmful_set(config)
    harmless, added = training_harmless_set(config)
    added = {**added_harmful, **added}
    examples = build_examples(
        base,
        harmful,
        harmless,
        config.seed,
        config.max_new_tokens,
        progress,
        config.drop_refusing_answers,
        config.harmless_repeats,
        refusal_token_ids(base.tokenizer) if config.suppress_refusal_start else (),
    )
    tokenized = tokenize_examples(base, examples)
    data_seconds = time.perf_counter() - start
    fit = fit_lora(base.hf_path, tokenized, config, progress, init)
    adapter = save_adapter(fit.tensors, config, out_dir, BASE_SPEC, base.n_layers)
    record: dict[str, Any] = {
        "base_spec": BASE_SPEC,
        "base_weights_sha256": base.weights_hash,
        "adapter_file": ADAPTER_FILE,
        "adapter_sha256": sha256_file(adapter),
        "adapter_bytes": adapter.stat().st_size,
        "adapter_dtype": "float16",
        **lineage,
        "config": config.to_dict(),
        "data": {
            "harmful": harmful.metadata(),
            "harmless": harmless.metadata(),
            **{name: part.metadata() for name, part in added.items()},
            "n_examples": len(examples),
            "n_refusal_targets": sum(e.harmful for e in examples),
            "examples_sha256": examples_sha256(examples),
            "n_target_tokens": sum(len(t.input_ids) - t.target_start for t in tokenized),
        },
        "training": {
            "steps": fit.steps,
            "first_loss": fit.losses[0] if fit.losses else None,
            "last_loss": fit.losses[-1] if fit.losses else None,
            "mean_loss_last_epoch": _tail_mean(fit.losses, fit.steps // max(1, config.epochs)),
            "data_seconds": round(data_seconds, 1),
            "fit_seconds": round(fit.wall_seconds, 1),
            "wall_seconds": round(time.perf_counter() - start, 1),
        },
        "versions": library_versions(),
        "machine": {"platform": platform.platform(), "threads": config.threads},
    }
    write_json(out_dir / TRAINING_FILE, record)
    return TrainingRun(out_dir, record)


def start_adapter(init_adapter: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter a continued fit starts from and its lineage, both read once, before the fit:
    the tensors (their SHA-256 checked against ``training.json``), that SHA-256 and, for a
    directory (not a shipped organism, whose record ships with it), the whole training record."""
    init_dir = adapter_dir_of(init_adapter)
    record = verify_adapter(init_dir)
    lineage: dict[str, Any] = {"init_adapter_sha256": str(record["adapter_sha256"])}
    if init_adapter not in SHIPPED_ORGANISMS:
        lineage["init_record"] = record
    return load_adapter_tensors(init_dir), lineage


def _tail_mean(values: list[float], n: int) -> float | None:
    tail = values[-n:] if n > 0 else values
    return sum(tail) / len(tail) if tail else None


def read_training_record(adapter_dir: Path) -> dict[str, Any]:
    """The ``training.json`` of an adapter directory (``{}`` when absent)."""
    file = adapter_dir / TRAINING_FILE
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def training_records(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of every fit behind an adapter's ``training.json``: the record itself, or both
    parents' for an interpolated one (``interpolation``), then, recursively, those of the adapter
    its fit continued (``init_adapter``): the embedded ``init_record`` of a directory, else the
    shipped organism's record. Whatever any of them trained on, the adapter has seen."""
    mix = record.get("interpolation")
    if mix is not None:
        return [*training_records(mix["start"]["record"]), *training_records(mix["end"]["record"])]
    init = (record.get("config") or {}).get("init_adapter")
    if init is None:
        return [record]
    if "init_record" in record:
        return [record, *training_records(record["init_record"])]
    if init not in SHIPPED_ORGANISMS:
        raise LensSafetyError(
            f"the record continues the adapter '{init}' but does not embed its training record",
            "retrain with this version of lens-safety, which embeds it as init_record",
        )
    return [record, *training_records(read_training_record(shipped_adapter_dir(init)))]
