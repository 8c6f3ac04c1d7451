"""Weight edits of the residual-stream writers (ROSI, conditional ROSI, amplification, orthogonalisation,
added bias).

:mod:`lens_safety.edits.methods` is the registry of methods (one object per method:
validation, coefficients, default targets and alphas, exactness),
:mod:`lens_safety.edits.spec` holds the maths (pure functions of a spec and base tensors),
:mod:`lens_safety.edits.targets` which parameters an edit touches and the pure state-dict edit,
:mod:`lens_safety.edits.memory` applies an edit to a loaded model reversibly,
:mod:`lens_safety.edits.checkpoint` reads the original weights shard by shard and
:mod:`lens_safety.edits.stored` locates each writer's tensors in the checkpoint (fused expert
tensors may be stored per expert, renamed or transposed).
"""

from lens_safety.edits.checkpoint import read_tensors, weight_shards
from lens_safety.edits.memory import applied_edit, edit_deltas, live_parameters
from lens_safety.edits.methods import EDIT_METHODS, WRITER_KINDS, EditMethod, edit_method
from lens_safety.edits.spec import (
    DEFAULT_TARGETS,
    METHODS,
    EditSpec,
    add_bias,
    amplify,
    conditional_rosi,
    edit_writes,
    edit_writes_inplace,
    make_spec,
    orthogonalize,
    rosi,
    unit_direction,
)
from lens_safety.edits.targets import compute_edit, edits_embedding, select_writers, target_parameters

__all__ = [
    "DEFAULT_TARGETS",
    "EDIT_METHODS",
    "METHODS",
    "WRITER_KINDS",
    "EditMethod",
    "EditSpec",
    "add_bias",
    "amplify",
    "applied_edit",
    "compute_edit",
    "conditional_rosi",
    "edit_deltas",
    "edit_method",
    "edit_writes",
    "edit_writes_inplace",
    "edits_embedding",
    "live_parameters",
    "make_spec",
    "orthogonalize",
    "read_tensors",
    "rosi",
    "select_writers",
    "target_parameters",
    "unit_direction",
    "weight_shards",
]
