"""Candidate refusal directions for every layer and every post-instruction position.

``extract_directions(model, harmful, harmless)`` reads ``resid_pre`` (raw HF basis) of both prompt
sets at every layer and every post-instruction position (or the positions given), and applies one
extraction method (:mod:`lens_safety.directions.methods`) per (position, layer). The result,
:class:`Candidates`, keeps every raw candidate ``r_i^(l)`` (float64), the class means, and the
training-set projections statistics that selection uses to explain itself (where the harmful and
harmless means project onto ``r_hat``, and hence where plain ablation, which sets the projection
to 0, moves each class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float

from lens_safety.activations import HookName, PositionSpec, ResidualReader, collect_activations
from lens_safety.directions.methods import get_method
from lens_safety.evaluation.separation import effect_size, paired_indices, validate_classes
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.prompts import PromptSet, PromptSource


@dataclass
class Candidates:
    """Raw candidate directions ``[n_positions, n_layers, d_model]`` (float64, raw HF basis).

    Attributes:
        vectors: ``vectors[p, l]`` = the method's raw direction at ``positions[p]``, ``layers[l]``
            (harmful-minus-harmless sign).
        harmful_mean / harmless_mean: class means of the activations, same layout.
        harmful_projection / harmless_projection: ``[n_positions, n_layers]`` projections of the
            class means onto ``r_hat`` (a plain ablation sets every prompt's projection to 0).
        effect_size: ``[n_positions, n_layers]`` Cohen's d of the training projections onto ``r_hat``.
    """

    vectors: Float[torch.Tensor, "n_positions n_layers d_model"]
    harmful_mean: Float[torch.Tensor, "n_positions n_layers d_model"]
    harmless_mean: Float[torch.Tensor, "n_positions n_layers d_model"]
    effect_size: Float[torch.Tensor, "n_positions n_layers"]
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    method: str
    hook: str
    space: str
    harmful: PromptSet
    harmless: PromptSet
    system_prompt: str | None
    model_identity: dict[str, Any] = field(default_factory=dict)

    def _index(self, layer: int, position: int) -> tuple[int, int]:
        return self.positions.index(position), self.layers.index(layer)

    def vector(self, layer: int, position: int) -> Float[torch.Tensor, " d_model"]:
        """The raw candidate at (layer, position), float64."""
        p, k = self._index(layer, position)
        return self.vectors[p, k]

    def unit(self, layer: int, position: int) -> Float[torch.Tensor, " d_model"]:
        """``r_hat`` at (layer, position), float64."""
        vec = self.vector(layer, position)
        return vec / vec.norm()

    @property
    def harmful_projection(self) -> Float[torch.Tensor, "n_positions n_layers"]:
        return _project(self.harmful_mean, self.vectors)

    @property
    def harmless_projection(self) -> Float[torch.Tensor, "n_positions n_layers"]:
        return _project(self.harmless_mean, self.vectors)

    def reference_projections(self, layer: int, position: int) -> dict[int, float]:
        """Harmless mean projection onto ``r_hat(layer, position)`` at EVERY layer (same position),
        the per-layer reference ``m_l`` of an affine ablation."""
        unit = self.unit(layer, position)
        p = self.positions.index(position)
        return {lay: float(self.harmless_mean[p, k] @ unit) for k, lay in enumerate(self.layers)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "hook": self.hook,
            "space": self.space,
            "layers": list(self.layers),
            "positions": list(self.positions),
            "norms": self.vectors.norm(dim=-1).tolist(),
            "harmful_projection": self.harmful_projection.tolist(),
            "harmless_projection": self.harmless_projection.tolist(),
            "effect_size": self.effect_size.tolist(),
            "harmful": self.harmful.metadata(),
            "harmless": self.harmless.metadata(),
            "system_prompt": self.system_prompt,
            "model": self.model_identity,
        }


def _project(means: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    norms = vectors.norm(dim=-1).clamp_min(1e-30)
    return (means * vectors).sum(-1) / norms


def extract_directions(
    model: ChatModel,
    harmful: PromptSource,
    harmless: PromptSource,
    *,
    method: str = "mean-diff",
    layers: Sequence[int] | None = None,
    positions: PositionSpec = "post_instruction",
    hook: HookName = "resid_pre",
    system_prompt: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
    reader: ResidualReader | None = None,
) -> Candidates:
    """Candidate directions for every (position, layer).

    Args:
        model: a loaded :class:`~lens_safety.models.ChatModel`.
        harmful / harmless: the two training classes (>= 2 prompts each, no shared prompt).
        method: ``mean-diff`` (default), ``pca`` (of topic-paired differences) or ``probe``.
        layers: blocks to read (default all); row ``l`` is ``resid_pre`` of block ``l``.
        positions: ``"post_instruction"`` (default) or negative offsets.
        system_prompt: wrapped around both classes at extraction time (ROSI's recipe for models
            that barely refuse); drop it at test time.
        reader: read the activations through another engine (e.g.
            :class:`~lens_safety.evaluation.vllm_engine.VLLMReader`) instead of the bridge.
    """
    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    validate_classes(harmful_set, harmless_set)
    extract = get_method(method)
    reads = [
        collect_activations(
            model,
            prompts,
            layers=layers,
            positions=positions,
            hook=hook,
            batch_size=batch_size,
            system_prompt=system_prompt,
            progress=progress,
            reader=reader,
        )
        for prompts in (harmful_set, harmless_set)
    ]
    acts_h, acts_b = reads[0].tensor.double(), reads[1].tensor.double()
    pairs = paired_indices(harmful_set, harmless_set)
    n_pos, n_layers = len(reads[0].positions), len(reads[0].layers)
    vectors = torch.zeros(n_pos, n_layers, model.d_model, dtype=torch.float64)
    effects = torch.zeros(n_pos, n_layers, dtype=torch.float64)
    cells = [(p, k) for p in range(n_pos) for k in range(n_layers)]
    for p, k in track(cells, f"extracting {method}", total=len(cells), enabled=progress):
        h, b = acts_h[:, k, p], acts_b[:, k, p]
        vec = extract(h, b, pairs)
        vectors[p, k] = vec
        if vec.norm() > 0:
            unit = vec / vec.norm()
            effects[p, k] = effect_size((h @ unit).numpy(), (b @ unit).numpy())
    return Candidates(
        vectors=vectors,
        harmful_mean=acts_h.mean(0).transpose(0, 1).contiguous(),
        harmless_mean=acts_b.mean(0).transpose(0, 1).contiguous(),
        effect_size=effects,
        layers=reads[0].layers,
        positions=reads[0].positions,
        method=method,
        hook=hook,
        space=reads[0].space,
        harmful=harmful_set,
        harmless=harmless_set,
        system_prompt=system_prompt,
        model_identity=model.identity(),
    )
