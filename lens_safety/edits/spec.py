"""Weight edits of the residual-stream writers: ROSI, projection amplification, orthogonalisation.

Every residual writer maps its input to a *write vector* ``v`` in ``R^{d_model}`` (raw HF residual
basis): a Linear weight column (``W x``, weight ``(d_model, d_in)``), a Conv1D weight row (``x W``,
weight ``(d_in, d_model)``), an embedding row, or a bias. Each edit is one linear map of write
vectors, applied to every write of the targeted writers, without ever building a ``d x d`` matrix::

    v' = v + a * u * (g^T v)

================  ==================  ==========================  ===========================
method            a                   u                           g
================  ==================  ==========================  ===========================
``rosi``          ``alpha``           ``s_hat``                   ``1 / d_model`` (mean)
conditional       ``alpha``           ``s_hat``                   ``g`` (a unit read direction)
``amplify``       ``alpha``           ``s_hat``                   ``s_hat``
``orthogonalize`` ``-1``              ``s_hat``                   ``s_hat``
================  ==================  ==========================  ===========================

* ``rosi`` is the paper's ``W' = W + alpha * s_hat * w_bar^T`` with ``w_bar`` the mean of the
  ``d_model`` rows of the ORIGINAL weight (HF Linear: ``W.mean(0)``; Conv1D: transposed). A bias
  ``b`` is treated as one more write (``W x + b``): ``b' = b + alpha * s_hat * mean(b)``. Applied to
  embedding rows only when asked (``targets`` containing ``embed``).
* ``conditional_rosi`` is ``W' = (I + alpha s_hat g^T) W = W + alpha s_hat (W^T g)^T``: ROSI whose
  read vector is ``W^T g`` instead of ``w_bar = W^T (1 / d_model)``. It copies the part of every
  write along ``g`` onto ``s_hat``, so the refusal it injects follows whatever ``g`` detects (e.g.
  harmfulness, :func:`lens_safety.directions.read.find_read_direction`) instead of each write's
  mean coordinate. With ``g = s_hat`` it is ``amplify``; on an abliterated model (``s^T W = 0``)
  only a ``g`` other than ``s_hat`` can inject anything.
* ``amplify`` is ``(I + alpha s s^T) W``: it rescales the part of each write already along ``s``.
* ``orthogonalize`` is abliteration ``(I - s s^T) W``: weights, biases and embedding rows (position
  embeddings too). With tied embeddings the (unchanged) ``lm_head`` must be untied first; exports
  say so with ``untied: true``.

The writers are every attention, MLP and mixer output (``attn_out``, ``mlp_out``, ``mixer_out``).
In a mixture-of-experts block every expert is a writer: a fused ``[n_experts, d_model, d_in]``
tensor (``[n_experts, d_in, d_model]`` in the Conv1D orientation, with an ``[n_experts, d_model]``
bias) is edited slice by slice, so ROSI's ``w_bar`` is each expert's own row mean and abliteration
projects every expert's writes and bias. Shared experts and dense MLPs are writers as well; router
weights only read the residual and are never edited.

All arithmetic is float64; results are cast back to the parameter's dtype once. ``w_bar`` of a
TransformerLens-centred writer is exactly zero, so ROSI is always computed from the original
weights on disk (``model.hf_path``), never from compatibility-mode (processed) weights.

Gemma 2/3 writers (and Bloom's embedding) pass through a norm (``ResidualWriter.post_norm``): there a weight edit is
not a residual edit. ``orthogonalize`` and ``add_bias`` refuse such writers unless ``approximate=True``,
which the export records (``exact: false``); ROSI/amplify apply the formula to the weight as the paper
does. Everything that differs between methods (alpha ranges, ``(a, u, g)``, default targets and
alphas, exactness) is one object per method in :data:`lens_safety.edits.methods.EDIT_METHODS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from jaxtyping import Float

from lens_safety.edits.methods import EDIT_METHODS, MethodName, edit_method
from lens_safety.errors import LensSafetyError
from lens_safety.hashing import sha256_vector
from lens_safety.vectors import DirectionLike, direction_vector, layer_of

if TYPE_CHECKING:
    from lens_safety.directions.read import ReadDirection

#: a conditional-ROSI read direction: a ReadDirection (its ``.vector``) or a ``[d_model]`` tensor
ReadVector: TypeAlias = "ReadDirection | Float[torch.Tensor, ' d_model']"

#: the names of :data:`~lens_safety.edits.methods.EDIT_METHODS` (every method :func:`make_spec` builds)
METHODS: tuple[str, ...] = tuple(EDIT_METHODS)
#: each method's default writer kinds (a view of the registry)
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {m.name: m.default_targets for m in EDIT_METHODS.values()}


def unit_direction(direction: DirectionLike, d_model: int | None = None) -> Float[torch.Tensor, " d_model"]:
    """A float64 unit vector from a ``Direction`` (its ``.direction``) or any 1-D tensor (raw HF basis)."""
    tensor = direction_vector(direction).detach().to("cpu", torch.float64)
    if tensor.ndim != 1:
        raise LensSafetyError(f"direction has shape {tuple(tensor.shape)}", "pass a 1-D [d_model] vector")
    if d_model is not None and tensor.shape[0] != d_model:
        raise LensSafetyError(
            f"direction has width {tensor.shape[0]} but the model's residual width is {d_model}",
            "use a direction extracted from this architecture",
        )
    if not torch.isfinite(tensor).all():
        raise LensSafetyError("direction contains NaN or inf", "re-extract the direction")
    norm = tensor.norm()
    if norm == 0:
        raise LensSafetyError("direction is the zero vector", "use a non-zero direction")
    return tensor / norm


@dataclass(frozen=True)
class EditSpec:
    """A serialisable weight edit.

    Attributes:
        method: a name of :data:`~lens_safety.edits.methods.EDIT_METHODS`.
        direction: unit ``[d_model]`` float64 vector in the raw HF residual basis.
        alpha: strength (``rosi``: >= 0; ``amplify``: >= -1; ``orthogonalize``: unused, 1.0;
            :meth:`EditMethod.check_alpha <lens_safety.edits.methods.EditMethod.check_alpha>`).
        targets: writer kinds (``embed``, ``pos_embed``, ``attn_out``, ``mlp_out``) or writer names
            (``blocks.3.attn.o``); default: the method's ``default_targets``.
        layers: blocks whose writers are edited (``None``: all); embeddings are not blocks and
            are edited whenever they are targeted.
        approximate: allow a method that is inexact on post-norm / fixed-with writers
            (``orthogonalize``, ``add_bias``: ``exact_on_post_norm`` false) to edit them anyway.
        direction_layer: the layer the direction was read at (recorded, not used by the maths).
        read: ``conditional_rosi`` only: the unit ``[d_model]`` float64 read direction ``g``.
    """

    method: MethodName
    direction: Float[torch.Tensor, " d_model"]
    alpha: float = 1.0
    targets: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    approximate: bool = False
    direction_layer: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    read: Float[torch.Tensor, " d_model"] | None = None

    def to_dict(self) -> dict[str, Any]:
        read = {} if self.read is None else {"read_sha256": sha256_vector(self.read.tolist())}
        return {
            **read,
            "method": self.method,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "layers": None if self.layers is None else list(self.layers),
            "approximate": self.approximate,
            "direction_layer": self.direction_layer,
            "d_model": int(self.direction.shape[0]),
            **self.extra,
        }


def make_spec(
    method: str,
    direction: DirectionLike,
    *,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    approximate: bool = False,
    d_model: int | None = None,
    direction_layer: int | None = None,
    read: ReadVector | None = None,
) -> EditSpec:
    """Validate inputs and build an :class:`EditSpec` (see the module docstring for the maths).

    ``method`` is looked up in :data:`~lens_safety.edits.methods.EDIT_METHODS`, which validates
    ``alpha`` and supplies the default ``targets``; ``read`` is required by (and only accepted
    for) a method that ``needs_read``.
    """
    kind = edit_method(method)
    if (read is None) == kind.needs_read:
        raise LensSafetyError(
            f"a read direction is {'needed' if read is None else 'only used'} by conditional_rosi (method {method})",
            "pass read= with method conditional_rosi only (find_read_direction estimates one)",
        )
    value = kind.check_alpha(alpha)
    if direction_layer is None:
        direction_layer = layer_of(direction)
    chosen = tuple(targets) if targets else kind.default_targets
    unit = unit_direction(direction, d_model)
    return EditSpec(
        method=kind.name,
        direction=unit,
        alpha=value,
        targets=chosen,
        layers=None if layers is None else tuple(int(x) for x in layers),
        approximate=approximate,
        direction_layer=None if direction_layer is None else int(direction_layer),
        read=None
        if read is None
        else unit_direction(torch.as_tensor(getattr(read, "vector", read)), int(unit.shape[0])),
    )


def rosi(direction: DirectionLike, alpha: float, **kwargs: Any) -> EditSpec:
    """ROSI: ``W' = W + alpha * s_hat * w_bar^T`` on every attention/MLP output (embedding optional)."""
    return make_spec("rosi", direction, alpha=alpha, **kwargs)


