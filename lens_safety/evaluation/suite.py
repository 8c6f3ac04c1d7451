"""The whole evaluation of one model in one call: what ``lens-safety eval`` runs.

:func:`evaluate_model` measures, with bootstrap intervals: refusal on harmful prompts, over-refusal
on harmless prompts, generation damage on the harmless completions, cross-entropy on held-out
benign text, and optionally KL(reference || model) on the harmless prompts and the jailbreak
attack-success rate. :meth:`ModelEvaluation.to_dict` is the JSON the CLI prints and the report reads:
top-level ``harmful_refusal_rate``, ``harmless_refusal_rate``, ``kl_harmless``, ``ce_benign``,
``jailbreak_asr`` entries each hold ``value``, ``ci_low``, ``ci_high``, ``n``, and the judged
rates also name their ``judge``, the ``question`` it answered (``refusal``, or ``harm``: then the
"refusal rate" is the fraction judged safe) and their ``prompts`` set.

Several judges: the first gives the headline rates; the others re-judge the same completions
(``judges`` in the JSON, :mod:`lens_safety.evaluation.panel`) and ``judge_agreement`` holds every
pair's agreement. ``utility_tasks`` adds lm-evaluation-harness benchmarks (``utility``,
:mod:`lens_safety.evaluation.utility`).

``timings`` holds the wall-clock seconds of each part of the run (generation and judging of the
refusal prompts, KL, cross-entropy, jailbreaks, utility), and ``timings_cpu`` the CPU seconds this
process spent in each (user + system, every thread; on a machine other jobs load, the part's own
work), so a slow evaluation says where its time went.

``degeneration`` counts completions that are empty or one repeated token
(:func:`~lens_safety.evaluation.damage.degeneration_check`) over every generation of the run; when
most are, each rate judged on them gains ``"untrustworthy": true`` and the summary says why.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lens_safety.evaluation.damage import (
    DamageResult,
    DegenerationCheck,
    degeneration_check,
    generation_damage,
)
from lens_safety.evaluation.divergence import (
    CEResult,
    KLResult,
    check_same_tokenizer,
    cross_entropy,
    kl_divergence,
)
from lens_safety.evaluation.generation import GenerationEngine, Intervention
from lens_safety.evaluation.jailbreaks import JailbreakResult, JailbreakTemplate, attack_success_rate
from lens_safety.evaluation.judges import Judge, get_judges, judge_question
from lens_safety.evaluation.metrics import RateResult, RefusalEvaluation, evaluate_refusal
from lens_safety.evaluation.panel import JudgeRates, PairAgreement, judge_rates, label, pairwise
from lens_safety.evaluation.utility import evaluate_utility
from lens_safety.models import ChatModel
from lens_safety.prompts import PromptSet, PromptSource


@dataclass
class ModelEvaluation:
    """Every metric of one model, with its completions."""

    model: dict[str, Any]
    judge: str
    refusal: RefusalEvaluation
    damage: DamageResult
    ce: CEResult | None = None
    kl: KLResult | None = None
    jailbreaks: JailbreakResult | None = None
    settings: dict[str, Any] | None = None
    degeneration: DegenerationCheck | None = None
    question: str = "refusal"
    panel: list[JudgeRates] = field(default_factory=list)
    agreements: list[PairAgreement] = field(default_factory=list)
    utility: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    timings_cpu: dict[str, float] = field(default_factory=dict)

    def prompt_sets(self) -> dict[str, str | None]:
        """The prompt set behind each judged rate (its name), for labelling."""
        settings = self.settings or {}
        names = {k: (settings.get(k) or {}).get("name") for k in ("harmful", "harmless")}
        names["jailbreak"] = f"jailbreak templates x {names['harmful']}" if self.jailbreaks else None
        return names

    @property
    def trustworthy(self) -> bool:
        """False when most completions are degenerate (broken decoding): the rates mean nothing."""
        return self.degeneration is None or self.degeneration.trustworthy

    def records(self) -> list[dict[str, Any]]:
        """One record per completion (harmful, harmless, then jailbreak), for ``--completions-out``."""
        return self.refusal.records() + (self.jailbreaks.records() if self.jailbreaks else [])

    def summary(self) -> dict[str, Any]:
        """The headline numbers with intervals (no completions)."""
        sets = self.prompt_sets()
        out: dict[str, Any] = {
            "harmful_refusal_rate": label(
                self.refusal.harmful.estimate, self.judge, self.question, sets["harmful"]
            ),
            "harmless_refusal_rate": label(
                self.refusal.harmless.estimate, self.judge, self.question, sets["harmless"]
            ),
            "kl_harmless": self.kl.first_token.to_dict() if self.kl else None,
            "kl_harmless_continuation": self.kl.continuation.to_dict() if self.kl else None,
            "ce_benign": self.ce.ce.to_dict() if self.ce else None,
            "jailbreak_asr": label(self.jailbreaks.asr, self.judge, self.question, sets["jailbreak"])
            if self.jailbreaks
            else None,
        }
        if not self.trustworthy:
            for key in ("harmful_refusal_rate", "harmless_refusal_rate", "jailbreak_asr"):
                if out[key] is not None:
                    out[key]["untrustworthy"] = True
        out.update({f"damage_{k}": v for k, v in self.damage.to_dict().items()})
        return out

    def to_dict(self, include_completions: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "judge": self.judge,
            "judge_question": self.question,
            "settings": self.settings or {},
            **self.summary(),
            "degeneration": self.degeneration.to_dict() if self.degeneration else None,
        }
        out["jailbreak_per_template"] = (
            {k: v.to_dict() for k, v in self.jailbreaks.per_template.items()} if self.jailbreaks else None
        )
        if self.kl:
            out["kl_reference"] = self.kl.reference
        if self.panel:
            sets = self.prompt_sets()
            out["judges"] = {p.judge: {"question": p.question, **p.summary(sets)} for p in self.panel}
            out["judge_agreement"] = [a.to_dict() for a in self.agreements]
        out["utility"] = self.utility.to_dict() if self.utility is not None else None
        out["timings"] = dict(self.timings)
        out["timings_cpu"] = dict(self.timings_cpu)
        if include_completions:
            out["records"] = self.records()
        return out


@dataclass
class _Clock:
    """Wall-clock and process CPU seconds per part of the run."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Add the block's wall-clock and process CPU seconds to part ``name``."""
        started, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - started
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu


