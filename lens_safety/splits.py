"""Every train / validation / test / fold split of lens-safety: deterministic functions of text.

No split depends on the order of the prompts, on a random generator's state or on the machine.

* **The library split** (:func:`split_of`): a prompt's split is a function of its key, the topic
  pair id when it has one, else its text: ``b = int(sha256(key)[:8 hex]) mod 100``, ``train`` for
  ``b < 60``, ``val`` for ``60 <= b < 80``, ``test`` otherwise. Topic-paired harmful / harmless
  prompts share a key and so a split. ``builtin:harmful:train`` and :meth:`PromptSet.split` use it.
* **Held-out fraction of an unpaired set** (:func:`heldout_indices`): prompts are ranked by
  ``sha256(f"{seed}|{text}")`` (hex order); the first ``max(1, round(n * fraction))`` are held out
  (none when ``n = 1``). Indices come back in prompt order.
* :func:`split_heldout` (two-way, for probing) and :func:`split_train_val_test` (three-way, for
  finding a direction) use the library split when the set has pair ids and enough prompts land in
  each part, else the held-out fraction. :func:`capped_splits` takes the library split of a
  harmful and a harmless set and keeps the first ``n`` of each part.
* **By source instruction** (SRR candidate lists; every list of one instruction, jailbreak-wrapped
  or re-sampled, lands on one side): ``h(salt, s)`` = the first 8 bytes of
  ``sha256(f"{salt}\\x1f{s}")`` as a big-endian integer. A list is validation when
  ``h(str(seed), s) / 2^64 < fraction`` (:func:`source_val_split`) and is in fold
  ``h("cv", s) mod K`` (:func:`source_fold`).
* **By category** (:func:`category_split`): inside vs outside a set of categories.
* **Stratified K folds of labelled rows** (:func:`stratified_folds`, the probe's regularisation
  search): scikit-learn's ``StratifiedKFold(k, shuffle=True, random_state=0)``, so each fold keeps
  the class proportions and the assignment is fixed for given labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lens_safety.errors import LensSafetyError

if TYPE_CHECKING:
    from lens_safety.prompts import PromptSet

SPLITS = ("train", "val", "test")
#: fraction boundaries of the library split, in percent: train < 60 <= val < 80 <= test
SPLIT_BOUNDS = (60, 80)
#: the splits no training may see
HELD_OUT_SPLITS = ("val", "test")


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100


def split_of(key: str) -> str:
    """The library split (``train`` / ``val`` / ``test``) of a pair id or prompt text."""
    bucket = _bucket(key)
    return "train" if bucket < SPLIT_BOUNDS[0] else "val" if bucket < SPLIT_BOUNDS[1] else "test"


def split_keys(texts: Sequence[str], pairs: Sequence[str | None] | None) -> list[str]:
    """The key of each prompt: its pair id when it has one, else its text."""
    return [(pairs[i] or t) if pairs else t for i, t in enumerate(texts)]


def check_split(which: str) -> None:
    if which not in SPLITS:
        raise LensSafetyError(f"unknown split '{which}'", f"use one of {', '.join(SPLITS)}")


def split_indices(texts: Sequence[str], pairs: Sequence[str | None] | None, which: str) -> list[int]:
    """Indices, in order, of the prompts whose library split is ``which``."""
    check_split(which)
    return [i for i, key in enumerate(split_keys(texts, pairs)) if split_of(key) == which]


def heldout_indices(texts: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(kept, held_out)`` indices of the held-out-fraction split (module docstring)."""
    ranked = sorted(
        range(len(texts)), key=lambda i: hashlib.sha256(f"{seed}|{texts[i]}".encode()).hexdigest()
    )
    n_held = max(1, round(len(texts) * fraction)) if len(texts) > 1 else 0
    return sorted(ranked[n_held:]), sorted(ranked[:n_held])


def _paired(prompts: PromptSet) -> bool:
    return bool(prompts.pairs and any(prompts.pairs))


def split_heldout(prompts: PromptSet, heldout_fraction: float = 0.25) -> tuple[PromptSet, PromptSet]:
    """``(train, held_out)``: the library split's ``train`` vs ``val`` + ``test`` for sets with pair
    ids (at least 2 train and 1 held-out prompt), else the held-out fraction."""
    if _paired(prompts):
        keys = split_keys(prompts.prompts, prompts.pairs)
        train_idx = [i for i, key in enumerate(keys) if split_of(key) == "train"]
        held_idx = [i for i, key in enumerate(keys) if split_of(key) != "train"]
        if len(train_idx) >= 2 and len(held_idx) >= 1:
            return prompts.subset(train_idx, f"{prompts.name}:train"), prompts.subset(
                held_idx, f"{prompts.name}:heldout"
            )
    return prompts.train_val_split(heldout_fraction)


