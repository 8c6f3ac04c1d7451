"""SRR — Safety Representation Ranking (arXiv 2505.15710): best-of-N with a hidden-state ranker.

Pipeline: :func:`build_dataset` (sample, deduplicate, label, featurise candidate lists; several builds
combine with :func:`load_datasets`) ->
:func:`train_ranker` (listwise KL, early stopping; settings chosen by :func:`cross_validate`
on training lists only) -> :func:`evaluate` (ranker and baselines) ->
:func:`select` (best-of-N at inference). All features are raw-HF-basis residual states of the
frozen model (see :mod:`lens_safety.srr.features`).
"""

from lens_safety.srr.baselines import Baselines, DirectionScorer, load_baselines, train_baselines
from lens_safety.srr.build import build_dataset
from lens_safety.srr.combine import concat_datasets, load_datasets
from lens_safety.srr.crossval import CVCell, CVResult, cross_validate
from lens_safety.srr.data import CandidateList, SRRDataset
from lens_safety.srr.evaluate import SRREvaluation, evaluate
from lens_safety.srr.experiments import category_transfer, comparison_figure, layer_sweep, sweep_figure
from lens_safety.srr.features import default_ranker_layer, list_features, read_token_states
from lens_safety.srr.labels import is_degenerate, label_candidates, relabel_dataset
from lens_safety.srr.metrics import RankingMetrics, ranking_metrics
from lens_safety.srr.ranker import RankerConfig, SafetyRanker, listwise_loss, load_ranker, save_ranker
from lens_safety.srr.select import BestOfN, select
from lens_safety.srr.train import TrainConfig, TrainingReport, train_ranker
from lens_safety.srr.train_job import RankerTraining, train_ranker_directory

__all__ = [
    "Baselines",
    "BestOfN",
    "CVCell",
    "CVResult",
    "CandidateList",
    "DirectionScorer",
    "RankerConfig",
    "RankerTraining",
    "RankingMetrics",
    "SRRDataset",
    "SRREvaluation",
    "SafetyRanker",
    "TrainConfig",
    "TrainingReport",
    "build_dataset",
    "category_transfer",
    "comparison_figure",
    "concat_datasets",
    "cross_validate",
    "default_ranker_layer",
    "evaluate",
    "is_degenerate",
    "label_candidates",
    "layer_sweep",
    "list_features",
    "listwise_loss",
    "load_baselines",
    "load_datasets",
    "load_ranker",
    "ranking_metrics",
    "read_token_states",
    "relabel_dataset",
    "save_ranker",
    "select",
    "sweep_figure",
    "train_baselines",
    "train_ranker",
    "train_ranker_directory",
]
