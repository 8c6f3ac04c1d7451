"""Baseline scorers for SRR, each mapping a dataset to one score tensor per list.

* ``first_sample``: the first sampled candidate wins (score ``-index``): what plain sampling returns;
* ``random``: seeded uniform scores;
* ``text_only``: a ranker of the SAME architecture and width trained on hashed n-gram text features
  (no hidden states) — shows whether hidden states matter;
* ``final_layer``: the same ranker trained on the final (pre-norm) residual stream;
* ``direction``: one direction, no training beyond three statistics. ``r`` is the difference in
  means of the INSTRUCTION features (last prompt token, ``resid_pre`` at the ranker's layer, raw HF
  basis) of harmful minus harmless training lists, ``r_hat = r / |r|``. For a list, the instruction
  is predicted harmful when ``<h_inst, r_hat>`` exceeds the midpoint of the two class means; a
  candidate's score is ``g * c * <h_resp_i, r_hat>`` where ``g = +1`` (harmful: prefer refusal-like
  answers) or ``-1`` (harmless: prefer the opposite), and ``c = sign(mean projection of refusing
  minus non-refusing training responses)`` orients response projections. Computed here from the
  stored features rather than :mod:`lens_safety.directions` so that it sits at the ranker's exact
  layer and context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file

from lens_safety.errors import LensSafetyError
from lens_safety.srr.data import SRRDataset
from lens_safety.srr.inputs import list_inputs, pad_lists
from lens_safety.srr.ranker import RankerConfig, SafetyRanker, load_ranker, save_ranker
from lens_safety.srr.train import TrainConfig, TrainingReport, train_ranker

BASELINES_DIR = "baselines"
DIRECTION_FILE = "direction.safetensors"


def first_sample_scores(dataset: SRRDataset) -> list[torch.Tensor]:
    return [-torch.arange(len(x.candidates), dtype=torch.float32) for x in dataset.lists]


def random_scores(dataset: SRRDataset, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(len(x.candidates), generator=generator) for x in dataset.lists]


def ranker_scores(ranker: SafetyRanker, dataset: SRRDataset, batch_size: int = 64) -> list[torch.Tensor]:
    """Scores of every list (all lists, mixed or not) with the ranker's own features."""
    cfg = ranker.config
    items = list_inputs(dataset, cfg.features, cfg.layer, cfg.context, text_width=cfg.d_input)
    out: list[torch.Tensor] = []
    ranker.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            inst, resp, _, valid = pad_lists(chunk)
            scores = ranker(inst, resp, valid)
            out.extend(scores[row, : len(item.positive)].clone() for row, item in enumerate(chunk))
    return out


@dataclass
class DirectionScorer:
    """The one-direction baseline (see the module docstring); vectors in the raw HF basis."""

    direction: Float[torch.Tensor, " d_model"]
    threshold: float
    response_sign: float
    layer: int
    context: str

    @classmethod
    def fit(cls, dataset: SRRDataset, layer: int, context: str) -> DirectionScorer:
        inst = dataset.instruction_features(layer).double()
        kinds = [x.kind for x in dataset.lists]
        harmful = torch.tensor([k == "harmful" for k in kinds])
        if harmful.all() or not harmful.any():
            raise LensSafetyError(
                "the direction baseline needs harmful and harmless lists", "build data with both prompt kinds"
            )
        mu_harmful, mu_harmless = inst[harmful].mean(0), inst[~harmful].mean(0)
        r = mu_harmful - mu_harmless
        r_hat = r / r.norm()
        threshold = float(((mu_harmful + mu_harmless) / 2) @ r_hat)
        refusing: list[torch.Tensor] = []
        other: list[torch.Tensor] = []
        for i, item in enumerate(dataset.lists):
            proj = dataset.response_features(i, layer, context).double() @ r_hat
            for value, reason in zip(proj.tolist(), item.reasons, strict=True):
                (refusing if reason == "refusal" else other).append(value)
        gap = (sum(refusing) / max(len(refusing), 1)) - (sum(other) / max(len(other), 1))
        return cls(r_hat.float(), threshold, 1.0 if gap >= 0 else -1.0, layer, context)

    def scores(self, dataset: SRRDataset) -> list[torch.Tensor]:
        inst = dataset.instruction_features(self.layer) @ self.direction
        out = []
        for i in range(len(dataset)):
            g = 1.0 if float(inst[i]) > self.threshold else -1.0
            out.append(
                g
                * self.response_sign
                * (dataset.response_features(i, self.layer, self.context) @ self.direction)
            )
        return out

    def save(self, path: Path) -> None:
        save_file({"direction": self.direction.contiguous()}, str(path))
        path.with_suffix(".json").write_text(
            json.dumps(
                {
                    "threshold": self.threshold,
                    "response_sign": self.response_sign,
                    "layer": self.layer,
                    "context": self.context,
                    "space": "raw_hf",
                    "definition": "mean(h_inst harmful) - mean(h_inst harmless), unit norm",
                },
                indent=2,
            )
        )

    @classmethod
    def load(cls, path: Path) -> DirectionScorer:
        info = json.loads(path.with_suffix(".json").read_text())
        return cls(
            load_file(str(path))["direction"],
            info["threshold"],
            info["response_sign"],
            info["layer"],
            info["context"],
        )


