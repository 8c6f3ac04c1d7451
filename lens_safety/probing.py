"""Layer-wise probing: how linearly separable are harmful and harmless prompts at each layer?

For every layer ``l`` (activations at one position, raw HF basis, ``resid_pre`` by default):

* a logistic probe fitted on the training split, scored on held-out prompts (accuracy, AUROC);
* the difference-in-means projection ``s(x) = r_hat . x`` with ``r = mu_harmful - mu_harmless``
  (training split), thresholded at the midpoint of the two training class means
  ``(r_hat . mu_harmful + r_hat . mu_harmless) / 2``; AUROC uses ``s`` itself;
* 95% bootstrap confidence intervals (percentile, classes resampled separately) of every
  held-out score;
* the cosine similarity of the mean-difference directions of every pair of layers.

Splits: :func:`~lens_safety.splits.split_heldout` (prompt sets with topic-pair ids use the
library's deterministic split, ``train`` vs ``val`` + ``test``, so both prompts of a topic pair
land on the same side; other sets hold out a hashed fraction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float

from lens_safety.activations import collect_activations
from lens_safety.evaluation.bootstrap import bootstrap_interval
from lens_safety.evaluation.logistic import fit_logistic
from lens_safety.evaluation.separation import (
    accuracy,
    auroc,
    effect_size,
    validate_classes,
)
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.prompts import PromptSet, PromptSource
from lens_safety.records import Record
from lens_safety.splits import split_heldout

Interval = tuple[float, float]


# ------------------------------------------------------------------ per-layer probing
@dataclass
class LayerProbe(Record):
    """Held-out scores at one layer (intervals are 95% bootstrap percentiles)."""

    layer: int
    probe_accuracy: float
    probe_accuracy_ci: Interval
    probe_auroc: float
    probe_auroc_ci: Interval
    mean_diff_accuracy: float
    mean_diff_accuracy_ci: Interval
    mean_diff_auroc: float
    mean_diff_auroc_ci: Interval
    direction_norm: float
    effect_size: float
    probe_regularization: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in super().to_dict().items()}


@dataclass
class ProbeReport:
    """Per-layer probing results and the layer x layer cosine matrix of mean-difference directions."""

    layers: list[LayerProbe]
    cosine: Float[torch.Tensor, "n_layers n_layers"]
    position: int
    hook: str
    n_train: tuple[int, int]
    n_test: tuple[int, int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def best_layer(self, score: str = "mean_diff_accuracy") -> int:
        """Layer with the highest value of ``score`` (earliest on ties)."""
        return max(self.layers, key=lambda r: (getattr(r, score), -r.layer)).layer

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "hook": self.hook,
            "n_train": list(self.n_train),
            "n_test": list(self.n_test),
            "layers": [r.to_dict() for r in self.layers],
            "cosine": self.cosine.tolist(),
            "metadata": self.metadata,
        }


def probe_activations(
    train_harmful: Float[torch.Tensor, "n_h n_layers d_model"],
    train_harmless: Float[torch.Tensor, "n_b n_layers d_model"],
    test_harmful: Float[torch.Tensor, "m_h n_layers d_model"],
    test_harmless: Float[torch.Tensor, "m_b n_layers d_model"],
    layers: Sequence[int],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    regularization: float | Literal["cv"] = "cv",
    position: int = -1,
    hook: str = "resid_pre",
    progress: bool = False,
) -> ProbeReport:
    """Probe every layer from activations already read (axis 1 indexes ``layers``).

    ``regularization``: the probe's inverse L2 strength ``C``, or ``"cv"`` (default) to choose it
    per layer by cross-validation on the training split
    (:func:`~lens_safety.evaluation.logistic.fit_logistic`).
    """
    results, units = [], []
    for k in track(range(len(layers)), "probing layers", total=len(layers), enabled=progress):
        th, tb, eh, eb = (
            x[:, k].double() for x in (train_harmful, train_harmless, test_harmful, test_harmless)
        )
        weights, bias, _, chosen_c = fit_logistic(th, tb, regularization=regularization)
        ph, pb = eh.numpy() @ weights + bias, eb.numpy() @ weights + bias
        r = th.mean(0) - tb.mean(0)
        unit = r / r.norm() if r.norm() > 0 else r
        units.append(unit)
        mid = 0.5 * float(th.mean(0) @ unit + tb.mean(0) @ unit)
        sh, sb = (eh @ unit).numpy(), (eb @ unit).numpy()

        def boot(stat: Callable[[np.ndarray, np.ndarray], float], a: np.ndarray, b: np.ndarray) -> Interval:
            return bootstrap_interval(stat, a, b, n_resamples=n_bootstrap, seed=seed)

        def probe_acc(a: np.ndarray, b: np.ndarray) -> float:
            return accuracy(a, b, 0.0)

        def md_acc(a: np.ndarray, b: np.ndarray, mid: float = mid) -> float:
            return accuracy(a, b, mid)

        results.append(
            LayerProbe(
                layer=int(layers[k]),
                probe_accuracy=probe_acc(ph, pb),
                probe_accuracy_ci=boot(probe_acc, ph, pb),
                probe_auroc=auroc(ph, pb),
                probe_auroc_ci=boot(auroc, ph, pb),
                mean_diff_accuracy=md_acc(sh, sb),
                mean_diff_accuracy_ci=boot(md_acc, sh, sb),
                mean_diff_auroc=auroc(sh, sb),
                mean_diff_auroc_ci=boot(auroc, sh, sb),
                direction_norm=float(r.norm()),
                effect_size=effect_size((th @ unit).numpy(), (tb @ unit).numpy()),
                probe_regularization=chosen_c,
            )
        )
    stacked = torch.stack(units)
    cosine = (stacked @ stacked.T).float()
    n_train, n_test = (len(train_harmful), len(train_harmless)), (len(test_harmful), len(test_harmless))
    return ProbeReport(results, cosine, position, hook, n_train, n_test)


def probe_layers(
    model: ChatModel,
    harmful: PromptSource,
    harmless: PromptSource,
    *,
    position: int = -1,
    layers: Sequence[int] | None = None,
    hook: str = "resid_pre",
    heldout_fraction: float = 0.25,
    n_bootstrap: int = 1000,
    seed: int = 0,
    system_prompt: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> ProbeReport:
    """Read activations of both classes, split them (see module docstring) and probe every layer."""
    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    validate_classes(harmful_set, harmless_set)
    (train_h, test_h), (train_b, test_b) = (
        split_heldout(harmful_set, heldout_fraction),
        split_heldout(harmless_set, heldout_fraction),
    )
    reads = [
        collect_activations(
            model,
            p,
            layers=layers,
            positions=(position,),
            hook=hook,  # type: ignore[arg-type]
            batch_size=batch_size,
            system_prompt=system_prompt,
            progress=progress,
        )
        for p in (train_h, train_b, test_h, test_b)
    ]
    train_h_x, train_b_x, test_h_x, test_b_x = (r.tensor[:, :, 0] for r in reads)
    report = probe_activations(
        train_h_x,
        train_b_x,
        test_h_x,
        test_b_x,
        reads[0].layers,
        n_bootstrap=n_bootstrap,
        seed=seed,
        position=position,
        hook=hook,
        progress=progress,
    )
    report.metadata = {
        "model": model.identity(),
        "harmful": harmful_set.metadata(),
        "harmless": harmless_set.metadata(),
        "system_prompt": system_prompt,
        "space": reads[0].space,
    }
    return report
