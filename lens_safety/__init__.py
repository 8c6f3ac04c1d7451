"""lens-safety: safety interpretability for chat LLMs on TransformerLens.

Read residual activations (:func:`collect_activations`), find refusal directions, probe every
layer, edit weights (ROSI, abliteration), export verified Hugging Face models, and rank sampled
responses by safety (SRR). Every vector is stored in the raw Hugging Face residual basis.
"""

from lens_safety.activations import Activations, ActivationSums, collect_activations, sum_activations
from lens_safety.architecture import ArchitectureFacts, ResidualWriter
from lens_safety.calibration import CalibrationResult, calibrate_alpha, calibrate_block_range, calibrate_layer
from lens_safety.chat import ChatFormatter
from lens_safety.directions import Direction, extract_directions, find_direction, load_direction
from lens_safety.edits import add_bias, amplify, applied_edit, orthogonalize, rosi
from lens_safety.errors import LensSafetyError
from lens_safety.export import export_edit
from lens_safety.interventions import ablate_direction, add_direction
from lens_safety.models import ChatModel, load_model
from lens_safety.probing import probe_layers
from lens_safety.prompts import PromptSet

__version__ = "0.1.0"

__all__ = [
    "ActivationSums",
    "Activations",
    "ArchitectureFacts",
    "CalibrationResult",
    "ChatFormatter",
    "ChatModel",
    "Direction",
    "LensSafetyError",
    "PromptSet",
    "ResidualWriter",
    "__version__",
    "ablate_direction",
    "add_bias",
    "add_direction",
    "amplify",
    "applied_edit",
    "calibrate_alpha",
    "calibrate_block_range",
    "calibrate_layer",
    "collect_activations",
    "export_edit",
    "extract_directions",
    "find_direction",
    "load_direction",
    "load_model",
    "orthogonalize",
    "probe_layers",
    "rosi",
    "sum_activations",
]
