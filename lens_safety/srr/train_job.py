"""The ``srr train`` job: train a ranker on built candidate lists, fit its baselines, and write the
ranker directory in one staged step (:func:`~lens_safety.fsutil.staged_directory`), so that a
failed or killed run leaves nothing at its final name.

It lives apart from :mod:`lens_safety.srr.train` because the baselines
(:mod:`lens_safety.srr.baselines`) are themselves trained by :func:`~lens_safety.srr.train.train_ranker`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import require_free, staged_directory
from lens_safety.srr.baselines import train_baselines
from lens_safety.srr.combine import load_datasets
from lens_safety.srr.features import default_ranker_layer
from lens_safety.srr.ranker import RankerConfig, SafetyRanker, save_ranker
from lens_safety.srr.train import TrainConfig, TrainingReport, train_ranker


@dataclass
class RankerTraining:
    """A ranker directory written by :func:`train_ranker_directory`: the trained ranker, its
    training report, the feature layer and response encoding it reads, and the baselines'
    training reports (``None`` when baselines were not trained)."""

    out: Path
    ranker: SafetyRanker
    report: TrainingReport
    layer: int
    context: str
    members: int
    baselines: dict[str, TrainingReport] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "layer": self.layer,
            "context": self.context,
            "members": self.members,
            "n_parameters": self.ranker.n_parameters(),
            "best_epoch": self.report.best_epoch,
            "best_val_loss": self.report.best_val_loss,
            "n_train_lists": self.report.n_train_lists,
            "n_val_lists": self.report.n_val_lists,
            "seconds": self.report.seconds,
        }


def ranker_config(
    d_input: int, width: int, tau: float, dropout: float, members: int, weight_decay: float
) -> RankerConfig:
    """The ranker's shape (feed-forward width ``2 * width``), checked before any training."""
    if not 0 <= dropout < 1 or weight_decay < 0 or width < 1 or members < 1:
        raise LensSafetyError(
            f"invalid ranker settings (width {width}, dropout {dropout}, weight decay {weight_decay}, "
            f"members {members})",
            "use width >= 1, 0 <= dropout < 1, weight decay >= 0 and members >= 1",
        )
    return RankerConfig(
        d_input=d_input, width=width, ff_width=2 * width, tau=tau, dropout=dropout, members=members
    )


def train_ranker_directory(
    data_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    layer: int | None = None,
    context: str = "with_instruction",
    width: int = 256,
    tau: float = 0.1,
    dropout: float = 0.1,
    weight_decay: float = 1e-4,
    members: int = 1,
    seed: int = 0,
    max_epochs: int = 200,
    patience: int = 15,
    baselines: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> RankerTraining:
    """Train a ranker on the lists of ``data_dirs`` (combined by
    :func:`~lens_safety.srr.combine.load_datasets`) reading feature ``layer`` (default
    :func:`~lens_safety.srr.features.default_ranker_layer` of the lists' model) with ``context``;
    with ``baselines`` also train the text-only and final-layer rankers and fit the direction
    (:func:`~lens_safety.srr.baselines.train_baselines`, same settings). Everything is written to
    ``out`` through one staged directory.

    Raises a :class:`~lens_safety.errors.LensSafetyError` before any training when ``out`` exists
    without ``overwrite`` or the ranker settings are invalid (:func:`ranker_config`).
    """
    out = Path(out)
    require_free(out, overwrite)
    dataset = load_datasets(data_dirs)
    chosen = layer if layer is not None else default_ranker_layer(int(dataset.meta["model"]["n_layers"]))
    rconf = ranker_config(int(dataset.instruction.shape[-1]), width, tau, dropout, members, weight_decay)
    tconf = TrainConfig(seed=seed, max_epochs=max_epochs, patience=patience, weight_decay=weight_decay)
    ranker, report = train_ranker(
        dataset, layer=chosen, context=context, ranker_config=rconf, train_config=tconf, progress=progress
    )
    baseline_reports = None
    with staged_directory(out, overwrite=overwrite) as tmp:
        info = {
            "training": report.to_dict(),
            "train_config": tconf.to_dict(),
            "data": {"dirs": [str(d) for d in data_dirs], "counts": dataset.counts()},
        }
        save_ranker(ranker, tmp, dataset.meta.get("model"), info)
        if baselines:
            baseline_reports = train_baselines(
                dataset,
                tmp,
                layer=chosen,
                context=context,
                ranker_config=rconf,
                train_config=tconf,
                base_model=dataset.meta.get("model"),
            )
    return RankerTraining(out, ranker, report, chosen, context, members, baseline_reports)
