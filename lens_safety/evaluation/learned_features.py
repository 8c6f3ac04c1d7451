"""Features of the learned refusal judge: a reader model's residual stream pooled over a response.

A (prompt, response) pair becomes ONE token row for the reader: the prompt, cut to at most
``max_prompt_tokens`` of its own tokens (the first half and the last half of that budget kept),
formatted by the reader's chat template as the user turn (no prompt: an empty user turn), then
the response's tokens (no special tokens; at most ``max_response_tokens``, the first 2/3 and the
last 1/3 of the budget kept), then the end-of-sequence token. The response span is those
response tokens plus the end-of-sequence token, so an empty response still has one token.

The feature vector is, for each layer ``l`` of ``layers``, the mean ``r`` over the response span of
``blocks.{l}.hook_resid_pre`` (= HF ``hidden_states[l]``, **raw HF residual basis**, read in the
reader's dtype and summed in float64), concatenated in layer order. With ``relevance`` (does the
answer address the prompt?), each layer's block is ``[r, p_hat * r_hat, cos(p, r)]`` instead: ``p``
is the mean of the same hook point over the prompt span (the user text's tokens inside the
template; without a prompt, the whole template head), ``x_hat = x / |x|``, ``*`` is the
elementwise product (its sum is the cosine, so the probe learns a weighted similarity of prompt
and answer), width ``2 d_model + 1`` per layer. Rows are read in left-padded batches with the attention
mask and mask-derived position ids (a batched read equals a one-row read); rows are sorted by
length first so that a batch holds rows of similar length, and the result is in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from lens_safety.activations import hook_point_name, read_hook_points
from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.records import Record


@dataclass(frozen=True)
class FeatureSpec(Record):
    """How a pair is read: the reader, its layers and the token budgets (module docstring)."""

    reader: str = "smollm2"
    layers: tuple[int, ...] = (8, 16)
    max_prompt_tokens: int = 128
    max_response_tokens: int = 384
    relevance: bool = False

    def __post_init__(self) -> None:
        if not self.layers or any(layer < 0 for layer in self.layers):
            raise LensSafetyError(f"feature layers {self.layers} are invalid", "give layers >= 0")
        if self.max_prompt_tokens < 2 or self.max_response_tokens < 3:
            raise LensSafetyError(
                "the token budgets are too small", "use max_prompt_tokens >= 2 and max_response_tokens >= 3"
            )

    def block(self, d_model: int) -> int:
        """The length of one layer's block of the feature vector."""
        return 2 * d_model + 1 if self.relevance else d_model

    def width(self, d_model: int) -> int:
        """The length of a feature vector for a reader of width ``d_model``."""
        return len(self.layers) * self.block(d_model)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "layers": list(self.layers)}


def _cut(ids: list[int], budget: int, head_fraction: float) -> list[int]:
    """``ids`` when they fit in ``budget``, else their first and last parts (head share given)."""
    if len(ids) <= budget:
        return ids
    head = int(budget * head_fraction)
    return ids[:head] + ids[len(ids) - (budget - head) :]


def prompt_span(model: ChatModel, head: list[int]) -> tuple[int, int]:
    """``(start, end)`` of the user text's tokens inside a formatted head; the whole head when empty."""
    start = len(model.chat.token_ids(model.chat.format(""))) - model.chat.n_post_instruction()
    end = len(head) - model.chat.n_post_instruction()
    return (start, end) if 0 <= start < end else (0, len(head))


def pair_row(model: ChatModel, prompt: str | None, response: str, spec: FeatureSpec) -> tuple[list[int], int]:
    """Token ids of one formatted pair and the index where its response span starts."""
    tokenizer = model.tokenizer
    instruction = ""
    if prompt:
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        instruction = str(tokenizer.decode(_cut(prompt_ids, spec.max_prompt_tokens, 0.5)))
    head = model.chat.token_ids(model.chat.format(instruction))
    body = _cut(
        list(tokenizer(response, add_special_tokens=False)["input_ids"]), spec.max_response_tokens, 2 / 3
    )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LensSafetyError(
            f"reader '{spec.reader}' has no end-of-sequence token",
            "use a chat model with an eos token as reader",
        )
    return head + body + [int(eos)], len(head)


