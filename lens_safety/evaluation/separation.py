"""How well a score separates two classes (harmful = positive, harmless = negative), and the
checks two prompt classes must pass before anything is fitted on them.

Scores are plain floats (projections ``r_hat . x`` in the raw HF residual basis, probe logits, …);
every statistic is computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float

from lens_safety.errors import LensSafetyError
from lens_safety.prompts import PromptSet, check_disjoint


def validate_classes(harmful: PromptSet, harmless: PromptSet) -> None:
    """Each class needs >= 2 prompts and no prompt may be in both (one-line errors)."""
    for prompts, label in ((harmful, "harmful"), (harmless, "harmless")):
        if len(prompts) < 2:
            raise LensSafetyError(
                f"the {label} prompt set '{prompts.name}' has {len(prompts)} prompt(s)",
                "give at least 2 prompts per class",
            )
    check_disjoint(harmful, harmless)


def paired_indices(harmful: PromptSet, harmless: PromptSet) -> list[tuple[int, int]] | None:
    """``(i_harmful, j_harmless)`` of prompts sharing a topic-pair id, or None without pair ids."""
    if not harmful.pairs or not harmless.pairs:
        return None
    where = {pair: j for j, pair in enumerate(harmless.pairs) if pair}
    pairs = [(i, where[p]) for i, p in enumerate(harmful.pairs) if p and p in where]
    return pairs or None


def auroc(scores_positive: np.ndarray, scores_negative: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count 1/2."""
    pos = np.asarray(scores_positive, dtype=np.float64)[:, None]
    neg = np.asarray(scores_negative, dtype=np.float64)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def accuracy(scores_positive: np.ndarray, scores_negative: np.ndarray, threshold: float) -> float:
    """Fraction classified correctly by ``score > threshold`` (positives) / ``<=`` (negatives)."""
    correct = (np.asarray(scores_positive) > threshold).sum() + (
        np.asarray(scores_negative) <= threshold
    ).sum()
    return float(correct / (len(scores_positive) + len(scores_negative)))


def effect_size(scores_positive: np.ndarray, scores_negative: np.ndarray) -> float:
    """Cohen's d: mean difference over the pooled standard deviation."""
    a, b = np.asarray(scores_positive, np.float64), np.asarray(scores_negative, np.float64)
    pooled = np.sqrt(
        ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / max(len(a) + len(b) - 2, 1)
    )
    return (
        float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("inf") * np.sign(a.mean() - b.mean())
    )


def projection_accuracy(
    direction: Float[torch.Tensor, " d_model"],
    train_harmful: Float[torch.Tensor, "n_h d_model"],
    train_harmless: Float[torch.Tensor, "n_b d_model"],
    test_harmful: Float[torch.Tensor, "m_h d_model"],
    test_harmless: Float[torch.Tensor, "m_b d_model"],
) -> float:
    """Held-out accuracy of ``r_hat . x > midpoint of the training class-mean projections``."""
    unit = direction.double() / direction.double().norm()
    threshold = 0.5 * float(train_harmful.double().mean(0) @ unit + train_harmless.double().mean(0) @ unit)
    return accuracy(
        (test_harmful.double() @ unit).numpy(), (test_harmless.double() @ unit).numpy(), threshold
    )