def conditional_rosi(direction: DirectionLike, read: ReadVector, alpha: float, **kwargs: Any) -> EditSpec:
    """Conditional ROSI ``W' = (I + alpha s_hat g^T) W`` on every attention/MLP output.

    ``read`` is the unit read direction ``g`` (a tensor, or a
    :class:`~lens_safety.directions.read.ReadDirection`, whose blocks become the default ``layers``).
    """
    if "layers" not in kwargs and hasattr(read, "blocks"):
        kwargs["layers"] = read.blocks
    return make_spec("conditional_rosi", direction, alpha=alpha, read=read, **kwargs)


def amplify(direction: DirectionLike, alpha: float, **kwargs: Any) -> EditSpec:
    """Projection amplification ``W' = (I + alpha s s^T) W`` on every attention/MLP output."""
    return make_spec("amplify", direction, alpha=alpha, **kwargs)


def orthogonalize(direction: DirectionLike, **kwargs: Any) -> EditSpec:
    """Weight orthogonalisation (abliteration) ``W' = (I - s s^T) W``, embeddings and biases included."""
    return make_spec("orthogonalize", direction, **kwargs)


def _coefficients(
    spec: EditSpec,
) -> tuple[float, Float[torch.Tensor, " d_model"], Float[torch.Tensor, " d_model"]] | None:
    """``(a, u, g)`` of the spec's rank-one update (:meth:`EditMethod.coefficients
    <lens_safety.edits.methods.EditMethod.coefficients>`), or ``None`` for an added bias."""
    kind = edit_method(spec.method)
    if not kind.rank_one:
        return None
    read = None if spec.read is None else spec.read.to(torch.float64)
    return kind.coefficients(spec.alpha, spec.direction.to(torch.float64), read)


