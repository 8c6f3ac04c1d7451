"""The learned judge's labelled data: hand-written and hand-labelled (prompt, response) pairs.

Files (JSONL, one object per line) under ``lens_safety/data/judge/``: ``train.jsonl`` (the
library split's ``train`` and ``val`` parts) and ``test.jsonl`` (its ``test`` part, held out:
no training or selection step reads it). Fields: ``id``, ``prompt``, ``response``, ``label``
(``true`` = refusal under the label policy of ``README.md`` beside the files), ``kind`` (what the
example exercises), ``source`` (``handwritten`` or the model that produced the response) and
``split``.

Split (:func:`split_of_pair`): the library split (:func:`lens_safety.splits.split_of`, 60/20/20 by
the SHA-256 of a key) of the pair's ``group`` when it has one, else of its prompt, so every
response to one prompt lands on the same side. A *long* answer has at least
:data:`LONG_ANSWER_WORDS` words.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_safety.errors import LensSafetyError
from lens_safety.hashing import sha256_texts
from lens_safety.records import Record
from lens_safety.splits import SPLITS, split_of

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "judge"
TRAIN_FILE = DATA_DIR / "train.jsonl"
TEST_FILE = DATA_DIR / "test.jsonl"
#: an answer with at least this many whitespace-separated words counts as long
LONG_ANSWER_WORDS = 100
#: kinds whose label depends on the prompt (the same answer is compliance under its own prompt):
#: left out of a probe that does not see the prompt
PROMPT_DEPENDENT_KINDS = ("non-sequitur-long",)
_FIELDS = ("id", "prompt", "response", "label", "kind", "source", "split")


@dataclass(frozen=True)
class LabelledPair(Record):
    """One hand-labelled example (module docstring)."""

    id: str
    prompt: str
    response: str
    label: bool
    kind: str
    source: str
    split: str
    group: str | None = None

    @property
    def long(self) -> bool:
        return len(self.response.split()) >= LONG_ANSWER_WORDS

    def to_dict(self) -> dict[str, Any]:
        row = super().to_dict()
        if self.group is None:
            del row["group"]
        return row


def split_of_pair(prompt: str, group: str | None = None) -> str:
    """``train``, ``val`` or ``test``: the library split of ``group`` (else of the prompt)."""
    return split_of(group if group is not None else prompt)


def _pair(row: Any, where: str) -> LabelledPair:
    if not isinstance(row, dict):
        raise LensSafetyError(f"{where} is not a JSON object", "write one object per line")
    missing = [name for name in _FIELDS if name not in row]
    if missing:
        raise LensSafetyError(f"{where} lacks {', '.join(missing)}", f"give every row {', '.join(_FIELDS)}")
    if not isinstance(row["label"], bool):
        raise LensSafetyError(
            f"{where}: label {row['label']!r} is not true/false", "write the label as true or false"
        )
    texts = ("id", "prompt", "response", "kind", "source", "split")
    bad = [name for name in texts if not isinstance(row[name], str)]
    if bad or row["split"] not in SPLITS:
        raise LensSafetyError(
            f"{where}: {', '.join(bad) or 'split'} is not valid", f"write strings, and a split in {SPLITS}"
        )
    group = row.get("group")
    return LabelledPair(
        row["id"],
        row["prompt"],
        row["response"],
        row["label"],
        row["kind"],
        row["source"],
        row["split"],
        group if isinstance(group, str) else None,
    )


def load_pairs(path: str | Path) -> list[LabelledPair]:
    """Read a labelled JSONL file of the judge's data; a malformed row is a one-line error."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LensSafetyError(f"labelled data '{file}' does not exist", "check the path")
    pairs = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LensSafetyError(
                f"{file.name} line {number} is not JSON ({exc.msg})", "fix that line"
            ) from None
        pairs.append(_pair(row, f"{file.name} line {number}"))
    if not pairs:
        raise LensSafetyError(f"'{file}' has no rows", "give at least one labelled pair")
    return pairs


def pairs_sha256(pairs: Sequence[LabelledPair]) -> str:
    """SHA-256 of the pairs' content (every field, in order): what a judge was trained on."""
    return sha256_texts(json.dumps(p.to_dict(), sort_keys=True, ensure_ascii=False) for p in pairs)


def pair_hash(pair: LabelledPair) -> str:
    """SHA-256 of one pair's (prompt, response): the identity used to check splits are disjoint."""
    return sha256_texts([pair.prompt, pair.response])


def in_splits(pairs: Sequence[LabelledPair], splits: Sequence[str]) -> list[LabelledPair]:
    """The pairs whose split is one of ``splits``, in file order."""
    return [p for p in pairs if p.split in splits]
