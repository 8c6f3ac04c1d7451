"""lens-safety: safety interpretability for chat LLMs on TransformerLens.

Read residual activations (:func:`collect_activations`), find refusal directions, probe every
layer, edit weights (ROSI, abliteration), export verified Hugging Face models, measure them
(:func:`evaluate_model`), and rank sampled responses by safety (SRR: :func:`train_ranker_directory`,
then :func:`lens_safety.srr.select` or ``lens-safety srr serve``). Every vector is stored in the raw
Hugging Face residual basis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lens_safety.lazy import lazy_exports

if TYPE_CHECKING:
    from lens_safety import srr
    from lens_safety.activations import Activations, ActivationSums, collect_activations, sum_activations
    from lens_safety.architecture import ArchitectureFacts, ResidualWriter
    from lens_safety.calibration import (
        CalibrationResult,
        calibrate_alpha,
        calibrate_block_range,
        calibrate_layer,
    )
    from lens_safety.chat import ChatFormatter
    from lens_safety.directions import Direction, extract_directions, find_direction, load_direction
    from lens_safety.edits import add_bias, amplify, applied_edit, orthogonalize, rosi
    from lens_safety.errors import LensSafetyError
    from lens_safety.evaluation import (
        Judge,
        ModelEvaluation,
        RefusalEvaluation,
        evaluate_model,
        evaluate_refusal,
        evaluate_utility,
        get_judge,
        kl_divergence,
        refusal_rate,
    )
    from lens_safety.export import export_edit
    from lens_safety.interventions import ablate_direction, add_direction
    from lens_safety.models import ChatModel, load_model
    from lens_safety.organism.demonstration import Demonstration, DemoSettings, demonstrate
    from lens_safety.pipelines import (
        ConditionalRun,
        ConditionalSettings,
        EditRun,
        EditSettings,
        run_conditional,
        run_edit,
    )
    from lens_safety.probing import probe_layers
    from lens_safety.prompts import PromptSet, PromptSource
    from lens_safety.srr import BestOfN, RankerTraining, SafetyRanker, load_ranker, train_ranker_directory

#: public name -> module that defines it. Imported on first use (PEP 562), so ``import lens_safety``
#: and ``lens-safety --help`` do not load torch and transformers.
_EXPORTS = {
    "ablate_direction": "lens_safety.interventions",
    "Activations": "lens_safety.activations",
    "ActivationSums": "lens_safety.activations",
    "add_bias": "lens_safety.edits",
    "add_direction": "lens_safety.interventions",
    "amplify": "lens_safety.edits",
    "applied_edit": "lens_safety.edits",
    "ArchitectureFacts": "lens_safety.architecture",
    "BestOfN": "lens_safety.srr",
    "calibrate_alpha": "lens_safety.calibration",
    "calibrate_block_range": "lens_safety.calibration",
    "calibrate_layer": "lens_safety.calibration",
    "CalibrationResult": "lens_safety.calibration",
    "ChatFormatter": "lens_safety.chat",
    "ChatModel": "lens_safety.models",
    "collect_activations": "lens_safety.activations",
    "ConditionalRun": "lens_safety.pipelines",
    "ConditionalSettings": "lens_safety.pipelines",
    "demonstrate": "lens_safety.organism.demonstration",
    "Demonstration": "lens_safety.organism.demonstration",
    "DemoSettings": "lens_safety.organism.demonstration",
    "Direction": "lens_safety.directions",
    "EditRun": "lens_safety.pipelines",
    "EditSettings": "lens_safety.pipelines",
    "evaluate_model": "lens_safety.evaluation",
    "evaluate_refusal": "lens_safety.evaluation",
    "evaluate_utility": "lens_safety.evaluation",
    "export_edit": "lens_safety.export",
    "extract_directions": "lens_safety.directions",
    "find_direction": "lens_safety.directions",
    "get_judge": "lens_safety.evaluation",
    "Judge": "lens_safety.evaluation",
    "kl_divergence": "lens_safety.evaluation",
    "LensSafetyError": "lens_safety.errors",
    "load_direction": "lens_safety.directions",
    "load_model": "lens_safety.models",
    "load_ranker": "lens_safety.srr",
    "ModelEvaluation": "lens_safety.evaluation",
    "orthogonalize": "lens_safety.edits",
    "probe_layers": "lens_safety.probing",
    "PromptSet": "lens_safety.prompts",
    "PromptSource": "lens_safety.prompts",
    "RankerTraining": "lens_safety.srr",
    "refusal_rate": "lens_safety.evaluation",
    "RefusalEvaluation": "lens_safety.evaluation",
    "ResidualWriter": "lens_safety.architecture",
    "rosi": "lens_safety.edits",
    "run_conditional": "lens_safety.pipelines",
    "run_edit": "lens_safety.pipelines",
    "SafetyRanker": "lens_safety.srr",
    "srr": "lens_safety.srr",
    "sum_activations": "lens_safety.activations",
    "train_ranker_directory": "lens_safety.srr",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__version__ = "0.1.0"

__all__ = [
    "ActivationSums",
    "Activations",
    "ArchitectureFacts",
    "BestOfN",
    "CalibrationResult",
    "ChatFormatter",
    "ChatModel",
    "ConditionalRun",
    "ConditionalSettings",
    "DemoSettings",
    "Demonstration",
    "Direction",
    "EditRun",
    "EditSettings",
    "Judge",
    "LensSafetyError",
    "ModelEvaluation",
    "PromptSet",
    "PromptSource",
    "RankerTraining",
    "RefusalEvaluation",
    "ResidualWriter",
    "SafetyRanker",
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
    "demonstrate",
    "evaluate_model",
    "evaluate_refusal",
    "evaluate_utility",
    "export_edit",
    "extract_directions",
    "find_direction",
    "get_judge",
    "kl_divergence",
    "load_direction",
    "load_model",
    "load_ranker",
    "orthogonalize",
    "probe_layers",
    "refusal_rate",
    "rosi",
    "run_conditional",
    "run_edit",
    "srr",
    "sum_activations",
    "train_ranker_directory",
]
