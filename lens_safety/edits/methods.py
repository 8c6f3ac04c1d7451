"""The registry of weight-edit methods: one frozen object per method holds everything that differs
between them (its formula, how its strength is validated, its rank-one coefficients, the writers it
targets by default, its calibration grid, and whether it is exact through a post-norm).

The maths of the edits is :mod:`lens_safety.edits.spec`: every method but ``add_bias`` is the
rank-one update ``v' = v + a * s_hat * (g^T v)`` of the write vectors ``v`` (raw HF residual basis)
of the targeted writers, with ``(a, g)`` given here per method (:meth:`EditMethod.coefficients`);
``add_bias`` adds ``alpha * s_hat`` to each targeted bias and leaves weights alone.

*Exact on post-norm writers*: ``orthogonalize`` and ``add_bias`` are defined by what they do to the
residual stream (remove ``s_hat`` from every write; add a vector at one layer). A writer whose output
passes through a norm (Gemma 2/3) or is joined by a weightless write (XGLM's sinusoidal positions)
does not pass a weight edit through unchanged, so for them the edit is inexact: refused unless the
spec is ``approximate``, and then recorded ``exact: false`` by the export. ``rosi``,
``conditional_rosi`` and ``amplify`` are defined on the weights (the paper's ``W' = W + alpha s_hat
w_bar^T``), so they are exact by definition on every writer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal, TypeAlias

import torch
from jaxtyping import Float

from lens_safety.errors import LensSafetyError

#: the edit methods' names (the keys of :data:`EDIT_METHODS`, in order)
MethodName: TypeAlias = Literal["rosi", "conditional_rosi", "amplify", "orthogonalize", "add_bias"]
#: writer kinds an edit may target (besides exact writer names such as ``blocks.0.attn.o``)
WRITER_KINDS: tuple[str, ...] = ("embed", "pos_embed", "attn_out", "mlp_out", "mixer_out")
BLOCK_OUTPUTS: tuple[str, ...] = ("attn_out", "mlp_out", "mixer_out")

Vector: TypeAlias = Float[torch.Tensor, " d_model"]
#: ``g`` of a rank-one method from ``(s_hat, read)`` (both float64, raw HF basis; ``read`` may be None)
ReadRule: TypeAlias = Callable[[Vector, Vector | None], Vector]


def mean_read(s: Vector, read: Vector | None) -> Vector:
    """ROSI's ``g = 1 / d_model`` in every coordinate, so ``g^T v`` is the mean coordinate of ``v``."""
    d_model = int(s.shape[0])
    return torch.full((d_model,), 1.0 / d_model, dtype=torch.float64)


def given_read(s: Vector, read: Vector | None) -> Vector:
    """Conditional ROSI's ``g``: the spec's unit read direction."""
    if read is None:
        raise LensSafetyError("conditional_rosi needs a read direction", "build it with conditional_rosi()")
    return read.to(torch.float64)


def own_read(s: Vector, read: Vector | None) -> Vector:
    """``g = s_hat``: the part of each write along the direction itself (amplify, orthogonalize)."""
    return s


@dataclass(frozen=True)
class EditMethod:
    """One weight-edit method (module docstring).

    Attributes:
        name: the method's name in specs, ``edit.json`` and the CLI.
        label: how its errors name it (``ROSI`` for both ROSI variants).
        formula: the edit in one line, for model cards and docs.
        default_targets: writer kinds edited when a spec names none.
        min_alpha: the smallest accepted strength (``None``: the method has no strength and its
            spec stores ``alpha = 1.0``; ``-inf``: any finite number).
        alpha_why: why a strength below ``min_alpha`` is refused; ``alpha_fix``: what to do.
        read_rule: ``g`` of the rank-one update (``None``: not rank-one, an added bias).
        gain: a fixed ``a`` of the rank-one update (``None``: ``a = alpha``).
        needs_read: a spec of this method must carry a read direction (and only such a spec may).
        default_alphas: the calibration grid of strengths (``None``: not calibrated by
            :func:`~lens_safety.calibration.calibrate_alpha`); a sweep's strengths are ``> 0``
            (:meth:`check_sweep`).
        exact_on_post_norm: the edit stays exact on post-norm / fixed-with writers (module docstring).
        inexact_effect: what the weight edit fails to do on such a writer; ``exact_twin``: the
            inference-time intervention that does it exactly.
        biases_only: the edit touches biases only, and every targeted writer must have one.
        in_edit_job: :func:`~lens_safety.pipelines.run_edit` runs it (a refusal direction and one
            strength are all it needs).
    """

    name: MethodName
    label: str
    formula: str
    default_targets: tuple[str, ...]
    min_alpha: float | None
    alpha_why: str = ""
    alpha_fix: str = ""
    read_rule: ReadRule | None = None
    gain: float | None = None
    needs_read: bool = False
    default_alphas: tuple[float, ...] | None = None
    exact_on_post_norm: bool = True
    inexact_effect: str = ""
    exact_twin: str = ""
    biases_only: bool = False
    in_edit_job: bool = False

    @property
    def rank_one(self) -> bool:
        """Whether the edit is the rank-one update ``v' = v + a u (g^T v)`` (else an added bias)."""
        return self.read_rule is not None

    @property
    def has_strength(self) -> bool:
        """Whether ``alpha`` sets the edit's strength (``orthogonalize`` has none)."""
        return self.min_alpha is not None

    def check_alpha(self, alpha: float | None) -> float:
        """The ``alpha`` a spec stores (``None``: 1.0), or the one-line error naming the accepted range."""
        value = 1.0 if alpha is None else float(alpha)
        if not math.isfinite(value):
            raise LensSafetyError(f"alpha must be a finite number, got {alpha}", "pass a finite alpha")
        if self.min_alpha is None:
            if alpha is not None and value != 1.0:
                raise LensSafetyError(f"{self.name} takes no strength (got alpha={alpha})", self.alpha_fix)
            return 1.0
        if value < self.min_alpha:
            raise LensSafetyError(
                f"{self.label} alpha must be >= {self.min_alpha:g}, got {value} ({self.alpha_why})",
                self.alpha_fix,
            )
        return value

    def check_sweep(self, alphas: Iterable[float]) -> tuple[float, ...]:
        """The distinct strengths of a calibration sweep, sorted, each finite and ``> 0``: calibration
        looks for the least edit that adds enough refusal, 0 is the baseline (measured anyway) and a
        negative strength weakens refusal. Each is checked again by :meth:`check_alpha` when its
        spec is made."""
        values = sorted({float(a) for a in alphas})
        if not values:
            raise LensSafetyError("no alphas to sweep", "pass at least one alpha")
        for a in values:
            if not math.isfinite(a):
                raise LensSafetyError(f"alpha must be a finite number, got {a}", "pass finite alphas")
            if a <= 0:
                raise LensSafetyError(
                    f"{self.label} alphas must be > 0, got {a} (0 is the baseline, measured anyway; "
                    "< 0 weakens refusal)",
                    "pass positive alphas",
                )
        return tuple(values)

    def coefficients(self, alpha: float, s: Vector, read: Vector | None) -> tuple[float, Vector, Vector]:
        """``(a, u, g)`` of the rank-one update ``v' = v + a u (g^T v)`` (``s``: float64 unit direction)."""
        if self.read_rule is None:
            raise LensSafetyError(f"{self.name} is not a rank-one edit", "report this")
        return (alpha if self.gain is None else self.gain), s, self.read_rule(s, read)


