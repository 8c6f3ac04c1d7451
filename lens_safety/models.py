"""Load a chat model once, wrapped in a TransformerBridge, with everything lens-safety needs.

``load_model(spec)`` returns a :class:`ChatModel`: the bridge, its tokenizer and chat formatter,
the architecture facts (layers, width, residual writers) and ``hf_path``, the local Hugging Face
directory the weights came from (exports and ROSI's ``w_bar`` read the original weights there).

Compatibility mode (``compatibility_mode=True``) calls ``bridge.enable_compatibility_mode()``:
classic TransformerLens processing (folded norms, centred writing weights and unembedding). It
rewrites the wrapped Hugging Face weights IN PLACE, cannot be undone, takes seconds and about
six times the memory on SmolLM2 (peak RSS 2.4 GB vs 0.4 GB). Every lens-safety function works
without it and reads activations in the raw Hugging Face residual basis; it is off by default.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lens_safety.architecture import ArchitectureFacts, architecture_facts
from lens_safety.bridge_cache import install_cache_alias
from lens_safety.chat import ChatFormatter
from lens_safety.errors import LensSafetyError
from lens_safety.hashing import weights_fingerprint
from lens_safety.placement import device_map_of, execution_devices, input_device
from lens_safety.residual_check import check_residual_reads
from lens_safety.sources import resolve_spec

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class ChatModel:
    """A chat LLM wrapped for safety interpretability.

    Attributes:
        bridge: the TransformerLens ``TransformerBridge`` (hook points ``blocks.{l}.hook_resid_pre`` …).
        tokenizer: the Hugging Face tokenizer.
        chat: formats instructions with the chat template and tokenises them (left padding, one BOS).
        arch: architecture facts, including the residual-stream writers.
        hf_path: local Hugging Face directory holding the original weights.
        spec: the spec the model was loaded from.
        compatibility_mode: whether TransformerLens weight processing was applied (irreversible).
        lineage: ``edit.json`` of an exported lens-safety model (its parent and edit) or
            ``organism.json`` of the refusal organism (its base and adapter), else ``{}``.
    """

    bridge: Any
    tokenizer: PreTrainedTokenizerBase
    chat: ChatFormatter
    arch: ArchitectureFacts
    hf_path: Path
    spec: str
    compatibility_mode: bool = False
    lineage: dict[str, Any] = field(default_factory=dict)
    _weights_hash: str | None = field(default=None, repr=False)
    #: the passed :func:`lens_safety.selfcheck.require_sound_generation` check of this load, if any
    generation_check: Any = field(default=None, repr=False)

    @property
    def hf_model(self) -> Any:
        """The wrapped Hugging Face ``PreTrainedModel`` (its modules carry the bridge's hooks)."""
        return self.bridge.original_model

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def d_model(self) -> int:
        return self.arch.d_model

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's execution device (see :mod:`lens_safety.placement`)."""
        return input_device(self.hf_model)

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Every device the model computes on (one unless loaded with ``device_map``)."""
        return execution_devices(self.hf_model)

    @property
    def device_map(self) -> dict[str, str | int] | None:
        """accelerate's realised placement (module -> device or ``"disk"``), ``None`` on one device."""
        return device_map_of(self.hf_model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def weights_hash(self) -> str:
        """SHA-256 fingerprint of the safetensors files in :attr:`hf_path` (computed once)."""
        if self._weights_hash is None:
            self._weights_hash = weights_fingerprint(self.hf_path)
        return self._weights_hash

    @property
    def name(self) -> str:
        return self.spec

    def identity(self) -> dict[str, Any]:
        """Provenance record: spec, architecture, width, depth, weights hash."""
        return {
            "spec": self.spec,
            "architecture": self.arch.architecture,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "weights_sha256": self.weights_hash,
        }


def _parse_dtype(dtype: str | torch.dtype | None, config_dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return _DTYPES.get(str(config_dtype).replace("torch.", ""), torch.float32)
    if dtype not in _DTYPES:
        raise LensSafetyError(f"unknown dtype '{dtype}'", f"use one of {', '.join(sorted(_DTYPES))} or auto")
    return _DTYPES[dtype]


#: config keys under which architectures store their context length
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def context_length(config: dict[str, Any]) -> int | None:
    """The model's context in tokens from its ``config.json`` (text config of multimodal models)."""
    for source in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return int(source[key])
    return None


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


#: accelerate placement of a dispatched load: ``device_map``, ``max_memory``, ``offload_folder``
Placement = dict[str, Any]


#: ``device`` values that mean ``device_map=<value>`` (accelerate's strategies; the CLI's ``--device``)
SPLIT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(
    device: str | None,
    device_map: str | dict[str, str | int] | None,
    max_memory: dict[str | int, str | int] | None,
    offload_folder: str | os.PathLike[str] | None,
) -> Placement:
    """``boot_transformers`` placement arguments; one device unless ``device_map`` is given (or
    ``device`` names an accelerate strategy, :data:`SPLIT_STRATEGIES`: shorthand for that map)."""
    if device in SPLIT_STRATEGIES and device_map is None:
        device, device_map = None, device
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise LensSafetyError(
                "max_memory and offload_folder only apply to a split model", 'pass device_map="auto" too'
            )
        return {"device": device or _default_device()}
    if device is not None:
        raise LensSafetyError(f"device={device!r} and device_map are mutually exclusive", "pass one of them")
    placement: Placement = {"device_map": device_map}
    if max_memory is not None:
        placement["max_memory"] = dict(max_memory)
    if offload_folder is not None:
        placement["offload_folder"] = str(offload_folder)
    return placement


def registry_spelling(architecture: str) -> str | None:
    """The bridge registry's key for a transformers class spelt with other capitals, else ``None``.

    TransformerBridge picks its adapter by the class name in ``config.json``; transformers calls
    Phi-MoE's class ``PhimoeForCausalLM`` where the registry has ``PhiMoEForCausalLM``. A name the
    registry lacks that equals exactly one of its keys up to case is that key.
    """
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    if architecture in SUPPORTED_ARCHITECTURES:
        return None
    same = [key for key in SUPPORTED_ARCHITECTURES if key.lower() == architecture.lower()]
    return same[0] if len(same) == 1 else None


def _boot(
    hf_path: Path, placement: Placement, dtype: torch.dtype, trust_remote_code: bool, tokenizer: Any
) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    config = json.loads((hf_path / "config.json").read_text())
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    spelling = registry_spelling(arch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                str(hf_path),
                dtype=dtype,
                tokenizer=tokenizer,
                trust_remote_code=trust_remote_code,
                # the bridge reads ``original_architecture`` before ``architectures``
                hf_config_overrides={"original_architecture": spelling} if spelling else None,
                **placement,
            )
    except (ValueError, KeyError, NotImplementedError) as exc:
        text = str(exc)
        if any(word in text for word in ("device_map", "n_devices", "Multi-device", "offload")):
            raise LensSafetyError(
                f"TransformerBridge cannot place {arch} with device_map={placement.get('device_map')!r}: "
                f"{text.splitlines()[0] if text else type(exc).__name__}",
                "give the GPUs enough max_memory for the whole model (all-GPU map), or split it "
                "between cpu and disk only (max_memory={'cpu': ...}) on a CPU machine",
            ) from None
        if "supported architecture" in text or "not supported" in text.lower() or isinstance(exc, KeyError):
            raise LensSafetyError(
                f"architecture {arch} is not supported by TransformerLens' TransformerBridge",
                "use a model whose architecture TransformerBridge supports "
                "(Llama, Mistral, Qwen2, Gemma 2/3, GPT-2, Phi-3, …: TransformerBridge.list_supported_models())",
            ) from None
        raise
    if spelling:  # keep the Hugging Face config as the checkpoint has it (a save writes it back)
        vars(bridge.original_model.config).pop("original_architecture", None)
    if not hasattr(bridge, "blocks"):
        raise LensSafetyError(
            f"TransformerBridge booted {arch} without transformer blocks (no residual stream to read)",
            "use an architecture TransformerBridge reads correctly (docs: how-to/architectures.md)",
        )
    return bridge


#: files in which lens-safety records where a model comes from (an exported edit, the organism)
LINEAGE_FILES = ("edit.json", "organism.json")


def _read_lineage(hf_path: Path) -> dict[str, Any]:
    for name in LINEAGE_FILES:
        if (hf_path / name).is_file():
            return dict(json.loads((hf_path / name).read_text()))
    return {}


def load_model(
    spec: str | os.PathLike[str] = "smollm2",
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, str | int] | None = None,
    max_memory: dict[str | int, str | int] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    compatibility_mode: bool = False,
    system_prompt: str | None = None,
    chat_template: bool = True,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> ChatModel:
    """Load a model spec into a :class:`ChatModel`.

    Args:
        spec: ``"smollm2"`` (embedded default), ``"smollm2-refusal"`` (the refusal organism), a local
            HF directory, a ``.gguf`` file or a hub id.
        device: ``"cpu"``, ``"cuda"``, … (default: CUDA when available), or one of accelerate's
            strategies ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` as
            shorthand for ``device_map=<strategy>``.
        dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``"auto"`` (the checkpoint's dtype).
        device_map: split the model with accelerate instead of placing it on ``device``:
            ``"auto"``, ``"balanced"``, ``"sequential"`` or an explicit ``{module: device}`` map.
            TransformerBridge accepts all-GPU maps and, on a CPU machine, maps of ``cpu`` and
            ``disk`` (offloaded weights are read from the checkpoint's own safetensors at each
            call); see :mod:`lens_safety.placement`.
        max_memory: per-device budgets for ``device_map``, e.g. ``{0: "70GiB", 1: "70GiB"}`` or
            ``{"cpu": "8GiB"}`` (the rest goes to disk).
        offload_folder: where accelerate writes disk-offloaded weights that are not stored as
            safetensors (default: its own temporary folder).
        compatibility_mode: apply TransformerLens weight processing (irreversible, costs memory;
            see the module docstring). Off by default.
        system_prompt: default system prompt of the chat formatter.
        chat_template: ``False`` formats prompts as plain ``User: … Assistant:`` text (base models).
        trust_remote_code: allow model code from the checkpoint (off unless you ask).
        allow_pickle: let a checkpoint with only pickle weights (``pytorch_model.bin``) through to
            transformers (off: such a directory is refused with a one-line error).

    The loaded bridge's ``resid_pre`` is checked against the model's own Hugging Face hidden states
    on one short sequence (:func:`lens_safety.residual_check.check_residual_reads`): an
    architecture whose hook points read something else, or that the bridge cannot run, is refused
    with one error line.
    """
    hf_path, canonical = resolve_spec(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    config = json.loads((hf_path / "config.json").read_text())
    torch_dtype = _parse_dtype(dtype, config.get("dtype") or config.get("torch_dtype"))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_path), trust_remote_code=trust_remote_code)
    chat = ChatFormatter(
        tokenizer,
        system_prompt=system_prompt,
        use_chat_template=chat_template,
        max_length=context_length(config),
    )
    placement = _placement(device, device_map, max_memory, offload_folder)
    if compatibility_mode and device_map is not None:
        raise LensSafetyError(
            "compatibility mode rewrites every weight in memory and cannot run on a split model",
            "load on one device for compatibility mode, or leave it off (every lens-safety function works without it)",
        )
    bridge = _boot(hf_path, placement, torch_dtype, trust_remote_code, tokenizer)
    bridge.original_model.eval()
    install_cache_alias(bridge)
    facts = architecture_facts(bridge)
    check_residual_reads(bridge, tokenizer, torch_dtype)  # before compatibility mode rewrites weights
    if compatibility_mode:
        bridge.enable_compatibility_mode()
    lineage = _read_lineage(hf_path)
    return ChatModel(bridge, tokenizer, chat, facts, hf_path, canonical, compatibility_mode, lineage)