def stacked(tensor: torch.Tensor, layout: str, is_bias: bool) -> bool:
    """Whether ``tensor`` has a leading expert axis (a fused expert weight or bias)."""
    return tensor.ndim == (2 if is_bias else 3) and layout != "embedding"


def edit_writes(spec: EditSpec, tensor: torch.Tensor, layout: str, is_bias: bool = False) -> torch.Tensor:
    """Apply ``v' = v + a u (g^T v)`` to every write vector of one parameter; float64 in, float64 out.

    Layouts: ``linear`` weight ``(d_model, d_in)`` (columns are writes), ``conv1d`` weight
    ``(d_in, d_model)`` and ``embedding`` ``(vocab, d_model)`` (rows are writes), bias ``(d_model,)``.
    A fused expert tensor (``[n_experts, ...]`` weight, ``[n_experts, d_model]`` bias) is edited
    one expert at a time, each slice as its own writer (ROSI: ``w_bar`` per expert).
    """
    d_model = int(spec.direction.shape[0])
    update = _coefficients(spec)
    w = tensor.to(torch.float64)
    if update is None:
        return _added_bias(spec, w, is_bias)
    a, u, g = update
    if stacked(w, layout, is_bias):
        return torch.stack([edit_writes(spec, part, layout, is_bias) for part in w.unbind(0)])
    if is_bias:
        if w.shape != (d_model,):
            raise LensSafetyError(
                f"bias of shape {tuple(w.shape)} does not match width {d_model}", "check the direction"
            )
        return w + a * u * (g @ w)
    if layout == "linear":
        if w.shape[0] != d_model:
            raise LensSafetyError(
                f"weight of shape {tuple(w.shape)} does not write width {d_model}", "check the direction"
            )
        return torch.addr(w, u, g @ w, alpha=a)  # one fused rank-one update, no d x d_in temporary
    if w.shape[-1] != d_model:
        raise LensSafetyError(
            f"weight of shape {tuple(w.shape)} does not write width {d_model}", "check the direction"
        )
    return torch.addr(w, w @ g, u, alpha=a)