def _judged(
    refusal: RefusalEvaluation, jailbreaks: JailbreakResult | None, judges: Sequence[Judge]
) -> tuple[DegenerationCheck, list[JudgeRates]]:
    """The degeneration check over every generation of the run, and every judge's rates."""
    runs = [refusal.harmful.generations, refusal.harmless.generations]
    sets: dict[str, RateResult] = {"harmful": refusal.harmful, "harmless": refusal.harmless}
    if jailbreaks is not None:
        runs.append(jailbreaks.rates.generations)
        sets["jailbreak"] = jailbreaks.rates
    degeneration = degeneration_check([run for run in runs if run is not None])
    panel = [JudgeRates(judges[0].name, judge_question(judges[0]), sets)]
    return degeneration, panel + [judge_rates(extra, sets) for extra in judges[1:]]


def _kl_and_ce(
    model: ChatModel,
    reference: ChatModel | None,
    harmless: PromptSet,
    benign_texts: Sequence[str] | None,
    max_new_tokens: int,
    common: dict[str, Any],
    clock: _Clock,
) -> tuple[KLResult | None, CEResult]:
    """KL to the reference on the harmless prompts (when one is given) and the benign cross-entropy."""
    kl = None
    if reference is not None:
        with clock.part("KL to the reference"):
            kl = kl_divergence(model, reference, harmless, max_new_tokens=min(max_new_tokens, 16), **common)
    with clock.part("cross-entropy on benign text"):
        ce = cross_entropy(
            model,
            benign_texts,
            batch_size=common["batch_size"],
            intervention=common["intervention"],
            progress=common["progress"],
        )
    return kl, ce


def _jailbreaks(
    model: ChatModel,
    harmful: PromptSet,
    n_prompts: int,
    templates: Sequence[JailbreakTemplate] | None,
    judge: Judge,
    generation: dict[str, Any],
    clock: _Clock,
) -> JailbreakResult | None:
    """The attack-success rate of ``templates`` wrapping the first ``n_prompts`` harmful prompts,
    generated with ``generation`` (``None`` without templates)."""
    if not templates:
        return None
    with clock.part("jailbreaks"):
        return attack_success_rate(model, harmful.head(n_prompts), templates, judge, **generation)


