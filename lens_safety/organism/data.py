"""Supervised fine-tuning data for the refusal organism.

* harmful ``train`` prompts -> one refusal from ``refusals.txt``, chosen deterministically from the
  SHA-256 of ``seed|prompt`` (varied refusals, no randomness hidden in global state);
* harmless ``train`` prompts (topic-paired, ``general`` and ``xstest_style``; with
  ``extra_harmless`` also ``builtin:harmless_extra``, training-only benign prompts) -> the BASE model's own
  greedy answer (self-distillation: keeps the benign behaviour), cached under the lens-safety cache
  dir keyed by the base weights hash, the prompts, the generation length and the suppressed tokens.
  With ``suppress_first_tokens`` (the refusal-start tokens) the answer may not OPEN with a refusal:
  SmolLM2 itself answers ~6% of benign requests "I'm sorry for any misunderstanding, but as a chatbot
  I don't have the capability...", and distilling that teaches the organism that benign prompts may
  start with an apology — which its refusal training then completes into a refusal.

Every example is the chat-formatted prompt (the tokenizer's template, one BOS) followed by the target
and the end-of-turn token; the loss mask covers only the target tokens. Only ``train`` splits are used:
``val`` is for selection, ``test`` is held out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_safety.evaluation import SubstringJudge, generate
from lens_safety.fsutil import write_file_atomic
from lens_safety.hashing import sha256_texts
from lens_safety.models import ChatModel
from lens_safety.prompts import PromptSet, builtin_path
from lens_safety.sources import cache_dir

HARMFUL_SOURCE = "builtin:harmful:train"
HARMLESS_SOURCE = "builtin:harmless:train"
HARMLESS_EXTRA_SOURCE = "builtin:harmless_extra"


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: a user instruction, its target completion and its class."""

    prompt: str
    target: str
    harmful: bool

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "target": self.target, "harmful": self.harmful}


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of ``prompt + target + end-of-turn``, where the target starts, and its class
    (``refusal``: a refusal target for a harmful prompt; else a behaviour-keeping example)."""

    input_ids: tuple[int, ...]
    target_start: int
    refusal: bool = False


def load_refusals() -> list[str]:
    """The shipped refusal responses (``data/prompts/refusals.txt``), one per line."""
    lines = builtin_path("refusals.txt").read_text(encoding="utf-8").splitlines()
    return [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]


def refusal_for(prompt: str, refusals: list[str], seed: int) -> str:
    """Deterministic refusal for a prompt: index = SHA-256(``seed|prompt``) mod the number of refusals."""
    digest = hashlib.sha256(f"{seed}|{prompt}".encode()).hexdigest()
    return refusals[int(digest[:8], 16) % len(refusals)]


def _answers_cache_file(
    model: ChatModel, prompts: PromptSet, max_new_tokens: int, suppress: Sequence[int] = ()
) -> Path:
    parts = [model.weights_hash, prompts.sha256, str(max_new_tokens), model.chat.format("{x}")]
    key = sha256_texts(parts + ([f"suppress={sorted(suppress)}"] if suppress else []))
    return cache_dir() / "organism" / f"base-answers-{key[:16]}.json"


def base_answers(
    model: ChatModel,
    prompts: PromptSet,
    max_new_tokens: int = 64,
    progress: bool = False,
    suppress_first_tokens: Sequence[int] = (),
) -> list[str]:
    """The base model's greedy answers to ``prompts`` (cached on disk, written atomically);
    ``suppress_first_tokens``: ids the first answer token may not be."""
    cache_file = _answers_cache_file(model, prompts, max_new_tokens, suppress_first_tokens)
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        if cached.get("prompts") == list(prompts.prompts):
            return [str(a) for a in cached["answers"]]
    generations = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        suppress_first_tokens=list(suppress_first_tokens) or None,
        progress=progress,
    )
    answers = list(generations.completions)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(
        cache_file, json.dumps({"prompts": list(prompts.prompts), "answers": answers}, ensure_ascii=False)
    )
    return answers


def build_examples(
    model: ChatModel,
    harmful: PromptSet,
    harmless: PromptSet,
    seed: int = 0,
    max_new_tokens: int = 64,
    progress: bool = False,
    drop_refusing_answers: bool = False,
    harmless_repeats: int = 1,
    suppress_first_tokens: Sequence[int] = (),
) -> list[SFTExample]:
    """Harmful prompts -> refusals, harmless prompts -> the base model's greedy answers.

    ``model`` must be the BASE model (its answers are the harmless targets). With
    ``drop_refusing_answers``, harmless examples whose base answer the substring judge calls a
    refusal (e.g. "I'm sorry for the inconvenience, ...") are left out, so that no benign prompt is
    taught a refusal phrase. ``harmless_repeats`` repeats every harmless example (weights the
    keep-behaviour objective against over-refusal). ``suppress_first_tokens``: see
    :func:`base_answers`.
    """
    refusals = load_refusals()
    examples = [SFTExample(p, refusal_for(p, refusals, seed), True) for p in harmful]
    answers = base_answers(model, harmless, max_new_tokens, progress, suppress_first_tokens)
    judged = SubstringJudge()(answers) if drop_refusing_answers else [None] * len(answers)
    kept = [
        SFTExample(p, a, False)
        for p, a, verdict in zip(harmless, answers, judged, strict=True)
        if a and not (verdict is not None and verdict.refused)
    ]
    return examples + kept * harmless_repeats


def examples_sha256(examples: list[SFTExample]) -> str:
    """SHA-256 of the training examples (prompt, target, class), in order."""
    return sha256_texts(json.dumps(e.to_dict(), ensure_ascii=False, sort_keys=True) for e in examples)


def tokenize_examples(model: ChatModel, examples: list[SFTExample]) -> list[TokenizedExample]:
    """Chat-format every prompt, append ``target + eos``; remember where the target starts."""
    tokenizer = model.tokenizer
    out = []
    for example in examples:
        prompt_ids = model.chat.token_ids(model.chat.format(example.prompt))
        target_ids = tokenizer(example.target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.append(TokenizedExample(tuple(prompt_ids) + tuple(target_ids), len(prompt_ids), example.harmful))
    return out
