"""Refusal of a model on prompt sets, judged by several judges from one greedy generation.

For each set, every prompt gets one greedy completion of ``max_new_tokens`` tokens; each judge
labels every completion, and the rate ``(1/n) sum_i refused_i`` is reported with its 95% Wilson
interval (:func:`lens_safety.evaluation.metrics.rate_of_completions`). On harmful sets the rate is
the refusal rate, on harmless sets the over-refusal rate. Pooled rates concatenate the sets.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lens_safety.evaluation.bootstrap import wilson
from lens_safety.evaluation.generation import generate
from lens_safety.evaluation.metrics import RateResult, rate_of_completions
from lens_safety.fsutil import write_file_atomic
from lens_safety.models import ChatModel, load_model
from lens_safety.organism.adapter import materialize_organism
from lens_safety.organism.sets import (
    BUILTIN_HELDOUT,
    EXTERNAL_HARMFUL_TEST,
    EXTERNAL_HARMFUL_VAL,
    EXTERNAL_HARMLESS_TEST,
    EXTERNAL_HARMLESS_VAL,
)
from lens_safety.prompts import PromptSet
from lens_safety.selfcheck import require_sound_generation

DEFAULT_JUDGES: tuple[str, ...] = ("substring", "substring-broad")


@dataclass
class SetRates:
    """One prompt set's rates, one per judge, and its completions."""

    spec: str
    harmful: bool
    metadata: dict[str, Any]
    rates: dict[str, RateResult]
    completions: list[str] = field(repr=False, default_factory=list)

    def to_dict(self, with_completions: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec,
            "harmful": self.harmful,
            "set": self.metadata,
            "rates": {
                judge: {
                    "rate": r.rate,
                    "refused": sum(r.refused),
                    "n": r.n,
                    "interval": [r.ci_low, r.ci_high],
                    "judge": r.judge,
                }
                for judge, r in self.rates.items()
            },
        }
        if with_completions:
            prompts = next(iter(self.rates.values())).prompts
            out["completions"] = [
                {"prompt": p, "completion": c} for p, c in zip(prompts, self.completions, strict=True)
            ]
        return out


@dataclass
class SetsEvaluation:
    """Rates of one model on several sets, and the pooled harmful / harmless rates per judge."""

    model: str
    max_new_tokens: int
    sets: list[SetRates]
    pooled: dict[str, dict[str, dict[str, Any]]]

    def to_dict(self, with_completions: bool = False) -> dict[str, Any]:
        return {
            "model": self.model,
            "max_new_tokens": self.max_new_tokens,
            "decoding": "greedy",
            "interval": "wilson",
            "sets": [s.to_dict(with_completions) for s in self.sets],
            "pooled": self.pooled,
        }


def judge_sets(
    model: ChatModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    judges: Sequence[str] = DEFAULT_JUDGES,
    max_new_tokens: int = 48,
    progress: bool = False,
    name: str = "model",
) -> SetsEvaluation:
    """Generate once per prompt of every set (specs for :meth:`PromptSet.load`), judge with every
    judge (specs for :func:`~lens_safety.evaluation.judges.get_judge`), pool per class."""
    results: list[SetRates] = []
    for specs, harmful_class in ((harmful, True), (harmless, False)):
        for spec in specs:
            prompts = PromptSet.load(spec)
            gens = generate(model, prompts, max_new_tokens=max_new_tokens, progress=progress)
            rates = {
                j: rate_of_completions(gens.completions, gens.prompt_of_completion, j, interval="wilson")
                for j in judges
            }
            results.append(SetRates(spec, harmful_class, prompts.metadata(), rates, list(gens.completions)))
    pooled: dict[str, dict[str, dict[str, Any]]] = {}
    for label, harmful_class in (("harmful", True), ("harmless", False)):
        chosen = [s for s in results if s.harmful == harmful_class]
        if not chosen:
            continue
        pooled[label] = {}
        for j in judges:
            refused = [x for s in chosen for x in s.rates[j].refused]
            estimate = wilson(refused)
            pooled[label][j] = {
                "rate": estimate.value,
                "refused": sum(refused),
                "n": estimate.n,
                "interval": [estimate.ci_low, estimate.ci_high],
                "sets": [s.spec for s in chosen],
            }
    return SetsEvaluation(name, max_new_tokens, results, pooled)


def rejudge_record(record: dict[str, Any], judges: Sequence[str]) -> dict[str, Any]:
    """Add ``judges`` to a record written by this module's command: every set's rates from its
    recorded completions (no generation), and the pooled rates per class, in place."""
    for group in record.values():
        if not isinstance(group, dict) or "sets" not in group:
            continue
        for one in group["sets"]:
            prompts = [c["prompt"] for c in one["completions"]]
            completions = [c["completion"] for c in one["completions"]]
            for j in judges:
                rate = rate_of_completions(completions, prompts, j, interval="wilson")
                one["rates"][j] = {
                    "rate": rate.rate,
                    "refused": sum(rate.refused),
                    "n": rate.n,
                    "interval": [rate.ci_low, rate.ci_high],
                    "judge": rate.judge,
                }
                one.setdefault("refused_by", {})[j] = rate.refused
        for label, harmful_class in (("harmful", True), ("harmless", False)):
            chosen = [s for s in group["sets"] if s["harmful"] == harmful_class]
            for j in judges if chosen else ():
                estimate = wilson([x for s in chosen for x in s["refused_by"][j]])
                group["pooled"].setdefault(label, {})[j] = {
                    "rate": estimate.value,
                    "refused": sum(x for s in chosen for x in s["refused_by"][j]),
                    "n": estimate.n,
                    "interval": [estimate.ci_low, estimate.ci_high],
                    "sets": [s["spec"] for s in chosen],
                }
    return record


