"""One Hugging Face forward pass of chat-formatted token rows: a left-padded batch, or rows whose
shared leading tokens (the chat template's header, a system prompt) run once and are reused
through their KV cache.

Every pass sends the attention mask and mask-derived position ids, so a row's outputs do not
depend on the batch it is in (up to float rounding). The outputs are the model's own: logits and
hidden states in the raw Hugging Face basis.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lens_safety.chat import EncodedBatch, common_prefix_length
from lens_safety.models import ChatModel

if TYPE_CHECKING:
    from transformers import Cache


def forward(model: ChatModel, batch: EncodedBatch, **kwargs: Any) -> Any:
    """One Hugging Face forward pass of a left-padded batch (mask and position ids passed)."""
    batch = batch.to(model.device)
    return model.hf_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **kwargs,
    )


#: fewest shared leading tokens worth computing once (:func:`shared_prefix_batch`)
MIN_SHARED_PREFIX = 4


@dataclass
class PrefixedBatch:
    """Token rows laid out as ``[shared prefix][left padding][rest of the row]``, with the
    prefix's KV cache already computed once and repeated for every row.

    ``batch`` holds the full ids and mask (``batch.position_ids`` counts each row's real tokens
    from 0, so the rest of every row continues at the prefix's length); ``prefix`` is the number
    of shared leading tokens, ``cache`` the model's ``past_key_values`` over them.
    """

    batch: EncodedBatch
    prefix: int
    cache: Cache


def cache_argument(model: ChatModel) -> str:
    """The name under which the model's forward takes (and returns) its KV cache: ``cache`` from
    transformers 5.24 on, ``past_key_values`` before."""
    parameters = inspect.signature(model.hf_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def shared_prefix_batch(model: ChatModel, rows: list[list[int]]) -> PrefixedBatch | None:
    """The rows with their shared leading tokens (e.g. the chat template's system prompt and user
    header) run once through the model, or ``None`` when fewer than :data:`MIN_SHARED_PREFIX` are
    shared (every row keeps at least one token of its own).

    Causal attention makes the keys and values of a shared prefix the same in every row, so the
    rows' outputs equal those of a plain left-padded batch up to float rounding. Only valid when
    every active hook treats all positions alike (weight edits, :func:`add_direction` and
    :func:`ablate_direction` of :mod:`lens_safety.interventions`): the prefix runs as its own
    one-row pass, inside the caller's hooks.
    """
    prefix = min(common_prefix_length(rows), min(len(row) for row in rows) - 1)
    if prefix < MIN_SHARED_PREFIX:
        return None
    name = cache_argument(model)
    with torch.inference_mode():
        ids = torch.tensor([rows[0][:prefix]], device=model.device)
        cache = getattr(model.hf_model(input_ids=ids, use_cache=True), name)
    cache.batch_repeat_interleave(len(rows))
    rest = model.chat.pad([row[prefix:] for row in rows])
    shared = torch.tensor(rows[0][:prefix]).expand(len(rows), prefix)
    ones = torch.ones(len(rows), prefix, dtype=rest.attention_mask.dtype)
    full = EncodedBatch(
        torch.cat([shared, rest.input_ids], dim=1), torch.cat([ones, rest.attention_mask], dim=1)
    )
    return PrefixedBatch(full, prefix, cache)


def forward_rows(
    model: ChatModel, rows: list[list[int]], *, share_prefix: bool = False, **kwargs: Any
) -> Any:
    """One Hugging Face forward pass of token rows: a left-padded batch (:func:`forward`), or with
    ``share_prefix`` their shared leading tokens computed once (:func:`shared_prefix_batch`; only
    under position-independent hooks). The outputs cover the rows' last ``width - prefix``
    positions then, so read them from the end (``logits_to_keep=1``, negative positions)."""
    prefixed = shared_prefix_batch(model, rows) if share_prefix else None
    if prefixed is None:
        return forward(model, model.chat.pad(rows), **kwargs)
    full, n = prefixed.batch.to(model.device), prefixed.prefix
    return model.hf_model(
        input_ids=full.input_ids[:, n:],
        attention_mask=full.attention_mask,
        position_ids=full.position_ids[:, n:],
        use_cache=True,
        **{cache_argument(model): prefixed.cache},
        **kwargs,
    )