def split_train_val_test(
    prompts: PromptSet, heldout_fraction: float = 0.4
) -> tuple[PromptSet, PromptSet, PromptSet]:
    """``(train, val, test)``: extract on train, select on val, report on test.

    Sets with pair ids use the library split (60 / 20 / 20) when each part is non-empty (train at
    least 2). Other sets hold out ``heldout_fraction`` and halve it into val and test; with fewer
    than 4 held-out prompts val and test are the same prompts (too few to keep selection and report
    apart; callers say so).
    """
    if _paired(prompts):
        parts = tuple(prompts.split(which) for which in SPLITS)
        if len(parts[0]) >= 2 and len(parts[1]) >= 1 and len(parts[2]) >= 1:
            return parts  # type: ignore[return-value]
    train, held = prompts.train_val_split(heldout_fraction)
    if len(held) < 4:
        return train, held, held
    n_val = len(held) // 2
    return (
        train,
        held.subset(range(n_val), f"{prompts.name}:val"),
        held.subset(range(n_val, len(held)), f"{prompts.name}:test"),
    )


def capped_splits(
    harmful: PromptSet, harmless: PromptSet, n_train: int, n_val: int, n_test: int
) -> dict[str, tuple[PromptSet, PromptSet]]:
    """``{"train" | "val" | "test": (harmful, harmless)}``: the library split, first ``n`` of each.

    ``n_test = 0`` is allowed (no test part); an empty non-zero part is a one-line error.
    """
    for value, name in ((n_train, "n-train"), (n_val, "n-val"), (n_test, "n-test")):
        if value < 0 or (value == 0 and name != "n-test"):
            raise LensSafetyError(f"--{name} must be positive, got {value}", f"pass e.g. --{name} 16")
    out: dict[str, tuple[PromptSet, PromptSet]] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        parts = (harmful.split(split).head(n), harmless.split(split).head(n))
        if n and min(len(p) for p in parts) == 0:
            raise LensSafetyError(
                f"the {split} split of the prompts is empty (too few prompts)",
                "give more prompts (a few dozen per class) or pass --direction and --alpha",
            )
        out[split] = parts
    return out


def source_hash(salt: str, source_instruction: str) -> int:
    """``h(salt, s)``: the first 8 bytes of ``sha256(salt + "\\x1f" + s)``, big-endian."""
    digest = hashlib.sha256(f"{salt}\x1f{source_instruction}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def source_val_split(sources: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)`` indices: validation when ``h(str(seed), source) / 2^64 < fraction``."""
    train: list[int] = []
    val: list[int] = []
    for i, source in enumerate(sources):
        (val if source_hash(str(seed), source) / 2**64 < fraction else train).append(i)
    return train, val


def source_fold(source_instruction: str, folds: int) -> int:
    """The cross-validation fold ``h("cv", source) mod folds`` (stable across data directories)."""
    return source_hash("cv", source_instruction) % folds


def stratified_folds(labels: Sequence[float] | Any, k: int) -> list[tuple[Any, Any]]:
    """``(train_rows, test_rows)`` index arrays of ``k`` stratified, seeded folds (module docstring)."""
    from sklearn.model_selection import StratifiedKFold  # heavy: loaded only by the probe's search

    rows = [[0.0]] * len(labels)  # the folds depend on the labels and the number of rows only
    return list(StratifiedKFold(k, shuffle=True, random_state=0).split(rows, labels))


def category_split(categories: Sequence[str | None], wanted: Sequence[str]) -> tuple[list[int], list[int]]:
    """``(inside, outside)`` indices: items whose category is in ``wanted``, and the others."""
    chosen = set(wanted)
    known = {c for c in categories}
    if not chosen & known:
        raise LensSafetyError(
            f"none of the categories {sorted(chosen)} occur in the data",
            f"use some of {sorted(str(k) for k in known)}",
        )
    inside = [i for i, c in enumerate(categories) if c in chosen]
    return inside, [i for i, c in enumerate(categories) if c not in chosen]
