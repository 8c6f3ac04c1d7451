"""Hidden-state features for SRR: the frozen model's residual stream at the last token.

Space: every feature is in the **raw HF residual basis** (compatibility mode off). Layer ``l`` in
``0 .. n_layers - 1`` is ``blocks.{l}.hook_resid_pre`` = HF ``hidden_states[l]``; layer
``n_layers`` ("final") is ``blocks.{n_layers - 1}.hook_resid_post``, the last residual stream
BEFORE the final norm (HF's own ``hidden_states[-1]`` has that norm applied; ours does not).

Four encodings of a response (the SRR paper does not say which it used; all are offered and
measured):

* ``with_instruction``: the chat-formatted prompt followed by the response tokens; the feature is
  the state at the response's last token (it has attended to the instruction). The instruction
  feature is read in the same pass at the last prompt token, which is exactly the token
  :func:`~lens_safety.activations.collect_activations` reads at position ``-1`` (causal attention:
  the response does not change it);
* ``response_only``: the response text alone (one BOS, no template); the feature is its last token;
* ``generated``: ``with_instruction`` read WHILE sampling, from the forward calls that produced the
  candidates (no extra pass; :mod:`lens_safety.srr.capture`). It differs from ``with_instruction``
  only for candidates cut at ``max_new_tokens``, whose last sampled token was never read;
* ``generated_mean``: the mean over the response tokens read while sampling (same calls as
  ``generated``; pooled instead of last-token).

:func:`read_token_states` reads pre-tokenised sequences at arbitrary token positions through
:func:`lens_safety.activations.read_hook_points` (the one batched hook read). Batches are left
padded with the attention mask and mask-derived position ids, so a batched read equals a
one-sequence read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float

from lens_safety.activations import hook_point_name, read_hook_points
from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel

ResponseContext = Literal["with_instruction", "response_only", "generated", "generated_mean"]
CONTEXTS: tuple[str, ...] = ("with_instruction", "response_only", "generated", "generated_mean")
#: contexts read by a separate pass after sampling
POST_HOC_CONTEXTS: tuple[str, ...] = ("with_instruction", "response_only")
#: contexts read while sampling (no extra pass)
SAMPLED_CONTEXTS: tuple[str, ...] = ("generated", "generated_mean")


def check_context(context: str) -> None:
    if context not in CONTEXTS:
        raise LensSafetyError(f"unknown response context '{context}'", f"use one of {', '.join(CONTEXTS)}")


def check_layers(model: ChatModel, layers: Sequence[int]) -> tuple[int, ...]:
    """Validate feature layers: ``0 .. n_layers`` (``n_layers`` = final residual stream, pre-norm)."""
    out = tuple(int(x) for x in layers)
    bad = [x for x in out if not 0 <= x <= model.n_layers]
    if bad or not out:
        raise LensSafetyError(
            f"feature layers {bad or out} out of range",
            f"use layers 0..{model.n_layers} ({model.n_layers} = final)",
        )
    return out


#: the default ranker layer sits at this fraction of the depth (the paper's region: the lower 25%)
RANKER_LAYER_FRACTION = 0.2


def default_ranker_layer(model: ChatModel | int) -> int:
    """The default SRR feature layer of a model (or of ``n_layers``): ``max(1, floor(0.2 * n_layers))``."""
    n_layers = model if isinstance(model, int) else model.n_layers
    return max(1, int(RANKER_LAYER_FRACTION * n_layers))


def hook_for_layer(model: ChatModel, layer: int) -> str:
    """Hook name of a feature layer (``n_layers`` = the final block's ``resid_post``)."""
    if layer == model.n_layers:
        return hook_point_name("resid_post", model.n_layers - 1)
    return hook_point_name("resid_pre", layer)


def read_token_states(
    model: ChatModel,
    rows: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int],
) -> Float[torch.Tensor, "n_rows n_positions n_layers d_model"]:
    """Residual states of pre-tokenised sequences at chosen token indices, in ONE batched pass.

    Args:
        rows: token ids per sequence (no padding; any length >= 1).
        positions: per row, the same number of token indices into that row (negative counts from
            its end), e.g. ``[[len(prompt) - 1, -1], ...]``.
        layers: feature layers (see the module docstring; ``n_layers`` = final, pre-norm).

    Returns:
        float32 CPU tensor ``[n_rows, n_positions, n_layers, d_model]``, raw HF basis.
    """
    layer_ids = check_layers(model, layers)
    if not rows or len(rows) != len(positions):
        raise LensSafetyError(
            f"{len(rows)} sequences with {len(positions)} position lists",
            "pass one position list per sequence",
        )
    width = max(len(r) for r in rows)
    if min(len(r) for r in rows) < 1:
        raise LensSafetyError(
            "an empty token sequence cannot be read", "give every sequence at least one token"
        )
    batch = model.chat.pad([list(r) for r in rows])
    index_rows = []
    for row, wanted in zip(rows, positions, strict=True):
        pad = width - len(row)
        idx = [(p if p >= 0 else len(row) + p) for p in wanted]
        if any(not 0 <= p < len(row) for p in idx):
            raise LensSafetyError(
                f"token positions {list(wanted)} outside a {len(row)}-token sequence",
                "use indices inside the sequence",
            )
        index_rows.append([pad + p for p in idx])
    index = torch.tensor(index_rows, dtype=torch.long)  # [n_rows, n_pos], moved to each hook's device

    def take(activation: torch.Tensor) -> torch.Tensor:
        gather = index.to(activation.device).unsqueeze(-1).expand(-1, -1, activation.shape[-1])
        return activation.gather(1, gather).float().cpu()

    points = [hook_for_layer(model, layer) for layer in layer_ids]
    return torch.stack(read_hook_points(model, batch, points, take), dim=2)