def require_finite(name: str, base: torch.Tensor, edited: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse an edit whose result is NaN / inf once stored in ``dtype`` (an absurd alpha
    overflowing the weights), or a base tensor that already was."""
    stored = str(dtype).replace("torch.", "")
    if not torch.isfinite(base).all():
        raise LensSafetyError(
            f"the checkpoint's {name} already holds NaN or inf values",
            "re-download the checkpoint or use another one",
        )
    if not torch.isfinite(edited.to(dtype)).all():
        raise LensSafetyError(
            f"the edit makes {name} not finite in {stored} (alpha too large for these weights)",
            "pass a smaller --alpha, or let calibration choose it (--alpha auto)",
        )


def edit_writes_inplace(
    spec: EditSpec, work: torch.Tensor, layout: str, is_bias: bool = False
) -> torch.Tensor:
    """:func:`edit_writes` computed in place in a float64 ``work`` tensor (same ops, same bits).

    Used by the export to edit tensors in reusable buffers instead of fresh allocations.
    """
    if work.dtype != torch.float64:
        raise TypeError("work must be float64")
    d_model = int(spec.direction.shape[0])
    update = _coefficients(spec)
    if update is None:
        work.copy_(_added_bias(spec, work, is_bias))
        return work
    a, u, g = update
    if stacked(work, layout, is_bias):
        for part in work.unbind(0):
            edit_writes_inplace(spec, part, layout, is_bias)
        return work
    if is_bias:
        if work.shape != (d_model,):
            raise LensSafetyError(
                f"bias of shape {tuple(work.shape)} does not match width {d_model}", "check the direction"
            )
        work.copy_(work + a * u * (g @ work))
        return work
    if layout == "linear":
        if work.shape[0] != d_model:
            raise LensSafetyError(
                f"weight of shape {tuple(work.shape)} does not write width {d_model}", "check the direction"
            )
        return work.addr_(u, g @ work, alpha=a)
    if work.shape[-1] != d_model:
        raise LensSafetyError(
            f"weight of shape {tuple(work.shape)} does not write width {d_model}", "check the direction"
        )
    return work.addr_(work @ g, u, alpha=a)


def _added_bias(spec: EditSpec, bias: torch.Tensor, is_bias: bool) -> torch.Tensor:
    """``b' = b + alpha * s_hat`` (``alpha * s_hat`` is the added vector ``coeff * r``), float64."""
    if not is_bias or bias.shape != spec.direction.shape:
        raise LensSafetyError(
            f"add_bias edits a [d_model] bias, got a tensor of shape {tuple(bias.shape)}", "report this"
        )
    return bias + spec.alpha * spec.direction.to(torch.float64)


def add_bias(
    direction_or_vector: DirectionLike, coeff: float, layer: int, *, via: str = "mlp_out"
) -> EditSpec:
    """Activation addition ``x^(layer) <- x^(layer) + coeff * r`` baked into a writer's output bias.

    ``r`` follows :func:`lens_safety.interventions.add_direction` exactly: a ``Direction``'s
    ``.direction`` (unit) or the given ``[d_model]`` tensor as is (raw HF basis), so
    ``add_bias(r, c, l)`` exported equals ``add_direction(model, r, layer=l, coeff=c)`` at every
    position. ``via="mlp_out"`` (default) adds to the MLP-output bias of block ``layer - 1``, whose
    write IS the residual entering block ``layer``; ``via="attn_out"`` adds to the attention-output
    bias of block ``layer`` instead, which the attention of block ``layer`` does not see (it equals
    adding at ``blocks.{layer}.hook_resid_mid``). Writers without a bias (the Llama family) are
    refused; post-norm writers (Gemma 2/3) make it inexact and are refused unless ``approximate``.
    Stored as ``direction = r / |r|``, ``alpha = coeff * |r|``.
    """
    vector = direction_vector(direction_or_vector).detach().to("cpu", torch.float64)
    if not math.isfinite(float(coeff)):
        raise LensSafetyError(f"coeff must be a finite number, got {coeff}", "pass a finite coeff")
    if via not in ("mlp_out", "attn_out"):
        raise LensSafetyError(f"unknown bias slot '{via}'", "use mlp_out or attn_out")
    block = int(layer) - 1 if via == "mlp_out" else int(layer)
    if block < 0:
        raise LensSafetyError(
            f"layer {layer} has no MLP before it to carry the bias", "use layer >= 1, or via='attn_out'"
        )
    unit = unit_direction(vector)
    return EditSpec(
        method="add_bias",
        direction=unit,
        alpha=float(coeff) * float(vector.norm()),
        targets=(via,),
        layers=(block,),
        direction_layer=int(layer),
        extra={"coeff": float(coeff), "vector_norm": float(vector.norm()), "bias_slot": via},
    )