def pooled_spans(
    model: ChatModel,
    rows: Sequence[Sequence[int]],
    spans: Sequence[Sequence[tuple[int, int]]],
    layers: Sequence[int],
) -> Float[torch.Tensor, "n_rows n_spans n_layers d_model"]:
    """Mean of ``resid_pre`` over ``row[start:end]`` for each span of each row, per layer, in ONE
    batched pass (float64); every row has the same number of spans."""
    if not rows or len(rows) != len(spans) or len({len(s) for s in spans}) != 1:
        raise LensSafetyError(f"{len(rows)} rows with {len(spans)} span lists", "pass the same spans per row")
    if any(not 0 <= a < b <= len(r) for r, row_spans in zip(rows, spans, strict=True) for a, b in row_spans):
        raise LensSafetyError("a span is empty or outside its row", "start every span inside its row")
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad:
        raise LensSafetyError(f"layers {bad} out of range", f"use layers 0..{model.n_layers - 1}")
    batch = model.chat.pad([list(r) for r in rows])
    width = batch.input_ids.shape[1]
    weights = torch.zeros(len(rows), len(spans[0]), width, dtype=torch.float64)
    for i, (row, row_spans) in enumerate(zip(rows, spans, strict=True)):
        offset = width - len(row)
        for k, (a, b) in enumerate(row_spans):
            weights[i, k, offset + a : offset + b] = 1.0 / (b - a)

    def take(activation: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bks,bsd->bkd", weights.to(activation.device), activation.double()).cpu()

    points = [hook_point_name("resid_pre", layer) for layer in layers]
    return torch.stack(read_hook_points(model, batch, points, take), dim=2)


def relevance_block(
    prompt: Float[torch.Tensor, "n d"], response: Float[torch.Tensor, "n d"]
) -> Float[torch.Tensor, "n w"]:
    """``[r, p_hat * r_hat, cos(p, r)]`` per row (module docstring), float64."""
    p_hat = prompt / prompt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r_hat = response / response.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    product = p_hat * r_hat
    return torch.cat([response, product, product.sum(-1, keepdim=True)], dim=-1)


def pair_features(
    model: ChatModel,
    prompts: Sequence[str | None] | None,
    responses: Sequence[str],
    spec: FeatureSpec,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> Float[torch.Tensor, "n width"]:
    """Feature vectors ``[n, spec.width(d_model)]`` (float64) of the pairs, in input order."""
    if prompts is not None and len(prompts) != len(responses):
        raise LensSafetyError(
            f"{len(prompts)} prompts for {len(responses)} responses", "pass one prompt per response"
        )
    if batch_size < 1:
        raise LensSafetyError(f"batch_size must be >= 1, got {batch_size}", "pass a positive batch size")
    if not responses:
        return torch.zeros(0, spec.width(model.d_model), dtype=torch.float64)
    pairs = [
        pair_row(model, None if prompts is None else prompts[i], r, spec) for i, r in enumerate(responses)
    ]
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), i))
    n_spans = 2 if spec.relevance else 1
    states = torch.zeros(len(pairs), n_spans, len(spec.layers), model.d_model, dtype=torch.float64)
    chunks = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    for chunk in track(chunks, "reading pairs", total=len(chunks), enabled=progress):
        rows = [pairs[i][0] for i in chunk]
        spans = [
            [(pairs[i][1], len(pairs[i][0]))]
            + ([prompt_span(model, pairs[i][0][: pairs[i][1]])] * (n_spans - 1))
            for i in chunk
        ]
        states[chunk] = pooled_spans(model, rows, spans, spec.layers)
    if not spec.relevance:
        return states[:, 0].reshape(len(pairs), -1)
    blocks = [relevance_block(states[:, 1, j], states[:, 0, j]) for j in range(len(spec.layers))]
    return torch.cat(blocks, dim=-1)