@dataclass
class Baselines:
    """Trained baselines kept next to a ranker (``RANKER_DIR/baselines``)."""

    text_only: SafetyRanker | None
    final_layer: SafetyRanker | None
    direction: DirectionScorer | None

    def scores(self, dataset: SRRDataset, seed: int = 0) -> dict[str, list[torch.Tensor]]:
        """Scores of every baseline on every list of ``dataset``."""
        out = {"first_sample": first_sample_scores(dataset), "random": random_scores(dataset, seed)}
        if self.text_only is not None:
            out["text_only"] = ranker_scores(self.text_only, dataset)
        if self.final_layer is not None and self.final_layer.config.layer in dataset.layers:
            out["final_layer"] = ranker_scores(self.final_layer, dataset)
        if self.direction is not None:
            out["direction"] = self.direction.scores(dataset)
        return out


def train_baselines(
    dataset: SRRDataset,
    out_dir: str | Path,
    *,
    layer: int,
    context: str,
    ranker_config: RankerConfig | None,
    train_config: TrainConfig,
    base_model: dict[str, Any] | None,
    progress: bool = False,
) -> dict[str, TrainingReport]:
    """Train the text-only and final-layer rankers and fit the direction; write them under ``out_dir/baselines``."""
    root = Path(out_dir) / BASELINES_DIR
    root.mkdir(parents=True, exist_ok=True)
    reports: dict[str, TrainingReport] = {}
    text, reports["text_only"] = train_ranker(
        dataset,
        features="text",
        context=context,
        ranker_config=ranker_config,
        train_config=train_config,
        progress=progress,
    )
    save_ranker(text, root / "text_only", base_model, {"training": reports["text_only"].to_dict()})
    final = max(dataset.layers)
    ranker, reports["final_layer"] = train_ranker(
        dataset,
        layer=final,
        context=context,
        ranker_config=ranker_config,
        train_config=train_config,
        progress=progress,
    )
    save_ranker(ranker, root / "final_layer", base_model, {"training": reports["final_layer"].to_dict()})
    DirectionScorer.fit(dataset.mixed(), layer, context).save(root / DIRECTION_FILE)
    return reports


def load_baselines(ranker_dir: str | Path) -> Baselines:
    """Load whatever baselines were trained next to a ranker (missing ones are ``None``)."""
    root = Path(ranker_dir) / BASELINES_DIR
    text = load_ranker(root / "text_only") if (root / "text_only").is_dir() else None
    final = load_ranker(root / "final_layer") if (root / "final_layer").is_dir() else None
    direction = DirectionScorer.load(root / DIRECTION_FILE) if (root / DIRECTION_FILE).is_file() else None
    return Baselines(text, final, direction)