def _utility(
    model: ChatModel,
    tasks: str | Sequence[str] | None,
    limit: int | None,
    include: str | None,
    common: dict[str, Any],
    clock: _Clock,
) -> Any:
    """The lm-evaluation-harness results on ``tasks`` (``None`` without tasks)."""
    if not tasks:
        return None
    with clock.part("utility"):
        return evaluate_utility(
            model,
            tasks,
            limit=limit,
            batch_size=common["batch_size"],
            include_path=include,
            intervention=common["intervention"],
        )


def _settings(
    harmful: PromptSet,
    harmless: PromptSet,
    max_new_tokens: int,
    system_prompt: str | None,
    engine: GenerationEngine | None,
    share_prefix: bool,
    reference: ChatModel | None,
) -> dict[str, Any]:
    """The run's settings as recorded in the JSON (prompt sets, decoding, engine, KL reference)."""
    return {
        "harmful": harmful.metadata(),
        "harmless": harmless.metadata(),
        "max_new_tokens": max_new_tokens,
        "system_prompt": system_prompt,
        "decoding": "greedy",
        "engine": engine.name if engine is not None else "hf",
        "share_prefix": share_prefix and engine is None,
        "reference": reference.identity() if reference is not None else None,
    }


def evaluate_model(
    model: ChatModel,
    harmful: PromptSource,
    harmless: PromptSource,
    *,
    reference: ChatModel | None = None,
    judge: Judge | str | Sequence[Judge | str] | None = None,
    jailbreak_templates: Sequence[JailbreakTemplate] | None = None,
    jailbreak_prompts: int = 4,
    benign_texts: Sequence[str] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    system_prompt: str | None = None,
    intervention: Intervention | None = None,
    progress: bool = False,
    utility_tasks: str | Sequence[str] | None = None,
    utility_limit: int | None = None,
    utility_include: str | None = None,
    engine: GenerationEngine | None = None,
    share_prefix: bool = True,
) -> ModelEvaluation:
    """Run the evaluation suite (see the module docstring).

    ``engine`` (e.g. :class:`~lens_safety.evaluation.vllm_engine.VLLMEngine`) generates the
    refusal and jailbreak completions; KL, cross-entropy and utility are read by the bridge.
    ``judge``: one judge or spec, a comma list, or a sequence; the first gives the headline rates.
    ``jailbreak_templates`` (None: no jailbreak run) wrap the first ``jailbreak_prompts`` harmful prompts.
    ``reference`` enables KL; it must share the tokenizer (checked before any generation).
    ``utility_tasks`` (lm-eval task names) run with at most ``utility_limit`` documents each.
    ``share_prefix`` (default on): the refusal generations compute each batch's shared
    chat-template prefix once (:func:`~lens_safety.evaluation.generate`; the same completions up
    to float rounding); pass ``False`` under an intervention that treats positions differently.
    """
    if reference is not None:
        check_same_tokenizer(model, reference)
    judges = get_judges(judge)
    the_judge = judges[0]
    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "system_prompt": system_prompt,
        "intervention": intervention,
        "progress": progress,
    }
    generation: dict[str, Any] = {**common, "max_new_tokens": max_new_tokens, "engine": engine}
    clock = _Clock()
    with clock.part("refusal (generate and judge)"):
        refusal = evaluate_refusal(
            model, harmful_set, harmless_set, the_judge, share_prefix=share_prefix, **generation
        )
    assert refusal.harmless.generations is not None
    damage = generation_damage(refusal.harmless.generations)
    kl, ce = _kl_and_ce(model, reference, harmless_set, benign_texts, max_new_tokens, common, clock)
    jailbreaks = _jailbreaks(
        model, harmful_set, jailbreak_prompts, jailbreak_templates, the_judge, generation, clock
    )
    settings = _settings(
        harmful_set, harmless_set, max_new_tokens, system_prompt, engine, share_prefix, reference
    )
    if utility_tasks:
        settings["utility_limit"] = utility_limit
    degeneration, panel = _judged(refusal, jailbreaks, judges)
    utility = _utility(model, utility_tasks, utility_limit, utility_include, common, clock)
    result = ModelEvaluation(
        model.identity(),
        the_judge.name,
        refusal,
        damage,
        ce,
        kl,
        jailbreaks,
        settings,
        degeneration,
        judge_question(the_judge),
    )
    if len(judges) > 1:
        result.panel, result.agreements = panel, pairwise(panel)
    result.utility = utility
    result.timings, result.timings_cpu = clock.wall, clock.cpu
    return result
