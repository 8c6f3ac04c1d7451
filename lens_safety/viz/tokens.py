"""Token view: each token's projection onto a direction, as a circuitsvis colored-tokens widget.

``token_projections`` reads ``resid_pre`` of one layer at EVERY token of the formatted prompt
(chat template included) and returns ``r_hat . x_i`` per token, in the raw HF residual basis.
``token_projection_view`` renders those values with circuitsvis (an HTML object that notebooks
display and ``str()`` turns into an HTML string).
"""

from __future__ import annotations

from typing import Any

from lens_safety.activations import HookName, collect_activations
from lens_safety.models import ChatModel
from lens_safety.vectors import DirectionLike, direction_vector, layer_of


def token_projections(
    model: ChatModel,
    prompt: str,
    direction: DirectionLike,
    *,
    layer: int | None = None,
    hook: HookName = "resid_pre",
    system_prompt: str | None = None,
) -> tuple[list[str], list[float]]:
    """``(tokens, r_hat . x_i)`` for every token of the formatted ``prompt`` at ``layer``.

    ``direction`` is a tensor or a :class:`~lens_safety.directions.Direction` (then ``layer``
    defaults to the direction's layer).
    """
    if layer is None:
        carried = layer_of(direction)
        layer = model.n_layers // 2 if carried is None else carried
    vector = direction_vector(direction).double()
    unit = vector / vector.norm()
    ids = model.chat.token_ids(model.chat.format(prompt, system_prompt))
    acts = collect_activations(
        model,
        [prompt],
        layers=[layer],
        positions=tuple(range(-len(ids), 0)),
        hook=hook,
        system_prompt=system_prompt,
    )
    values = (acts.tensor[0, 0].double() @ unit).tolist()
    tokens = [str(model.tokenizer.decode([i])) for i in ids]
    return tokens, values


def token_projection_view(
    model: ChatModel,
    prompt: str,
    direction: DirectionLike,
    *,
    layer: int | None = None,
    system_prompt: str | None = None,
) -> Any:
    """circuitsvis ``colored_tokens`` of each token's projection onto the direction."""
    from circuitsvis.tokens import colored_tokens

    tokens, values = token_projections(model, prompt, direction, layer=layer, system_prompt=system_prompt)
    return colored_tokens(tokens=tokens, values=values)
