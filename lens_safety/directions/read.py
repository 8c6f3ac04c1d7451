"""Read directions for conditional ROSI: where a model still *represents* harmfulness after its
refusal direction has been removed.

Conditional ROSI (:func:`lens_safety.edits.conditional_rosi`) edits every write ``v`` of the
residual writers of blocks ``start .. end - 1`` to ``v + alpha * s_hat * (g^T v)``: it copies the
part of each write along a *read* direction ``g`` onto the refusal direction ``s_hat``. Summed over
those writers (and ignoring the edit's effect on later blocks), the residual entering block ``end``
gains ``alpha * g^T (x_end - x_start) * s_hat``: refusal injected in proportion to how much the
edited blocks wrote along ``g``.

This module estimates ``g`` from a model's own activations (raw HF basis, last prompt token,
``resid_pre``; ``end == n_layers`` reads the final ``resid_post``)::

    delta_i = x_end,i - x_start,i                    (the edited blocks' summed writes)
    d       = mean_harmful(delta) - mean_harmless(delta)
    P       = the projector off span{ mean_harmless(delta), s_hat }
    g       = unit( P d )                        (default: the centred mean difference)
    g       = unit( (P C P + lambda I)^{-1} P d ) (``shrinkage``: LDA within the same complement,
                                                   C the pooled within-class covariance)

* Off the harmless mean: a harmless prompt's writes then carry on average *no* projection on ``g``,
  so the edit injects on average nothing into harmless prompts. Writers of the Llama family have no
  bias, so centring the read direction is the only way to make the injection zero-mean there.
* Off ``s_hat``: otherwise the injected refusal would be read again by later edited writers and
  amplified (a feedback loop); in an abliterated model the residual holds no ``s_hat`` anyway.

Optionally (``template=True``) ``g`` is also made orthogonal to ``x_end - x_start`` at every **chat
template** position the prompts share (first token / attention sink, system prompt, user header).
The edit acts at every position, not only the last prompt token ``g`` is fitted on, and those
positions are identical in every prompt, so whatever they write along ``g`` is a fixed dose of
refusal given to every prompt, harmful or not. Measured on the abliterated refusal organism (blocks
15..28): the last-token fit projects -1227 at the sink position and +12 on average over the other
template tokens (harmful last tokens: +61, harmless: 0). Removing that dose makes the edit more
selective at small injections (validation refusal / over-refusal 0.39 / 0.00 at injection 150) but
refusal then rises too slowly (0.53 / 0.02 at 200, 0.63 / 0.11 at 250, 0.69 / 0.25 at 300), while
the last-token fit gives 0.65 / 0.06 at 100 and reached 0.86 / 0.11 at 112.5 in the demonstration's
sweep. So the default keeps the dose (``docs/concepts/rosi.md`` has the curves).

Measured on the abliterated refusal organism (``docs/concepts/rosi.md``): the paper's ROSI, whose
read direction is the uniform ``1 / d_model`` (the write's mean coordinate), injects refusal into
every prompt alike; the read direction above makes the injection follow harmfulness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from lens_safety.activations import HookName, collect_activations
from lens_safety.chat import common_prefix_length
from lens_safety.edits.spec import unit_direction
from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel
from lens_safety.prompts import PromptSet, PromptSource
from lens_safety.vectors import DirectionLike


@dataclass
class ReadDirection:
    """A unit read direction ``g`` (raw HF basis) for the writers of blocks ``start .. end - 1``.

    Attributes:
        vector: ``[d_model]`` float64 unit vector, orthogonal to the harmless mean increment and to
            the refusal direction.
        start: first edited block; ``x_start`` is ``resid_pre`` of this block.
        end: one past the last edited block; ``x_end`` is ``resid_pre`` of block ``end`` (the final
            ``resid_post`` when ``end == n_layers``).
        harmful_mean / harmless_mean: mean of ``g^T (x_end - x_start)`` over the estimation prompts
            (``harmless_mean`` is 0 up to rounding, by construction).
        harmful_std / harmless_std: standard deviations of the same projections.
        n_harmful / n_harmless: prompts the estimate used.
        shrinkage: ``None`` (plain mean difference) or the ridge of the shrinkage-LDA estimate.
        template_positions: how many shared chat-template positions ``g`` is orthogonal to
            (0: fitted on the last token only).
    """

    vector: Float[torch.Tensor, " d_model"]
    start: int
    end: int
    harmful_mean: float
    harmless_mean: float
    harmful_std: float
    harmless_std: float
    n_harmful: int
    n_harmless: int
    shrinkage: float | None = None
    template_positions: int = 0

    @property
    def blocks(self) -> tuple[int, ...]:
        """The blocks whose writers the edit should touch: ``start .. end - 1``."""
        return tuple(range(self.start, self.end))

    @property
    def separation(self) -> float:
        """``(harmful_mean - harmless_mean) / pooled std``: how well ``g`` alone separates the classes."""
        pooled = ((self.harmful_std**2 + self.harmless_std**2) / 2) ** 0.5
        return (self.harmful_mean - self.harmless_mean) / pooled if pooled > 0 else float("inf")

    def alpha_for(self, injection: float) -> float:
        """The ``alpha`` whose injection along ``s_hat`` is ``injection`` for the mean harmful prompt.

        ``alpha * harmful_mean = injection`` (first order: the edit's effect on later blocks is not
        modelled, so calibrate the result on validation prompts).
        """
        if self.harmful_mean <= 0:
            raise LensSafetyError(
                f"harmful prompts project {self.harmful_mean:.3g} on the read direction (expected > 0)",
                "pick other blocks (start / end) or more prompts",
            )
        return float(injection) / self.harmful_mean

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "vector"}
        out["separation"] = self.separation
        out["d_model"] = int(self.vector.shape[0])
        return out


def centred_read_vector(
    harmful: Float[torch.Tensor, "n_harmful d_model"],
    harmless: Float[torch.Tensor, "n_harmless d_model"],
    refusal: Float[torch.Tensor, " d_model"],
    shrinkage: float | None = None,
    avoid: Float[torch.Tensor, "n_avoid d_model"] | None = None,
) -> Float[torch.Tensor, " d_model"]:
    """``unit(d - P d)`` with ``d`` the mean difference and ``P`` the projector onto
    ``span{mean(harmless), refusal, *avoid}`` (float64; inputs are increments ``x_end - x_start``;
    ``avoid``: further increments the read direction must ignore, e.g. the chat template's).

    With ``shrinkage`` (> 0) it is the shrinkage-LDA direction within that complement:
    ``(P C P + lambda I)^{-1} P d`` with ``P`` the complement's projector, ``C`` the pooled
    within-class covariance and ``lambda = shrinkage * trace(P C P) / (d_model - 2)`` (large
    ``shrinkage`` tends to the plain mean difference; small ones overfit when prompts are fewer
    than ``d_model``).
    """
    harmful, harmless = harmful.to(torch.float64), harmless.to(torch.float64)
    difference = harmful.mean(0) - harmless.mean(0)
    basis = _orthonormal_basis(
        [harmless.mean(0), refusal.to(torch.float64), *(() if avoid is None else avoid)]
    )
    eye = torch.eye(difference.shape[0], dtype=torch.float64)
    off_basis = eye - basis @ basis.T  # projector onto the complement of span{harmless mean, s, avoid}
    residual = off_basis @ difference
    if float(residual.norm()) <= 1e-9 * max(float(difference.norm()), 1e-30):
        raise LensSafetyError(
            "the harmful and harmless means differ only along the harmless mean, the refusal direction"
            " and the avoided increments",
            "pick other blocks (start / end): no read direction is left there",
        )
    if shrinkage is not None:
        if not shrinkage > 0:
            raise LensSafetyError(f"shrinkage must be > 0, got {shrinkage}", "pass None or a positive ridge")
        centred = torch.cat([harmful - harmful.mean(0), harmless - harmless.mean(0)]) @ off_basis
        covariance = centred.T @ centred / centred.shape[0]  # within the complement
        ridge = shrinkage * float(covariance.trace()) / (covariance.shape[0] - basis.shape[1])
        # (P C P + lambda I)^{-1} P d stays in the complement: the constrained LDA direction
        residual = off_basis @ torch.linalg.solve(covariance + ridge * eye, residual)
    return residual / residual.norm()


def _orthonormal_basis(columns: Sequence[torch.Tensor]) -> Float[torch.Tensor, "d_model rank"]:
    """An orthonormal basis of ``span(columns)`` (float64). Columns are scaled to unit norm first
    (the attention-sink position's increment can dwarf the others) and directions with
    singular value below ``1e-9`` are dropped, so dependent columns are harmless."""
    stacked = torch.stack([c.to(torch.float64) for c in columns], dim=1)
    stacked = stacked / stacked.norm(dim=0).clamp_min(1e-300)
    u, sv, _ = torch.linalg.svd(stacked, full_matrices=False)
    return u[:, sv > 1e-9 * float(sv.max())]


def shared_prefix_length(model: ChatModel, prompts: Sequence[str]) -> int:
    """Number of leading tokens every formatted prompt shares: the chat template before the
    instruction (first token, system prompt, user header)."""
    return common_prefix_length([model.chat.token_ids(model.chat.format(p)) for p in prompts])


def _increments(
    model: ChatModel,
    prompts: PromptSource,
    starts: Sequence[int],
    end: int,
    batch_size: int,
    progress: bool,
    positions: Sequence[int] = (-1,),
) -> dict[int, Float[torch.Tensor, "n n_positions d_model"]]:
    """``x_end - x_start`` for every start at ``positions``, float64, from ONE pass over the
    prompts (two when ``end == n_layers``: the final ``resid_post`` is another hook)."""
    n_layers = int(model.n_layers)
    layers = sorted({*starts, end}) if end < n_layers else sorted(set(starts))
    offsets = tuple(positions)

    def read(layers: Sequence[int], hook: HookName) -> Any:
        return collect_activations(
            model,
            prompts,
            layers=layers,
            positions=offsets,
            hook=hook,
            batch_size=batch_size,
            progress=progress,
        )

    acts = read(layers, "resid_pre")
    # the final resid_post when end == n_layers: another hook, another pass
    final = (
        acts.tensor[:, acts.layers.index(end)]
        if end < n_layers
        else read([n_layers - 1], "resid_post").tensor[:, 0]
    )
    return {start: (final - acts.tensor[:, acts.layers.index(start)]).to(torch.float64) for start in starts}


def template_increments(
    model: ChatModel, prompts: Sequence[str], starts: Sequence[int], end: int
) -> dict[int, Float[torch.Tensor, "n_template d_model"]]:
    """``x_end - x_start`` at every shared template position (:func:`shared_prefix_length`) of
    ``prompts``: identical for every prompt (causal attention), so read off the first one."""
    shared = shared_prefix_length(model, prompts)
    if shared == 0:
        return {start: torch.zeros(0, int(model.d_model), dtype=torch.float64) for start in starts}
    length = len(model.chat.token_ids(model.chat.format(prompts[0])))
    offsets = range(-length, -length + shared)
    return {k: v[0] for k, v in _increments(model, prompts[:1], starts, end, 1, False, offsets).items()}


def find_read_directions(
    model: ChatModel,
    harmful: PromptSource,
    harmless: PromptSource,
    refusal: DirectionLike,
    *,
    starts: Sequence[int],
    end: int | None = None,
    shrinkage: float | None = None,
    template: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[int, ReadDirection]:
    """:func:`find_read_direction` for several first blocks, reading the prompts once."""
    n_layers = int(model.n_layers)
    end = n_layers - 1 if end is None else int(end)
    bad = [start for start in starts if not 0 <= start < end <= n_layers]
    if bad or not starts:
        raise LensSafetyError(
            f"read blocks start={bad or '[]'}, end={end} are not 0 <= start < end <= {n_layers}",
            f"pick 0 <= start < end <= {n_layers}",
        )
    s_hat = unit_direction(refusal, int(model.d_model))
    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    if len(harmful_set) < 2 or len(harmless_set) < 2:
        raise LensSafetyError("a read direction needs at least 2 prompts per class", "pass more prompts")
    unique = sorted({int(start) for start in starts})
    deltas_h = _increments(model, harmful_set, unique, end, batch_size, progress)
    deltas_b = _increments(model, harmless_set, unique, end, batch_size, progress)
    avoid = template_increments(model, [*harmful_set, *harmless_set], unique, end) if template else None
    reads = {}
    for start in unique:
        h, b = deltas_h[start][:, -1], deltas_b[start][:, -1]
        shared = None if avoid is None else avoid[start]
        g = centred_read_vector(h, b, s_hat, shrinkage, shared)
        proj_h, proj_b = h @ g, b @ g
        reads[start] = ReadDirection(
            g,
            start,
            end,
            float(proj_h.mean()),
            float(proj_b.mean()),
            float(proj_h.std()),
            float(proj_b.std()),
            len(harmful_set),
            len(harmless_set),
            shrinkage,
            0 if shared is None else int(shared.shape[0]),
        )
    return reads


def find_read_direction(
    model: ChatModel,
    harmful: PromptSource,
    harmless: PromptSource,
    refusal: DirectionLike,
    *,
    start: int,
    end: int | None = None,
    shrinkage: float | None = None,
    template: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> ReadDirection:
    """Estimate the read direction of blocks ``start .. end - 1`` (default ``end``: ``n_layers - 1``).

    Args:
        model: the model to edit (e.g. an abliterated checkpoint), loaded without compatibility mode.
        harmful / harmless: estimation prompts (training prompts: never the ones you evaluate on).
        refusal: the refusal direction ``s_hat`` the edit will write (a ``Direction`` or a vector).
        start / end: the edited blocks; ``0 <= start < end <= n_layers``.
        shrinkage: ``None`` for the mean difference, or a shrinkage-LDA ridge (see
            :func:`centred_read_vector`).
        template: also make ``g`` orthogonal to the increments at the chat template's shared
            positions (module docstring; measured less effective on the refusal organism); default
            ``False``: the last prompt token only.
    """
    reads = find_read_directions(
        model,
        harmful,
        harmless,
        refusal,
        starts=[int(start)],
        end=end,
        shrinkage=shrinkage,
        template=template,
        batch_size=batch_size,
        progress=progress,
    )
    return reads[int(start)]
