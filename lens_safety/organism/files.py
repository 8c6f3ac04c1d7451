"""Names of the files of an organism adapter directory and the base model it is trained on."""

from __future__ import annotations

BASE_SPEC = "smollm2"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
TRAINING_FILE = "training.json"
