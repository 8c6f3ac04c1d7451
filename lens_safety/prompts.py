"""Prompt sets: load, hash, split deterministically.

A :class:`PromptSet` is an immutable list of instructions (plain user text, not yet formatted
with a chat template) with optional per-prompt categories and pair ids. Sources:

* ``.txt`` (one prompt per line, blank lines and ``#`` comments skipped);
* ``.jsonl`` / ``.csv`` (a named column, default ``prompt``; ``category`` and ``pair`` are read
  when present);
* a Python list;
* ``builtin:harmful`` / ``builtin:harmless`` (written for lens-safety, shipped in the package),
  optionally with a split: ``builtin:harmful:train`` / ``:val`` / ``:test``; and
  ``builtin:harmless_extra`` (benign requests on sensitive topics, training data only, no split);
  ``builtin:harmless_extra_2`` (more of them, for organism candidates; training data only, no split);
  ``builtin:harmful_holdout`` / ``builtin:harmless_holdout`` (written after every model and ranker
  of the project was trained, never used to train or choose anything; no split);
  ``builtin:harmful_holdout_2`` / ``builtin:harmless_holdout_2`` (80 + 80 more, written later for
  the same purpose; no split);
  ``builtin:harmful_holdout_3`` / ``builtin:harmless_holdout_3`` (80 + 80 more, written before the
  organism demonstration's conditional-ROSI default was scored on them once; no split);
* sets written by other authors, read offline from installed packages' data files
  (:mod:`lens_safety.external_prompts`): ``harmbench``, ``donotanswer[:CATEGORY]``, ``advbench``,
  ``mtbench[:CATEGORY]``, each optionally with ``:train`` / ``:val`` / ``:test`` (split by
  near-duplicate group);
* ``hf:<dataset id>[:column]`` (Hugging Face ``datasets``, online).

Splits are deterministic functions of the text and live in :mod:`lens_safety.splits`: a prompt's
split is a function of the SHA-256 of its pair id (or of the text when it has none), so
topic-paired harmful / harmless prompts land in the same split.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lens_safety.errors import LensSafetyError, warn
from lens_safety.external_prompts import is_external, select_external
from lens_safety.hashing import sha256_texts
from lens_safety.splits import heldout_indices, split_indices
from lens_safety.splits import split_of as split_of  # re-export: callers move in the integration

#: built-in sets that are used whole (name -> what they are for)
UNSPLIT_BUILTINS = {
    "harmless_extra": "all of it is training data for the refusal organism",
    "harmless_extra_2": "all of it is training data for organism candidates (--more-harmless)",
    "harmless_extra_3": "all of it is training data for organism candidates (--more-harmless)",
    "harmful_extra": "all of it is training data for organism candidates (--more-harmful)",
    "harmful_holdout": "all of it is held-out test data",
    "harmless_holdout": "all of it is held-out test data",
    "harmful_holdout_2": "all of it is held-out test data",
    "harmless_holdout_2": "all of it is held-out test data",
    "harmful_holdout_3": "all of it is held-out test data",
    "harmless_holdout_3": "all of it is held-out test data",
}


@dataclass(frozen=True)
class PromptSet:
    """An immutable, hashable list of instructions.

    Attributes:
        prompts: the instructions (raw user text).
        name: a label used in reports and metadata.
        categories: optional category per prompt.
        pairs: optional topic-pair id per prompt (harmful and harmless prompts on one topic).
    """

    prompts: tuple[str, ...]
    name: str = "prompts"
    categories: tuple[str | None, ...] | None = None
    pairs: tuple[str | None, ...] | None = None
    source: str = field(default="list", compare=False)

    def __post_init__(self) -> None:
        if self.categories is not None and len(self.categories) != len(self.prompts):
            raise ValueError("categories must have one entry per prompt")
        if self.pairs is not None and len(self.pairs) != len(self.prompts):
            raise ValueError("pairs must have one entry per prompt")

    # -------------------------------------------------------------- construction
    @classmethod
    def from_list(cls, prompts: Sequence[str], name: str = "prompts", **kwargs: Any) -> PromptSet:
        return cls(tuple(str(p) for p in prompts), name=name, **kwargs)

    @classmethod
    def load(
        cls,
        source: PromptSource,
        *,
        column: str = "prompt",
        name: str | None = None,
    ) -> PromptSet:
        """Load from any supported source (see the module docstring). Empty sets are an error."""
        if isinstance(source, PromptSet):
            return source
        if isinstance(source, list | tuple):
            result = cls.from_list(source, name=name or "prompts")
        else:
            text = str(source)
            if text.startswith("builtin:"):
                result = _load_builtin(text)
            elif is_external(text):
                result = _load_external(text)
            elif text.startswith("hf:"):
                result = _load_hf_dataset(text[3:], column)
            else:
                result = _load_file(Path(text).expanduser(), column)
                _warn_duplicates(result)
            if name:
                result = PromptSet(result.prompts, name, result.categories, result.pairs, result.source)
        if len(result) == 0:
            raise LensSafetyError(
                f"prompt set '{result.source}' is empty",
                "give at least one prompt (one per line in .txt files)",
            )
        return result

    @classmethod
    def concat(cls, *sources: str | Path | Sequence[str] | PromptSet, name: str | None = None) -> PromptSet:
        """One set holding every prompt of ``sources`` in order (each loaded with :meth:`load`);
        categories and pairs are kept where a source has them."""
        sets = [cls.load(source) for source in sources]
        if not sets:
            raise LensSafetyError("no prompt sets to concatenate", "pass at least one prompt set")
        prompts = tuple(p for one in sets for p in one.prompts)
        cats = tuple(c for one in sets for c in (one.categories or (None,) * len(one)))
        pairs = tuple(q for one in sets for q in (one.pairs or (None,) * len(one)))
        label = name or "+".join(one.name for one in sets)
        return cls(prompts, label, cats if any(cats) else None, pairs if any(pairs) else None, "concat")

    # -------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]

    @property
    def sha256(self) -> str:
        """SHA-256 of the prompt texts in order."""
        return sha256_texts(self.prompts)

    def subset(self, indices: Sequence[int], name: str | None = None) -> PromptSet:
        cats = tuple(self.categories[i] for i in indices) if self.categories else None
        pairs = tuple(self.pairs[i] for i in indices) if self.pairs else None
        return PromptSet(tuple(self.prompts[i] for i in indices), name or self.name, cats, pairs, self.source)

    def head(self, n: int) -> PromptSet:
        """The first ``n`` prompts."""
        return self.subset(range(min(n, len(self))))

    def split(self, which: str) -> PromptSet:
        """The prompts whose library split (:func:`~lens_safety.splits.split_of`) is ``which``."""
        return self.subset(split_indices(self.prompts, self.pairs, which), f"{self.name}:{which}")

    def train_val_split(self, val_fraction: float = 0.25, seed: int = 0) -> tuple[PromptSet, PromptSet]:
        """Held-out-fraction split for sets without pair ids (:func:`~lens_safety.splits.heldout_indices`)."""
        train_idx, val_idx = heldout_indices(self.prompts, val_fraction, seed)
        return self.subset(train_idx, f"{self.name}:train"), self.subset(val_idx, f"{self.name}:val")

    def metadata(self) -> dict[str, Any]:
        """Name, source, size and hash, for provenance records."""
        return {"name": self.name, "source": self.source, "n": len(self), "sha256": self.sha256}

    def to_dict(self) -> dict[str, Any]:
        return {**self.metadata(), "prompts": list(self.prompts)}


#: what :meth:`PromptSet.load` accepts: a spec or path (``builtin:harmful:val``, a .txt / .jsonl /
#: .csv file), the prompts themselves, or a loaded set
PromptSource = str | Path | Sequence[str] | PromptSet


def check_disjoint(a: PromptSet, b: PromptSet) -> None:
    """Refuse prompt sets that share a prompt (the same text cannot be both harmful and harmless)."""
    shared = set(a.prompts) & set(b.prompts)
    if shared:
        example = next(iter(shared))
        raise LensSafetyError(
            f"{len(shared)} prompt(s) appear in both '{a.name}' and '{b.name}' (e.g. {example[:60]!r})",
            "remove the duplicates so each prompt belongs to one class",
        )


# ------------------------------------------------------------------ loaders
def read_text_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are a one-line error naming the offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LensSafetyError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line})",
            "save the file as UTF-8",
        ) from None


def _read_records(path: Path) -> list[dict[str, Any]]:
    text = read_text_utf8(path)
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict):
                    raise LensSafetyError(
                        f"{path}:{n} is not a JSON object", "write one JSON object per line"
                    )
                records.append(record)
        return records
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _from_records(records: list[dict[str, Any]], column: str, name: str, source: str) -> PromptSet:
    if records and column not in records[0]:
        raise LensSafetyError(
            f"{source} has no column '{column}' (columns: {', '.join(map(str, records[0]))})",
            "pass --column with the name of the prompt column",
        )
    prompts = tuple(str(r[column]).strip() for r in records if str(r.get(column) or "").strip())
    kept = [r for r in records if str(r.get(column) or "").strip()]
    cats = tuple(r.get("category") for r in kept) if kept and "category" in kept[0] else None
    pairs = tuple(r.get("pair") for r in kept) if kept and "pair" in kept[0] else None
    return PromptSet(prompts, name, cats, pairs, source)


def _load_file(path: Path, column: str) -> PromptSet:
    if not path.is_file():
        raise LensSafetyError(f"prompt file '{path}' does not exist", "check the path")
    if path.suffix in {".jsonl", ".csv"}:
        return _from_records(_read_records(path), column, path.stem, str(path))
    lines = read_text_utf8(path).splitlines()
    prompts = tuple(x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#"))
    return PromptSet(prompts, path.stem, source=str(path))


def _warn_duplicates(result: PromptSet) -> None:
    seen: dict[str, int] = {}
    repeats = []
    for i, prompt in enumerate(result.prompts):
        if prompt in seen:
            repeats.append((i, seen[prompt]))
        seen.setdefault(prompt, i)
    if repeats:
        i, j = repeats[0]
        warn(
            f"{result.source} has {len(repeats)} duplicate prompt(s) (prompt {i + 1} repeats prompt {j + 1}); "
            "they are kept, so each copy counts in every rate"
        )


def builtin_path(filename: str) -> Path:
    """Path of a data file shipped in ``lens_safety/data/prompts``."""
    return Path(str(resources.files("lens_safety") / "data" / "prompts" / filename))


def _load_builtin(spec: str) -> PromptSet:
    parts = spec.split(":")
    kind = parts[1] if len(parts) > 1 else ""
    if kind not in {"harmful", "harmless", *UNSPLIT_BUILTINS}:
        raise LensSafetyError(
            f"unknown built-in prompt set '{spec}'",
            "use builtin:harmful or builtin:harmless, optionally :train/:val/:test, or one of "
            + ", ".join(f"builtin:{name}" for name in UNSPLIT_BUILTINS),
        )
    if kind in UNSPLIT_BUILTINS and len(parts) > 2:
        raise LensSafetyError(
            f"builtin:{kind} has no splits (got '{spec}')",
            f"use builtin:{kind}: {UNSPLIT_BUILTINS[kind]}",
        )
    records = _read_records(builtin_path(f"{kind}.jsonl"))
    result = _from_records(records, "prompt", kind, spec)
    return result.split(parts[2]) if len(parts) > 2 else result


def _load_external(spec: str) -> PromptSet:
    chosen = select_external(spec)
    result = PromptSet(chosen.prompts, chosen.name, chosen.categories, chosen.pairs, chosen.source)
    return result.split(chosen.split) if chosen.split else result


def _load_hf_dataset(spec: str, column: str) -> PromptSet:
    dataset_id, _, col = spec.partition(":")
    try:
        from datasets import load_dataset
    except ImportError:
        raise LensSafetyError(
            "hf: prompt sets need the datasets package", "pip install 'lens-safety[datasets]'"
        ) from None
    try:
        data = load_dataset(dataset_id, split="train")
    except Exception as exc:
        raise LensSafetyError(
            f"could not load dataset '{dataset_id}' ({type(exc).__name__})",
            "check the id and your network, or use a local file",
        ) from None
    return _from_records(
        [dict(r) for r in data], col or column, dataset_id.split("/")[-1], f"hf:{dataset_id}"
    )
