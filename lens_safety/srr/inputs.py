"""What a ranker reads for each list: hidden-state features, or hashed text for the text-only baseline.

:func:`list_inputs` turns an :class:`~lens_safety.srr.data.SRRDataset` into one
``ListInput(instruction [d], responses [m, d], positive [m])`` per list, for a feature kind:

* ``hidden``: residual states at ``layer`` (raw HF basis), responses encoded per ``context``;
* ``text``: :func:`hashed_text_features` of the instruction and response texts (no hidden states):
  unigram and bigram counts of lower-cased words, hashed (SHA-256) into ``width`` buckets with a
  hashed sign, then ``sign(x) * log1p(|x|)``. Same width as the model, so the text-only ranker has
  the same size as the hidden-state one.

:func:`pad_lists` batches lists of different lengths with a validity mask.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float

from lens_safety.errors import LensSafetyError
from lens_safety.srr.data import SRRDataset

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@dataclass
class ListInput:
    """One list as ranker input: ``instruction [d]``, ``responses [m, d]``, ``positive [m]``."""

    instruction: Float[torch.Tensor, " d"]
    responses: Float[torch.Tensor, "m d"]
    positive: Bool[torch.Tensor, " m"]


def _bucket(token: str, width: int) -> tuple[int, float]:
    digest = hashlib.sha256(token.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % width, (1.0 if digest[8] & 1 else -1.0)


def hashed_text_features(texts: Sequence[str], width: int) -> Float[torch.Tensor, "n width"]:
    """Signed hashed unigram + bigram counts, ``sign * log1p(|count|)`` (see the module docstring)."""
    out = torch.zeros(len(texts), width)
    for row, text in enumerate(texts):
        words = [w.casefold() for w in _WORD.findall(text)]
        for token in [*words, *(f"{a} {b}" for a, b in itertools.pairwise(words))]:
            column, sign = _bucket(token, width)
            out[row, column] += sign
    return out.sign() * out.abs().log1p()


def list_inputs(
    dataset: SRRDataset, features: str, layer: int | None, context: str, text_width: int | None = None
) -> list[ListInput]:
    """One :class:`ListInput` per list of ``dataset`` (see the module docstring): ``features``
    ``hidden`` reads ``layer`` in the response encoding ``context``, ``text`` hashes the texts
    into ``text_width`` buckets (default: the stored width)."""
    items: list[ListInput] = []
    if features == "hidden":
        if layer is None:
            raise LensSafetyError("hidden-state features need a layer", "pass --layer")
        inst = dataset.instruction_features(layer)
        for i, item in enumerate(dataset.lists):
            items.append(
                ListInput(inst[i], dataset.response_features(i, layer, context), torch.tensor(item.positive))
            )
    elif features == "text":
        width = text_width or int(dataset.instruction.shape[-1])
        for item in dataset.lists:
            items.append(
                ListInput(
                    hashed_text_features([item.instruction], width)[0],
                    hashed_text_features(item.candidates, width),
                    torch.tensor(item.positive),
                )
            )
    else:
        raise LensSafetyError(f"unknown feature kind '{features}'", "use hidden or text")
    return items


def pad_lists(
    items: Sequence[ListInput],
) -> tuple[
    Float[torch.Tensor, "b d"],
    Float[torch.Tensor, "b m d"],
    Bool[torch.Tensor, "b m"],
    Bool[torch.Tensor, "b m"],
]:
    """``(instruction, responses, positive, valid)`` with lists right-padded to the longest."""
    m = max(len(x.positive) for x in items)
    d = items[0].responses.shape[-1]
    responses = torch.zeros(len(items), m, d)
    positive = torch.zeros(len(items), m, dtype=torch.bool)
    valid = torch.zeros(len(items), m, dtype=torch.bool)
    for row, item in enumerate(items):
        k = len(item.positive)
        responses[row, :k] = item.responses
        positive[row, :k] = item.positive
        valid[row, :k] = True
    return torch.stack([x.instruction for x in items]), responses, positive, valid
