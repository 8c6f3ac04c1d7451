"""lens-safety: safety interpretability for chat LLMs on TransformerLens.

Read residual activations (:func:`collect_activations`), find refusal directions, probe every
layer, edit weights (ROSI, abliteration), export verified Hugging Face models, and rank sampled
responses by safety (SRR). Every vector is stored in the raw Hugging Face residual basis.
"""

from lens_safety.activations import Activations, ActivationSums, collect_activations, sum_activations
from lens_safety.architecture import ArchitectureFacts, ResidualWriter
from lens_safety.chat import ChatFormatter
from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel, load_model
from lens_safety.prompts import PromptSet

__version__ = "0.1.0"

__all__ = [
    "ActivationSums",
    "Activations",
    "ArchitectureFacts",
    "ChatFormatter",
    "ChatModel",
    "LensSafetyError",
    "PromptSet",
    "ResidualWriter",
    "__version__",
    "collect_activations",
    "load_model",
    "sum_activations",
]
