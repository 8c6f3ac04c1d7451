"""Refusal directions: extraction methods, candidates, the saved :class:`Direction`, and the pipeline.

* :func:`extract_directions` — candidates for every layer and post-instruction position;
* :class:`Direction` / :func:`load_direction` — the selected direction and its files;
* :func:`find_direction` — split, extract, select, check on held-out prompts;
* :func:`find_read_direction` / :class:`ReadDirection` — where a model still reads harmfulness, the
  read direction ``g`` of conditional ROSI (:func:`lens_safety.edits.conditional_rosi`).

All vectors are in the raw HF residual basis (``blocks.{l}.hook_resid_pre`` = HF ``hidden_states[l]``).
"""

from lens_safety.directions.direction import Direction, DirectionMismatchWarning, load_direction
from lens_safety.directions.extraction import Candidates, extract_directions
from lens_safety.directions.methods import (
    METHODS,
    ExtractionMethod,
    logistic_probe,
    mean_difference,
    pca_of_differences,
)
from lens_safety.directions.pipeline import DirectionReport, find_direction
from lens_safety.directions.read import ReadDirection, find_read_direction

__all__ = [
    "METHODS",
    "Candidates",
    "Direction",
    "DirectionMismatchWarning",
    "DirectionReport",
    "ExtractionMethod",
    "ReadDirection",
    "extract_directions",
    "find_direction",
    "find_read_direction",
    "load_direction",
    "logistic_probe",
    "mean_difference",
    "pca_of_differences",
]
