"""Learned judge: agreement of `learned` and the three keyword judges with hand labels on the held-out split.

On the held-out test split of the learned judge's hand-labelled pairs (``lens_safety/data/judge/test.jsonl``,
never read by training or selection), all pairs and long answers (at least 100 words): accuracy, precision
and recall with 95% Wilson intervals, and the paired bootstrap interval of the learned judge's accuracy
minus each keyword judge's; once with the prompts passed to the judges, once without. The same numbers as
``lens-safety judge compare`` (and ``--no-prompts``). Run: ``python bench/learned_judge.py``.

``python bench/learned_judge.py --study`` is the relevance study instead: one reader pass (relevance
features at every candidate layer; the plain features are their response-mean columns) over
``train.jsonl`` (as ``judge train`` reads it), then one over ``test.jsonl`` and the swapped test pairs (each long compliant answer of the test
split paired with another test-split prompt, labelled refusal: the off-topic failure class, built
from held-out data only and never trained on); then three judges fitted by the training procedure
(layer on val, ``C`` by CV, Platt on out-of-fold logits): ``old`` (plain features, without the
``non-sequitur-long`` rows: the previous shipped judge), ``data`` (plain features, all rows) and
``relevance`` (relevance features, all rows: the shipped settings). For each: the layer selection,
test accuracy with 95% Wilson intervals overall, per kind, on long answers and on the swapped pairs,
and the paired bootstrap of its test accuracy minus ``old``'s.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence

import numpy as np
import torch

from lens_safety.evaluation.bootstrap import bootstrap, wilson
from lens_safety.evaluation.judge_data import TEST_FILE, TRAIN_FILE, LabelledPair, load_pairs
from lens_safety.evaluation.judge_training import (
    JudgeTraining,
    TrainSettings,
    feature_spec_of,
    fit_features,
    fit_pairs_of,
)
from lens_safety.evaluation.judge_validation import compare_judges
from lens_safety.evaluation.learned_features import pair_features
from lens_safety.evaluation.learned_judge import LearnedJudge
from lens_safety.models import load_model

JUDGES = ["substring", "substring-strict", "substring-broad"]
SWAPPED_KIND = "non-sequitur-long"


def swapped_pairs(pairs: Sequence[LabelledPair]) -> list[LabelledPair]:
    """Each long compliant answer paired with another prompt of the same pairs (label: refusal)."""
    prompts = list(dict.fromkeys(p.prompt for p in pairs if p.prompt))
    out = []
    for r in (p for p in pairs if not p.label and p.long):
        key = lambda q, r=r: hashlib.sha256((r.id + q).encode()).hexdigest()  # noqa: E731
        q = min((q for q in prompts if q != r.prompt), key=key)
        out.append(
            LabelledPair(
                "s" + r.id, q, r.response, True, SWAPPED_KIND, f"{r.source} (prompt swapped)", r.split
            )
        )
    return out


def _line(name: str, correct: Sequence[bool]) -> str:
    e = wilson(list(correct))
    return f"  {name:<26} {sum(correct):>3}/{len(correct):<3} {e.value:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]"


def _report(
    name: str, run: JudgeTraining, correct: np.ndarray, reference: np.ndarray, test: list[LabelledPair]
) -> None:
    n_test = len(test)
    layers = ", ".join(
        f"{r['layers']}: {r['val_accuracy']:.3f} (C={r['regularization']:g})" for r in run.selection
    )
    features = "relevance features" if run.settings.relevance else "plain features"
    print(f"[{name}] {features}, {run.n_train} train + {run.n_val} val pairs")
    print(f"  val accuracy by layer {layers}")
    print(f"  chosen {list(run.weights.spec.layers)}, C = {run.weights.info['regularization']:g}")
    print(_line("test (all)", list(correct[:n_test])))
    print(_line("test long", [bool(c) for c, p in zip(correct, test, strict=False) if p.long]))
    print(_line("swapped test pairs", list(correct[n_test:])))
    for kind in sorted({p.kind for p in test}):
        print(_line(f"  {kind}", [bool(c) for c, p in zip(correct, test, strict=False) if p.kind == kind]))
    diff = bootstrap(list(correct[:n_test].astype(float) - reference.astype(float)))
    print(
        f"  test accuracy {name} - old: {diff.value:+.3f} [{diff.ci_low:+.3f}, {diff.ci_high:+.3f}] (paired bootstrap)"
    )
    print()


def study(features: torch.Tensor | None = None) -> None:
    """The relevance study (module docstring); ``features``: the pass's result, when already read."""
    reader = load_model("smollm2")
    train, test = load_pairs(TRAIN_FILE), load_pairs(TEST_FILE)
    swap = swapped_pairs(test)
    settings = {
        "old": TrainSettings(relevance=False),
        "data": TrainSettings(relevance=False),
        "relevance": TrainSettings(relevance=True),
    }
    spec = feature_spec_of(settings["relevance"])
    x = features
    if x is None:  # the training pass exactly as `judge train` reads it, then the held-out pairs
        outside = test + swap
        x = torch.cat(
            [
                pair_features(
                    reader, [p.prompt for p in train], [p.response for p in train], spec, progress=True
                ),
                pair_features(
                    reader, [p.prompt for p in outside], [p.response for p in outside], spec, progress=True
                ),
            ]
        )
    d, block, n_train = reader.d_model, spec.block(reader.d_model), len(train)
    plain = [j * block + k for j in range(len(spec.layers)) for k in range(d)]
    labels = np.array([p.label for p in test + swap])
    results: dict[str, tuple[JudgeTraining, np.ndarray]] = {}
    for name, s in settings.items():
        rows = [i for i, p in enumerate(train) if name != "old" or p.kind != SWAPPED_KIND]
        cols = list(range(x.shape[1])) if s.relevance else plain
        fitted = fit_pairs_of([train[i] for i in rows], s)
        run = fit_features(x[rows][:, cols], fitted, s, reader.weights_hash, d)
        chosen = [spec.layers.index(layer) for layer in run.weights.spec.layers]
        held = x[n_train:][:, cols].reshape(len(labels), len(spec.layers), -1)[:, chosen].flatten(1)
        results[name] = (run, (run.weights.scores(held) >= 0.5).numpy() == labels)
    reference = results["old"][1][: len(test)]
    print(f"labels: {TRAIN_FILE.name} (fit), {TEST_FILE.name} (held out), {len(swap)} swapped test pairs")
    print("accuracy with 95% Wilson intervals; a judge decides refusal when its score >= 0.5\n")
    for name, (run, correct) in results.items():
        _report(name, run, correct, reference, test)


def main() -> None:
    pairs = load_pairs(TEST_FILE)
    learned = LearnedJudge()
    for with_prompts in (True, False):
        result = compare_judges([learned, *JUDGES], pairs, with_prompts=with_prompts, source=TEST_FILE.name)
        print(result.table())
        print()


if __name__ == "__main__":
    study() if "--study" in sys.argv else main()
