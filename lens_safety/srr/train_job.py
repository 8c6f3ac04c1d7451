"""The ``srr train`` job: train a ranker on built candidate lists, fit its baselines, and write the
ranker directory in one staged step (:func:`~lens_safety.fsutil.staged_directory`), so that a
failed or killed run leaves nothing at its final name.

It lives apart from :mod:`lens_safety.srr.train` because the baselines
(:mod:`lens_safety.srr.baselines`) are themselves trained by :func:`~lens_safety.srr.train.train_ranker`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict, Unpack

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


class RankerOptions(TypedDict, total=False):
    """What :func:`train_ranker_directory` lets a caller choose. An option left out takes its
    default from one place: :class:`~lens_safety.srr.ranker.RankerConfig` (``width``, ``tau``,
    ``dropout``, ``members``) or :class:`~lens_safety.srr.train.TrainConfig` (``weight_decay``,
    ``seed``, ``max_epochs``, ``patience``)."""

    width: int
    tau: float
    dropout: float
    members: int
    weight_decay: float
    seed: int
    max_epochs: int
    patience: int


def ranker_configs(d_input: int, options: RankerOptions) -> tuple[RankerConfig, TrainConfig]:
    """The ranker's shape (feed-forward width ``2 * width``) and its optimisation settings, checked
    before any training: ``options`` over the dataclasses' defaults."""
    unknown = sorted(set(options) - set(RankerOptions.__annotations__))
    if unknown:
        raise LensSafetyError(
            f"unknown ranker option(s) {', '.join(unknown)}",
            f"use {', '.join(RankerOptions.__annotations__)}",
        )
    shape, fit = RankerConfig(d_input=d_input), TrainConfig()
    width = options.get("width", shape.width)
    shape = replace(
        shape,
        width=width,
        ff_width=2 * width,
        tau=options.get("tau", shape.tau),
        dropout=options.get("dropout", shape.dropout),
        members=options.get("members", shape.members),
    )
    fit = replace(
        fit,
        seed=options.get("seed", fit.seed),
        max_epochs=options.get("max_epochs", fit.max_epochs),
        patience=options.get("patience", fit.patience),
        weight_decay=options.get("weight_decay", fit.weight_decay),
    )
    if not 0 <= shape.dropout < 1 or fit.weight_decay < 0 or width < 1 or shape.members < 1:
        raise LensSafetyError(
            f"invalid ranker settings (width {width}, dropout {shape.dropout}, weight decay "
            f"{fit.weight_decay}, members {shape.members})",
            "use width >= 1, 0 <= dropout < 1, weight decay >= 0 and members >= 1",
        )
    return shape, fit


def train_ranker_directory(
    data_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    layer: int | None = None,
    context: str = "with_instruction",
    baselines: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    **options: Unpack[RankerOptions],
) -> RankerTraining:
    """Train a ranker on the lists of ``data_dirs`` (combined by
    :func:`~lens_safety.srr.combine.load_datasets`) reading feature ``layer`` (default
    :func:`~lens_safety.srr.features.default_ranker_layer` of the lists' model) with ``context``,
    shaped and fitted as ``options`` say (:class:`RankerOptions`); with ``baselines`` also train the
    text-only and final-layer rankers and fit the direction
    (:func:`~lens_safety.srr.baselines.train_baselines`, same settings). Everything is written to
    ``out`` through one staged directory.

    Raises a :class:`~lens_safety.errors.LensSafetyError` before any training when ``out`` exists
    without ``overwrite`` or the ranker settings are invalid (:func:`ranker_configs`).
    """
    out = Path(out)
    require_free(out, overwrite)
    ranker_configs(1, options)  # invalid settings fail before the lists load (d_input is theirs)
    dataset = load_datasets(data_dirs)
    chosen = layer if layer is not None else default_ranker_layer(int(dataset.meta["model"]["n_layers"]))
    rconf, tconf = ranker_configs(int(dataset.instruction.shape[-1]), options)
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
    return RankerTraining(out, ranker, report, chosen, context, rconf.members, baseline_reports)