ROSI = EditMethod(
    name="rosi",
    label="ROSI",
    formula="W' = W + alpha * s_hat * w_bar^T, w_bar = mean over the d_model rows of the original W (ROSI)",
    default_targets=BLOCK_OUTPUTS,
    min_alpha=0.0,
    alpha_why="a negative alpha removes safety",
    alpha_fix="pass alpha >= 0; to push away from refusal use orthogonalize instead",
    read_rule=mean_read,
    default_alphas=(3.0, 10.0, 30.0, 100.0),
    in_edit_job=True,
)
#: ROSI with the read direction ``g`` given instead of the writer's own mean row: the same bounds
#: and label; calibrated by its own job (injection grid), not by an alpha sweep
CONDITIONAL_ROSI = replace(
    ROSI,
    name="conditional_rosi",
    formula="W' = (I + alpha * s_hat g^T) W, g = the unit read direction (conditional ROSI)",
    read_rule=given_read,
    needs_read=True,
    default_alphas=None,
    in_edit_job=False,
)
AMPLIFY = EditMethod(
    name="amplify",
    label="amplify",
    formula="W' = (I + alpha * s_hat s_hat^T) W (projection amplification)",
    default_targets=BLOCK_OUTPUTS,
    min_alpha=-1.0,
    alpha_why="below -1 flips the direction",
    alpha_fix="pass alpha >= -1",
    read_rule=own_read,
    default_alphas=(0.03, 0.1, 0.3, 1.0),
    in_edit_job=True,
)
ORTHOGONALIZE = EditMethod(
    name="orthogonalize",
    label="orthogonalize",
    formula="W' = (I - s_hat s_hat^T) W (weight orthogonalisation, 'abliteration')",
    default_targets=("embed", "pos_embed", *BLOCK_OUTPUTS),
    min_alpha=None,
    alpha_fix="drop alpha, or use amplify with alpha in [-1, 0)",
    read_rule=own_read,
    gain=-1.0,
    exact_on_post_norm=False,
    inexact_effect="orthogonalising its weight does not remove the direction from the residual stream",
    exact_twin="ablate_direction",
    in_edit_job=True,
)
ADD_BIAS = EditMethod(
    name="add_bias",
    label="add_bias",
    formula="b' = b + coeff * r (activation addition baked into an output bias; alpha = coeff * |r|)",
    default_targets=("mlp_out",),
    min_alpha=-math.inf,
    exact_on_post_norm=False,
    inexact_effect="adding to its bias does not add the vector to the residual stream",
    exact_twin="add_direction",
    biases_only=True,
)

#: every edit method by name (read-only), in the order of :data:`MethodName`
EDIT_METHODS: Mapping[str, EditMethod] = MappingProxyType(
    {m.name: m for m in (ROSI, CONDITIONAL_ROSI, AMPLIFY, ORTHOGONALIZE, ADD_BIAS)}
)


def edit_method(name: str, allowed: Collection[str] | None = None) -> EditMethod:
    """The registered method ``name`` (one of ``allowed`` when given), else the one-line error
    ``unknown edit method`` listing the accepted names."""
    names = tuple(EDIT_METHODS) if allowed is None else tuple(allowed)
    if name not in names or name not in EDIT_METHODS:
        raise LensSafetyError(f"unknown edit method '{name}'", f"use one of {', '.join(names)}")
    return EDIT_METHODS[name]
