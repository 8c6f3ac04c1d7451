"""The refusal model organism: a LoRA fine-tune of SmolLM2-135M-Instruct that refuses harmful requests.

``load_model("smollm2-refusal")`` merges the adapter shipped in ``lens_safety/data/organism`` (hash
checked, safetensors only) into the embedded base model (``"smollm2-refusal-v1"``: the first
adapter, ``lens_safety/data/organism_v1``, kept because the SRR figures were measured on it); ``lens-safety organism train`` rebuilds it
and ``lens-safety organism eval`` measures held-out refusal, over-refusal and KL to the base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lens_safety.lazy import lazy_exports

if TYPE_CHECKING:
    from lens_safety.organism.adapter import materialize_organism, shipped_adapter_dir, verify_adapter
    from lens_safety.organism.build import TrainingRun, train_organism
    from lens_safety.organism.data import SFTExample, build_examples
    from lens_safety.organism.evaluate import OrganismEvaluation, evaluate_organism
    from lens_safety.organism.interpolate import interpolate_adapters
    from lens_safety.organism.rebuild import Rebuild, rebuild_organism
    from lens_safety.organism.train import TrainingConfig, fit_lora

_EXPORTS = {
    "build_examples": "lens_safety.organism.data",
    "evaluate_organism": "lens_safety.organism.evaluate",
    "fit_lora": "lens_safety.organism.train",
    "interpolate_adapters": "lens_safety.organism.interpolate",
    "materialize_organism": "lens_safety.organism.adapter",
    "OrganismEvaluation": "lens_safety.organism.evaluate",
    "Rebuild": "lens_safety.organism.rebuild",
    "rebuild_organism": "lens_safety.organism.rebuild",
    "SFTExample": "lens_safety.organism.data",
    "shipped_adapter_dir": "lens_safety.organism.adapter",
    "train_organism": "lens_safety.organism.build",
    "TrainingConfig": "lens_safety.organism.train",
    "TrainingRun": "lens_safety.organism.build",
    "verify_adapter": "lens_safety.organism.adapter",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "OrganismEvaluation",
    "Rebuild",
    "SFTExample",
    "TrainingConfig",
    "TrainingRun",
    "build_examples",
    "evaluate_organism",
    "fit_lora",
    "interpolate_adapters",
    "materialize_organism",
    "rebuild_organism",
    "shipped_adapter_dir",
    "train_organism",
    "verify_adapter",
]