def prompt_token_ids(model: ChatModel, instruction: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the chat-formatted instruction (one BOS, ends with the assistant header)."""
    return model.chat.token_ids(model.chat.format(instruction, system_prompt))


def response_token_ids(model: ChatModel, response: str) -> list[int]:
    """Token ids of a response's text, without special tokens (empty text gives ``[]``)."""
    return list(model.tokenizer(response, add_special_tokens=False)["input_ids"])


def _response_only_row(model: ChatModel, response: str) -> list[int]:
    ids = response_token_ids(model, response)
    bos = model.tokenizer.bos_token_id
    lead = bos if bos is not None else model.tokenizer.eos_token_id
    return [int(lead), *ids] if lead is not None and (not ids or ids[0] != lead) else (ids or [0])


def list_features(
    model: ChatModel,
    instruction: str,
    responses: Sequence[str],
    layers: Sequence[int],
    contexts: Sequence[str] = POST_HOC_CONTEXTS,
    system_prompt: str | None = None,
) -> tuple[
    Float[torch.Tensor, "n_layers d_model"], dict[str, Float[torch.Tensor, "n_responses n_layers d_model"]]
]:
    """Features of one candidate list: the instruction and every response, per context.

    One batched pass per context: ``with_instruction`` reads the prompt's last token and each
    response's last token from the ``prompt + response`` sequences; ``response_only`` reads the
    last token of each response on its own. Returns ``(h_inst [n_layers, d], {context: h_resp})``.
    """
    for context in contexts:
        check_context(context)
        if context not in POST_HOC_CONTEXTS:
            raise LensSafetyError(
                f"the '{context}' context is read while sampling, not from texts",
                "use lens_safety.srr.capture.sample_with_states",
            )
    if not responses:
        raise LensSafetyError("a candidate list has no responses", "give every list at least one response")
    prompt = prompt_token_ids(model, instruction, system_prompt)
    joint_rows = [prompt + response_token_ids(model, r) for r in responses]
    joint = read_token_states(model, joint_rows, [[len(prompt) - 1, -1]] * len(joint_rows), layers)
    h_inst = joint[0, 0]
    out: dict[str, torch.Tensor] = {}
    if "with_instruction" in contexts:
        out["with_instruction"] = joint[:, 1]
    if "response_only" in contexts:
        alone = [_response_only_row(model, r) for r in responses]
        out["response_only"] = read_token_states(model, alone, [[-1]] * len(alone), layers)[:, 0]
    return h_inst, out
