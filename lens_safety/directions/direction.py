"""The :class:`Direction` result and its on-disk format.

``DIR/direction.safetensors`` holds two float32 tensors in the raw HF residual basis:

* ``directions`` ``[n_layers, d_model]`` — the raw candidates at the chosen position, row ``l`` =
  ``resid_pre`` of block ``l`` (norms kept: activation addition uses them);
* ``direction`` ``[d_model]`` — the selected one, unit norm, harmful-minus-harmless sign (toward refusal).

``DIR/direction.json`` holds the metadata (model spec, architecture and weights hash, hook, layer,
position, method, prompt-set hashes and sizes, system prompt, selection summary). Both files are
deterministic functions of their inputs (no timestamps; sorted JSON keys), so the same inputs
give bitwise-identical files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from lens_safety.errors import LensSafetyError, LensSafetyWarning
from lens_safety.models import ChatModel

TENSORS_FILE = "direction.safetensors"
METADATA_FILE = "direction.json"
FORMAT_VERSION = 1


class DirectionMismatchWarning(LensSafetyWarning):
    """A direction from another checkpoint of the same architecture is being used (the CLI prints
    it as a ``warning:`` line)."""


@dataclass
class Direction:
    """A selected refusal direction plus the per-layer candidates at its position (raw HF basis).

    Attributes:
        directions: ``[n_layers, d_model]`` float32 raw candidates at ``position``; row ``l`` is the
            candidate read at ``resid_pre`` of block ``l``.
        layer: the selected block.
        position: the selected position (negative offset from the end of the prompt).
        method: ``mean-diff``, ``pca`` or ``probe``.
        metadata: provenance (JSON-serialisable; see the module docstring).
    """

    directions: Float[torch.Tensor, "n_layers d_model"]
    layer: int
    position: int
    method: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directions = self.directions.detach().to(torch.float32).cpu().contiguous()
        if self.directions.ndim != 2 or not 0 <= self.layer < self.directions.shape[0]:
            raise LensSafetyError(
                f"layer {self.layer} is not a row of a {tuple(self.directions.shape)} candidate matrix",
                "pick a layer between 0 and n_layers - 1",
            )
        if float(self.raw.norm()) == 0 or not torch.isfinite(self.raw).all():
            raise LensSafetyError(
                f"the candidate at layer {self.layer} is zero or not finite", "choose another layer"
            )

    @property
    def raw(self) -> Float[torch.Tensor, " d_model"]:
        """The selected raw candidate ``directions[layer]`` (keeps its norm), float32."""
        return self.directions[self.layer]

    @property
    def direction(self) -> Float[torch.Tensor, " d_model"]:
        """The selected direction, unit norm, float32 (normalised in float64)."""
        raw = self.raw.double()
        return (raw / raw.norm()).float()

    @property
    def d_model(self) -> int:
        return int(self.directions.shape[1])

    @property
    def n_layers(self) -> int:
        return int(self.directions.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Metadata plus layer, position, method and the per-layer norms (no vectors)."""
        return {
            **self.metadata,
            "format_version": FORMAT_VERSION,
            "layer": self.layer,
            "position": self.position,
            "method": self.method,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "space": self.metadata.get("space", "raw_hf"),
            "raw_norm": float(self.raw.norm()),
            "norms": [float(x) for x in self.directions.norm(dim=-1)],
        }

    # ---------------------------------------------------------------- save / load
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``direction.safetensors`` and ``direction.json`` into ``directory``.

        Refuses existing files unless ``overwrite``; files are written to a temporary name and
        moved into place, so a failure leaves nothing partial.
        """
        from safetensors.torch import save_file

        out = Path(directory)
        targets = [out / TENSORS_FILE, out / METADATA_FILE]
        existing = [t for t in targets if t.exists()]
        if existing and not overwrite:
            raise LensSafetyError(
                f"{existing[0]} already exists",
                "pass overwrite=True (CLI: --overwrite) or choose another directory",
            )
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".direction-", dir=out))
        try:
            save_file(
                {"directions": self.directions, "direction": self.direction.contiguous()},
                str(staging / TENSORS_FILE),
            )
            (staging / METADATA_FILE).write_text(
                json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"
            )
            for target in targets:
                (staging / target.name).replace(target)
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out

    @classmethod
    def load(cls, path: str | Path, model: ChatModel | None = None) -> Direction:
        """Load a saved direction (a directory or its ``direction.safetensors``); check ``model``.

        A width, depth or architecture mismatch is an error. A direction from another checkpoint
        of the same architecture loads with a :class:`DirectionMismatchWarning` naming both,
        unless the model's recorded lineage (``edit.json``) names the direction's weights hash.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        tensors_file, meta_file = directory / TENSORS_FILE, directory / METADATA_FILE
        for file in (tensors_file, meta_file):
            if not file.is_file():
                raise LensSafetyError(
                    f"direction file {file} does not exist",
                    "pass the directory written by `lens-safety directions`",
                )
        try:
            tensors = load_file(str(tensors_file))
            metadata = json.loads(meta_file.read_text())
        except (SafetensorError, json.JSONDecodeError, OSError) as exc:
            raise LensSafetyError(
                f"cannot read the direction in {directory} ({type(exc).__name__})", "re-extract the direction"
            ) from None
        if "directions" not in tensors or "layer" not in metadata or "position" not in metadata:
            raise LensSafetyError(
                f"{directory} is not a lens-safety direction (missing tensors or metadata)",
                "re-extract the direction",
            )
        fields = {k: v for k, v in metadata.items() if k not in {"layer", "position", "method"}}
        row = tensors["directions"][int(metadata["layer"])] if tensors["directions"].ndim == 2 else None
        if row is not None and (float(row.norm()) == 0 or not torch.isfinite(row).all()):
            raise LensSafetyError(
                f"the direction in {directory} is zero or not finite (a damaged or hand-edited file)",
                "re-extract it with `lens-safety directions`",
            )
        direction = cls(
            tensors["directions"],
            int(metadata["layer"]),
            int(metadata["position"]),
            str(metadata.get("method", "mean-diff")),
            fields,
        )
        if model is not None:
            direction.check_model(model)
        return direction

    def check_model(self, model: ChatModel) -> None:
        """Raise on a width / depth / architecture mismatch; warn on another checkpoint."""
        source = self.metadata.get("model", {})
        if self.d_model != model.d_model:
            raise LensSafetyError(
                f"direction has width {self.d_model} (from {source.get('spec', '?')}) but {model.spec} has d_model {model.d_model}",
                "extract a direction from this architecture",
            )
        arch = source.get("architecture")
        if (arch and arch != model.arch.architecture) or self.n_layers != model.n_layers:
            raise LensSafetyError(
                f"direction was extracted from a {arch} with {self.n_layers} layers but {model.spec} is a "
                f"{model.arch.architecture} with {model.n_layers} layers",
                "extract a direction from this architecture",
            )
        source_hash = source.get("weights_sha256")
        if source_hash and source_hash != model.weights_hash and source_hash not in _ancestors(model.lineage):
            warnings.warn(
                f"direction was extracted from {source.get('spec', '?')} (weights {source_hash[:12]}) and is applied to "
                f"{model.spec} (weights {model.weights_hash[:12]}), another checkpoint of the same architecture",
                DirectionMismatchWarning,
                stacklevel=3,
            )


def _ancestors(lineage: dict[str, Any]) -> set[str]:
    """Weights hashes a model derives from, as recorded in its ``edit.json`` (parent and earlier)."""
    found = {str(lineage["base_weights_sha256"])} if lineage.get("base_weights_sha256") else set()
    return found | {str(h) for h in lineage.get("ancestors_weights_sha256", [])}


def load_direction(path: str | Path, model: ChatModel | None = None) -> Direction:
    """Same as :meth:`Direction.load`."""
    return Direction.load(path, model)