def restrict_record(record: dict[str, Any], spec: str) -> dict[str, Any]:
    """A copy of a record of this module's command holding only the completions of prompts in
    ``spec`` (e.g. ``mtbench:test`` out of a whole-``mtbench`` record), its sets renamed to
    ``spec``, sets left empty dropped and every rate removed (:func:`rejudge_record` refills them)."""
    keep = set(PromptSet.load(spec).prompts)
    out: dict[str, Any] = {k: v for k, v in record.items() if not (isinstance(v, dict) and "sets" in v)}
    for name, group in record.items():
        if not (isinstance(group, dict) and "sets" in group):
            continue
        sets = []
        for one in group["sets"]:
            chosen = [c for c in one["completions"] if c["prompt"] in keep]
            if chosen:
                sets.append({"spec": spec, "harmful": one["harmful"], "rates": {}, "completions": chosen})
        if sets:
            out[name] = {**{k: v for k, v in group.items() if k != "sets"}, "sets": sets, "pooled": {}}
    return out


def _groups(
    split: str, harmless: str | None, builtin: int, harmful: str | None = None
) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The (harmful, harmless) specs per group of the command: external sets, builtin sets.
    ``harmful`` / ``harmless``: comma-separated specs replacing the external defaults of ``split``
    (``none``: no set of that class)."""
    chosen_harmful, chosen_harmless = (_specs(x) for x in (harmful, harmless))
    if split == "val":
        defaults = (EXTERNAL_HARMFUL_VAL, EXTERNAL_HARMLESS_VAL)
        builtin_pairs = [("builtin:harmful:val", "builtin:harmless:val")] if builtin else []
    else:
        defaults = (EXTERNAL_HARMFUL_TEST, EXTERNAL_HARMLESS_TEST)
        builtin_pairs = list(BUILTIN_HELDOUT[:builtin])
    external = (
        defaults[0] if chosen_harmful is None else chosen_harmful,
        defaults[1] if chosen_harmless is None else chosen_harmless,
    )
    groups = {"external": external} if any(external) else {}
    if builtin_pairs:
        groups["builtin"] = (tuple(h for h, _ in builtin_pairs), tuple(b for _, b in builtin_pairs))
    return groups


def _specs(value: str | None) -> tuple[str, ...] | None:
    """``None`` for the default, ``()`` for ``none``, else the comma-separated specs."""
    if value is None:
        return None
    return () if value.strip() == "none" else tuple(s for s in value.split(",") if s)


def _main(argv: Sequence[str] | None = None) -> None:
    """``python -m lens_safety.organism.external MODEL OUT.json [--builtin] [--judges a,b]``: the
    external test sets (and with ``--builtin`` the builtin test split and holdouts), every judge;
    ``--split val``: the validation splits instead; ``--rejudge``: MODEL is a record of this
    command, whose recorded completions get the ``--judges`` added (no generation)."""
    parser = argparse.ArgumentParser(prog="python -m lens_safety.organism.external")
    parser.add_argument("model", help="model spec, or an adapter directory (merged into smollm2)")
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--builtin",
        type=int,
        nargs="?",
        const=len(BUILTIN_HELDOUT),
        default=0,
        help="also the first K builtin held-out pairs (1: the test split; alone: all, with the holdouts)",
    )
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument(
        "--harmful",
        default=None,
        help="external harmful sets, comma-separated, or none (default: the HarmBench, AdvBench and "
        "Do-Not-Answer malicious-uses splits)",
    )
    parser.add_argument(
        "--harmless",
        default=None,
        help="external benign sets, comma-separated, or none (default: all of mtbench on test, "
        "mtbench:val on val)",
    )
    parser.add_argument("--judges", default=",".join(DEFAULT_JUDGES))
    parser.add_argument("--rejudge", action="store_true", help="MODEL is a record: judge its completions")
    parser.add_argument("--only", default=None, help="with --rejudge: keep the prompts of this set only")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 avoids OpenMP spin-waits on a shared machine)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    judges = args.judges.split(",")
    if args.rejudge:
        saved = json.loads(Path(args.model).read_text(encoding="utf-8"))
        rejudged = rejudge_record(restrict_record(saved, args.only) if args.only else saved, judges)
        write_file_atomic(args.out, json.dumps(rejudged, indent=1, ensure_ascii=False) + "\n")
        return
    adapter = Path(args.model)
    is_adapter = adapter.is_dir() and (adapter / "training.json").is_file()
    model = load_model(materialize_organism(adapter, name="organism-candidate") if is_adapter else args.model)
    require_sound_generation(model)
    record: dict[str, Any] = {"model": args.model, "split": args.split}
    for group, (harmful, harmless) in _groups(args.split, args.harmless, args.builtin, args.harmful).items():
        result = judge_sets(model, harmful, harmless, judges, args.max_new_tokens, True, args.model)
        record[group] = result.to_dict(with_completions=True)
        for one in result.sets:
            print(group, one.spec, {j: f"{sum(r.refused)}/{r.n}" for j, r in one.rates.items()})
        print(group, json.dumps(result.pooled))
    write_file_atomic(args.out, json.dumps(record, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    _main()
