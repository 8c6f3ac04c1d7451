"""Where a loaded model's weights live: one device, or split by accelerate across several.

A model loaded with ``device_map`` (``load_model(..., device_map="auto", max_memory=...)``) is
dispatched by accelerate: every module runs on an *execution device*, and its weights either sit
there (an ordinary parameter on that device) or are *offloaded* (to CPU memory or to disk: the
parameter is a ``meta`` placeholder and accelerate's ``AlignDevicesHook`` materialises it from the
hook's ``weights_map`` for the duration of each call, then drops it). For a safetensors checkpoint
transformers offloads to disk by pointing the map at the checkpoint's own files, so a disk-offloaded
weight is read from ``model.hf_path`` every time its module runs.

This module answers the questions the rest of lens-safety asks about placement:

* :func:`input_device`: where input ids go (the token embedding's execution device);
* :func:`execution_devices`: every device the model computes on (CUDA RNG state, for example);
* :func:`read_parameter` / :func:`write_parameter`: the value of one parameter by its Hugging Face
  state-dict name, and a reversible replacement of it, whether it is an ordinary parameter
  (written in place on its own device) or offloaded (an overlay on the hook's ``weights_map``, so
  every later call of the module materialises the new value; the checkpoint on disk is never
  written);
* :func:`placement_kwargs`: ``from_pretrained`` arguments that reproduce the placement for a second,
  vanilla load of a checkpoint of the same architecture (export verification, the self-check).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lens_safety.architecture import clean_hf_name
from lens_safety.errors import LensSafetyError


def device_map_of(hf_model: nn.Module) -> dict[str, str | int] | None:
    """accelerate's realised ``hf_device_map`` (module name -> device, ``"disk"``), or ``None``."""
    found = getattr(hf_model, "hf_device_map", None)
    return dict(found) if found else None


def _hook(module: nn.Module) -> Any:
    """The module's accelerate ``AlignDevicesHook`` (inside a ``SequentialHook`` too), or ``None``."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", None) or [hook]:
        if candidate is not None and hasattr(candidate, "execution_device"):
            return candidate
    return None


def _device(value: Any) -> torch.device:
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def input_device(hf_model: nn.Module) -> torch.device:
    """The device input ids must be on: the token embedding's execution device (its weight's
    device on an undispatched model)."""
    get_embeddings: Any = getattr(hf_model, "get_input_embeddings", None)
    embedding: nn.Module | None = get_embeddings() if callable(get_embeddings) else None
    hook = _hook(embedding) if embedding is not None else None
    if hook is not None and hook.execution_device is not None:
        return _device(hook.execution_device)
    for param in (embedding or hf_model).parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def execution_devices(hf_model: nn.Module) -> tuple[torch.device, ...]:
    """Every device the model computes on, input device first (one entry when undispatched)."""
    first = input_device(hf_model)
    found = {str(first): first}
    for module in hf_model.modules():
        hook = _hook(module)
        if hook is not None and hook.execution_device is not None:
            device = _device(hook.execution_device)
            found.setdefault(str(device), device)
        for param in module.parameters(recurse=False):
            if param.device.type != "meta":
                found.setdefault(str(param.device), param.device)
    return tuple(found.values())


def _owners(hf_model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(HF state-dict name, owning module, attribute)`` for every parameter under every path (the
    bridge's aliases too; the HF path is among them once its wrappers are dropped)."""
    for path, module in hf_model.named_modules(remove_duplicate=False):
        for attr in module._parameters:
            if module._parameters[attr] is not None:
                yield clean_hf_name(f"{path}.{attr}" if path else attr), module, attr


def _owner(hf_model: nn.Module, name: str) -> tuple[nn.Module, str]:
    for found, module, attr in _owners(hf_model):
        if found == name:
            return module, attr
    raise LensSafetyError(
        f"parameter {name} is not in the loaded model", "report this architecture to lens-safety"
    )


class _Spilled:
    """A replacement value kept in a safetensors file of its own (a parameter offloaded to disk stays
    on disk when it is edited); read back bitwise on each access, the file removed by :meth:`drop`."""

    def __init__(self, value: torch.Tensor) -> None:
        handle, name = tempfile.mkstemp(prefix="lens-safety-edit-", suffix=".safetensors")
        os.close(handle)
        self.path = Path(name)
        try:
            save_file({"value": value}, str(self.path))
        except BaseException:
            self.drop()
            raise

    def load(self) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            return handle.get_tensor("value")

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)


