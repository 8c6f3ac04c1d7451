"""Evaluation: generation, refusal judges, metrics with bootstrap intervals, jailbreaks, reports.

Every metric keeps its completions for inspection and carries a percentile bootstrap interval.
"""

from lens_safety.evaluation.agreement import Agreement, judge_agreement, load_labelled
from lens_safety.evaluation.bootstrap import Estimate, bootstrap
from lens_safety.evaluation.damage import (
    DamageResult,
    DegenerationCheck,
    degeneration_check,
    generation_damage,
    is_degenerate,
)
from lens_safety.evaluation.divergence import CEResult, KLResult, benign_texts, cross_entropy, kl_divergence
from lens_safety.evaluation.generation import Generations, Intervention, generate
from lens_safety.evaluation.guard import GuardJudge
from lens_safety.evaluation.jailbreaks import (
    JailbreakResult,
    JailbreakTemplate,
    attack_success_rate,
    load_jailbreak_templates,
)
from lens_safety.evaluation.judges import (
    REFUSAL_SUBSTRINGS,
    BroadSubstringJudge,
    CallableJudge,
    ClassifierJudge,
    Judge,
    StrictSubstringJudge,
    SubstringJudge,
    Verdict,
    get_judge,
    get_judges,
    harm_verdict,
    judge_from_callable,
    judge_question,
    run_judge,
)
from lens_safety.evaluation.llm_judge import OpenAIJudge
from lens_safety.evaluation.metrics import (
    RateResult,
    RefusalEvaluation,
    evaluate_refusal,
    rate_of_completions,
    refusal_rate,
)
from lens_safety.evaluation.panel import JudgeRates, PairAgreement, pair_agreement
from lens_safety.evaluation.report import render_report, write_report
from lens_safety.evaluation.suite import ModelEvaluation, evaluate_model
from lens_safety.evaluation.utility import UtilityEvaluation, UtilityResult, evaluate_utility

__all__ = [
    "REFUSAL_SUBSTRINGS",
    "Agreement",
    "BroadSubstringJudge",
    "CEResult",
    "CallableJudge",
    "ClassifierJudge",
    "DamageResult",
    "DegenerationCheck",
    "Estimate",
    "Generations",
    "GuardJudge",
    "Intervention",
    "JailbreakResult",
    "JailbreakTemplate",
    "Judge",
    "JudgeRates",
    "KLResult",
    "ModelEvaluation",
    "OpenAIJudge",
    "PairAgreement",
    "RateResult",
    "RefusalEvaluation",
    "StrictSubstringJudge",
    "SubstringJudge",
    "UtilityEvaluation",
    "UtilityResult",
    "Verdict",
    "attack_success_rate",
    "benign_texts",
    "bootstrap",
    "cross_entropy",
    "degeneration_check",
    "evaluate_model",
    "evaluate_refusal",
    "evaluate_utility",
    "generate",
    "generation_damage",
    "get_judge",
    "get_judges",
    "harm_verdict",
    "is_degenerate",
    "judge_agreement",
    "judge_from_callable",
    "judge_question",
    "kl_divergence",
    "load_jailbreak_templates",
    "load_labelled",
    "pair_agreement",
    "rate_of_completions",
    "refusal_rate",
    "render_report",
    "run_judge",
    "write_report",
]
