"""Train an SRR ranker on mixed candidate lists, seeded, with early stopping on a validation split.

The validation split is taken by SOURCE instruction (a deterministic, seeded hash), so a list and
its jailbreak-wrapped sibling never straddle train and validation. Optimiser: AdamW with the
paper's lr 1e-3 and weight decay 1e-4; dropout 0.1 lives in the ranker. Each epoch visits the
training lists in a seeded random order in mini-batches; after each epoch the validation loss
(:func:`~lens_safety.srr.ranker.listwise_loss`) is computed in eval mode, the best state is kept,
and training stops after ``patience`` epochs without improvement. The global torch RNG is left
untouched (``torch.random.fork_rng``), so two runs with one seed give identical weights.

An ensemble (``RankerConfig.members = K``) is K such runs, member ``k`` with seed ``seed + k``
(its own split, initialisation and order), joined by :meth:`SafetyRanker.from_members`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lens_safety.errors import LensSafetyError
from lens_safety.progress import track
from lens_safety.records import Record
from lens_safety.splits import source_val_split
from lens_safety.srr.data import SRRDataset
from lens_safety.srr.inputs import ListInput, list_inputs, pad_lists
from lens_safety.srr.ranker import RankerConfig, SafetyRanker, listwise_loss


@dataclass
class TrainConfig(Record):
    """Optimisation settings (paper defaults for lr, weight decay)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    max_epochs: int = 200
    patience: int = 15
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class TrainingReport(Record):
    """What training did: sizes, epochs, losses, time."""

    n_train_lists: int
    n_val_lists: int
    best_epoch: int
    epochs_run: int
    best_val_loss: float
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    n_parameters: int = 0
    #: one report per member of an ensemble (seeds ``seed .. seed + K - 1``); empty for one member
    members: list[dict[str, Any]] = field(default_factory=list)


def split_by_source(dataset: SRRDataset, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` by source instruction (:func:`~lens_safety.splits.source_val_split`)."""
    return source_val_split([item.source_instruction for item in dataset.lists], val_fraction, seed)


def _mean_loss(ranker: SafetyRanker, items: Sequence[ListInput], batch_size: int) -> float:
    ranker.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            inst, resp, pos, valid = pad_lists(chunk)
            total += float(listwise_loss(ranker(inst, resp, valid), pos, valid)) * len(chunk)
    return total / max(len(items), 1)


def fit(
    ranker: SafetyRanker,
    train_items: Sequence[ListInput],
    val_items: Sequence[ListInput],
    config: TrainConfig,
    progress: bool = False,
) -> TrainingReport:
    """Optimise ``ranker`` in place (best validation state restored at the end)."""
    if not train_items:
        raise LensSafetyError(
            "no mixed training lists (each needs a positive and a negative)",
            "build more data: more prompts, larger --n, or a higher --jailbreak-fraction",
        )
    started = time.perf_counter()
    ranker.set_standardization(
        torch.cat([torch.stack([x.instruction for x in train_items]), *[x.responses for x in train_items]])
    )
    optimiser = torch.optim.AdamW(ranker.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    monitor = val_items if val_items else train_items
    best = (float("inf"), 0, copy.deepcopy(ranker.state_dict()))
    train_losses: list[float] = []
    val_losses: list[float] = []
    epoch = 0
    for epoch in track(range(1, config.max_epochs + 1), "training ranker", config.max_epochs, progress):
        ranker.train()
        order = torch.randperm(len(train_items), generator=generator).tolist()
        running = 0.0
        for start in range(0, len(order), config.batch_size):
            chunk = [train_items[i] for i in order[start : start + config.batch_size]]
            inst, resp, pos, valid = pad_lists(chunk)
            loss = listwise_loss(ranker(inst, resp, valid), pos, valid)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            running += float(loss.detach()) * len(chunk)
        train_losses.append(running / len(order))
        val_losses.append(_mean_loss(ranker, monitor, config.batch_size))
        if val_losses[-1] < best[0] - 1e-6:
            best = (val_losses[-1], epoch, copy.deepcopy(ranker.state_dict()))
        elif epoch - best[1] >= config.patience:
            break
    ranker.load_state_dict(best[2])
    ranker.eval()
    return TrainingReport(
        len(train_items),
        len(val_items),
        best[1],
        epoch,
        best[0],
        train_losses,
        val_losses,
        time.perf_counter() - started,
        ranker.n_parameters(),
    )


def train_ranker(
    dataset: SRRDataset,
    *,
    features: str = "hidden",
    layer: int | None = None,
    context: str = "with_instruction",
    ranker_config: RankerConfig | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = False,
) -> tuple[SafetyRanker, TrainingReport]:
    """Train a ranker on the mixed lists of ``dataset`` (seeded; see the module docstring).

    Args:
        dataset: candidate lists with features (unmixed lists are dropped here).
        features: ``hidden`` (residual states) or ``text`` (hashed n-grams, the text-only baseline).
        layer: feature layer for ``hidden`` (must be stored in the dataset).
        context: response encoding for ``hidden``.
        ranker_config: shape overrides (``d_input``, ``layer``, ``context``, ``features`` are set here).
        train_config: optimisation settings (paper defaults).
    """
    train_config = train_config or TrainConfig()
    mixed = dataset.mixed()
    items = list_inputs(mixed, features, layer, context)
    width = int(dataset.instruction.shape[-1])  # the model's d_model, also the hashed text width
    config = replace(
        ranker_config or RankerConfig(d_input=width),
        d_input=width,
        features=features,
        layer=layer if features == "hidden" else None,
        context=context,
    )
    trained = [
        _train_member(
            mixed,
            items,
            replace(config, members=1),
            replace(train_config, seed=train_config.seed + k),
            progress,
        )
        for k in range(config.members)
    ]
    if len(trained) == 1:
        return trained[0]
    ensemble = SafetyRanker.from_members([r for r, _ in trained])
    report = replace(
        trained[0][1],
        seconds=sum(r.seconds for _, r in trained),
        n_parameters=ensemble.n_parameters(),
        members=[r.to_dict() for _, r in trained],
    )
    return ensemble, report


def _train_member(
    mixed: SRRDataset,
    items: Sequence[ListInput],
    config: RankerConfig,
    train_config: TrainConfig,
    progress: bool,
) -> tuple[SafetyRanker, TrainingReport]:
    """One ranker: its own seeded early-stopping split, initialisation and visiting order."""
    train_idx, val_idx = split_by_source(mixed, train_config.val_fraction, train_config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_config.seed)
        ranker = SafetyRanker(config)
        ranker.base_model = mixed.meta.get("model")
        report = fit(
            ranker, [items[i] for i in train_idx], [items[i] for i in val_idx], train_config, progress
        )
    return ranker, report