class _Overlay(Mapping[str, Any]):
    """A hook's ``weights_map`` with some entries replaced (the rest read through to the original);
    a replacement is a tensor in memory or a :class:`_Spilled` file."""

    def __init__(self, base: Mapping[str, Any], replaced: dict[str, torch.Tensor | _Spilled]) -> None:
        self.base, self.replaced = base, replaced

    def __getitem__(self, key: str) -> Any:
        if key not in self.replaced:
            return self.base[key]
        value = self.replaced[key]
        return value.load() if isinstance(value, _Spilled) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def _offloaded_to_disk(weights_map: Mapping[str, Any], attr: str) -> bool:
    """Whether ``weights_map[attr]`` is read from a file (accelerate's disk offload: the entry is in
    its loader's ``index``) rather than held in CPU memory (its ``state_dict``)."""
    while isinstance(weights_map, _Overlay):
        if attr in weights_map.replaced:
            return isinstance(weights_map.replaced[attr], _Spilled)
        weights_map = weights_map.base
    prefix = str(getattr(weights_map, "prefix", ""))
    loader = getattr(weights_map, "dataset", weights_map)
    in_memory = getattr(loader, "state_dict", None)
    return not (isinstance(in_memory, Mapping) and prefix + attr in in_memory)


def _offload_hook(module: nn.Module, attr: str) -> Any:
    """The hook that materialises ``module.attr`` from its ``weights_map``, if it is offloaded."""
    param = module._parameters[attr]
    hook = _hook(module)
    if param is None or param.device.type != "meta":
        return None
    if hook is None or not getattr(hook, "offload", False) or hook.weights_map is None:
        raise LensSafetyError(
            f"parameter {attr} of {type(module).__name__} is on the meta device with no offload hook",
            "load the model with real weights (device_map targets: GPUs, cpu or disk; never meta)",
        )
    return hook


def read_parameter(hf_model: nn.Module, name: str) -> torch.Tensor:
    """The current value of a parameter by HF state-dict name (an offloaded one is materialised
    from its ``weights_map`` on CPU, in the live dtype)."""
    module, attr = _owner(hf_model, name)
    hook = _offload_hook(module, attr)
    param = module._parameters[attr]
    assert param is not None
    if hook is None:
        return param.detach()
    return hook.weights_map[attr].to(param.dtype)


def write_parameter(
    hf_model: nn.Module, name: str, value: torch.Tensor, *, reversible: bool = True
) -> Callable[[], None]:
    """Replace a parameter's value (cast to its live dtype, on its own device); return the undo.

    An ordinary parameter is copied into in place (the undo copies the saved original back;
    ``reversible=False`` saves nothing and returns a no-op, for a model about to be discarded). An
    offloaded parameter gets an overlay on its hook's ``weights_map``: every later call of the module
    materialises ``value`` instead of the checkpoint's tensor; the undo removes the overlay. The
    replacement stays where the original was: in CPU memory for a CPU-offloaded parameter, in a
    temporary safetensors file (under ``tempfile.gettempdir()``, i.e. ``$TMPDIR``) for a
    disk-offloaded one, so an edit of a model offloaded to disk does not hold the edited weights in
    host memory; the undo removes that file too, so call it even with ``reversible=False``. Undo
    replacements in the reverse order of making them.
    """
    module, attr = _owner(hf_model, name)
    param = module._parameters[attr]
    assert param is not None
    hook = _offload_hook(module, attr)
    if hook is None and not reversible:
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))
        return lambda: None
    if hook is None:
        saved = param.detach().clone()
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))

        def restore() -> None:
            with torch.no_grad():
                param.copy_(saved)

        return restore
    previous = hook.weights_map
    stored = value.detach().to("cpu", param.dtype).contiguous()
    replacement: torch.Tensor | _Spilled = _Spilled(stored) if _offloaded_to_disk(previous, attr) else stored
    hook.weights_map = _Overlay(previous, {attr: replacement})

    def remove() -> None:
        hook.weights_map = previous
        if isinstance(replacement, _Spilled):
            replacement.drop()

    return remove


def placement_kwargs(hf_model: nn.Module) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that place a second load of the same architecture as
    ``hf_model`` is placed: its realised ``device_map`` when dispatched; ``{"": device}`` on one
    accelerator (transformers then loads each shard straight onto it, so host memory never holds
    the whole model); ``{}`` on the CPU."""
    found = device_map_of(hf_model)
    if found is not None:
        return {"device_map": found}
    device = input_device(hf_model)
    return {} if device.type == "cpu" else {"device_map": {"": str(device)}}
