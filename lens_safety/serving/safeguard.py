"""Best-of-N for a batch of requests: sample, read features, score, choose (what one worker step does).

:meth:`Safeguard.answer` takes the requests of one scheduler step and:

1. groups them by sampling settings (``n``, temperature, ``max_tokens``, whether features are
   captured); a request with a ``seed`` is a group of its own, so its candidates are reproducible;
2. samples every group with the engine in one call (``n`` candidates per request);
3. with the safeguard on, deduplicates each request's candidates (whitespace-normalised text,
   first occurrence kept, :func:`lens_safety.srr.data.first_occurrences`) and reads the ranker's
   features exactly as ``srr build-data`` stored them for training:

   * ``with_instruction``: ONE teacher-forced pass over ``prompt + candidate`` for every candidate
     of every request in the step (:func:`lens_safety.srr.features.read_token_states`, stopped at
     the ranker's layer), reading the last prompt token (the instruction) and the candidate's
     last token;
   * ``response_only``: :func:`lens_safety.srr.features.list_features` per request;
   * ``generated`` / ``generated_mean``: read while sampling (no extra pass);
   * ``text`` rankers: hashed n-grams of the texts;

4. scores all lists in one ranker call (lists padded, padded candidates masked:
   ``s_i = cos(o_inst, o_resp_i) / tau``, mean over members) and returns the argmax. With the
   safeguard off (or nothing to rank) the answer is the first sample, unscored.

Features are raw-HF-basis residual states at the ranker's layer (``l < n_layers``:
``blocks.l.hook_resid_pre``; ``n_layers``: the final block's ``hook_resid_post``, pre-norm).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import Decoding
from lens_safety.models import ChatModel
from lens_safety.serving.engine import Capture, Engine, EngineOutput
from lens_safety.serving.protocol import ChatRequest
from lens_safety.srr.data import first_occurrences
from lens_safety.srr.features import (
    SAMPLED_CONTEXTS,
    list_features,
    prompt_token_ids,
    read_token_states,
    response_token_ids,
)
from lens_safety.srr.inputs import ListInput, hashed_text_features, pad_lists
from lens_safety.srr.metrics import ranking
from lens_safety.srr.ranker import SafetyRanker, check_base_model


@dataclass
class Answer:
    """The answer to one request.

    Attributes:
        text: the returned candidate.
        finish_reason: ``stop`` (end-of-sequence token) or ``length`` (cut at ``max_tokens``).
        completion_tokens: tokens of the returned candidate.
        sampled_tokens: tokens of all ``n`` samples.
        n_sampled: candidates sampled.
        sample_index: for each unique candidate, its index among the ``n`` samples.
        candidates: the unique candidates, in sampling order.
        scores: ranker score per unique candidate (``None``: safeguard off).
        chosen: index into ``candidates`` of the returned one.
        sampling_seconds: wall time of the engine call that sampled this request's group.
        ranking_seconds: wall time of feature reading + ranker for the whole step (0 when off).
        batch_size: requests answered in the same step.
    """

    text: str
    finish_reason: str
    completion_tokens: int
    sampled_tokens: int
    n_sampled: int
    sample_index: list[int]
    candidates: list[str]
    scores: list[float] | None
    chosen: int
    sampling_seconds: float
    ranking_seconds: float = 0.0
    batch_size: int = 1
    candidate_tokens: list[int] = field(default_factory=list, repr=False)
    candidate_truncated: list[bool] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.scores is not None,
            "n_sampled": self.n_sampled,
            "n_unique": len(self.candidates),
            "chosen_index": self.chosen,
            "scores": self.scores,
            "sample_index": self.sample_index,
            "timing": {
                "sampling_seconds": self.sampling_seconds,
                "ranking_seconds": self.ranking_seconds,
                "batch_size": self.batch_size,
            },
        }


@dataclass
class Sampled:
    """One request's place in its engine call, and its answer so far."""

    request: ChatRequest
    output: EngineOutput
    position: int
    answer: Answer


class Safeguard:
    """The model, its engine and the ranker: answers batches of requests (module docstring)."""

    def __init__(self, model: ChatModel, ranker: SafetyRanker, engine: Engine) -> None:
        if ranker.base_model is not None:
            check_base_model(ranker.base_model, model.identity(), Path("<in memory>"))
        config = ranker.config
        if config.features != "text" and config.layer is None:
            raise LensSafetyError(
                "the ranker records no feature layer", "retrain it with `lens-safety srr train`"
            )
        if config.features != "text" and config.context in SAMPLED_CONTEXTS and not engine.exposes_states:
            raise LensSafetyError(
                f"the {engine.name} engine cannot read hidden states while sampling, which the ranker's "
                f"'{config.context}' features need",
                "use --engine hf, or a ranker trained on with_instruction features",
            )
        self.model = model
        self.ranker = ranker.eval()
        self.engine = engine

    @property
    def capture(self) -> Capture | None:
        """What the engine reads while sampling for a guarded request (``None``: nothing)."""
        config = self.ranker.config
        if config.features == "text" or config.context not in SAMPLED_CONTEXTS or config.layer is None:
            return None
        return Capture(config.layer, config.context == "generated_mean")

    def answer(self, requests: Sequence[ChatRequest]) -> list[Answer | Exception]:
        """One answer (or the exception that stopped it) per request, in order."""
        results: list[Answer | Exception] = [LensSafetyError("not answered")] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, request in enumerate(requests):
            seed_key = ("seed", request.seed, i) if request.seed is not None else None
            key = (request.n, request.temperature, request.max_tokens, request.safeguard, seed_key)
            groups.setdefault(key, []).append(i)
        sampled: dict[int, Sampled] = {}
        for members in groups.values():
            first = requests[members[0]]
            decoding = Decoding(
                first.max_tokens,
                do_sample=True,
                temperature=first.temperature,
                seed=first.seed,
                num_return_sequences=first.n,
            )
            capture = self.capture if first.safeguard else None
            try:
                output = self.engine.sample([requests[i].instruction for i in members], decoding, capture)
            except Exception as exc:  # the group fails, the step goes on
                for i in members:
                    results[i] = exc
                continue
            for position, i in enumerate(members):
                sampled[i] = Sampled(
                    requests[i], output, position, self._unscored(requests[i], output, position)
                )
        guarded = [i for i in sampled if requests[i].safeguard]
        if guarded:
            started = time.perf_counter()
            try:
                scores = self._scores([sampled[i] for i in guarded])
            except Exception as exc:
                for i in guarded:
                    results[i] = exc
                    del sampled[i]
            else:
                seconds = time.perf_counter() - started
                for i, row in zip(guarded, scores, strict=True):
                    self._choose(sampled[i].answer, row, seconds)
        for i, item in sampled.items():
            item.answer.batch_size = len(requests)
            results[i] = item.answer
        return results

    @staticmethod
    def _unscored(request: ChatRequest, output: EngineOutput, position: int) -> Answer:
        span = range(position * request.n, (position + 1) * request.n)
        texts = [output.completions[j] for j in span]
        keep = first_occurrences(texts) if request.safeguard else list(range(request.n))
        return Answer(
            text=texts[0],
            finish_reason="length" if output.truncated[span.start] else "stop",
            completion_tokens=output.n_tokens[span.start],
            sampled_tokens=sum(output.n_tokens[j] for j in span),
            n_sampled=request.n,
            sample_index=keep,
            candidates=[texts[j] for j in keep],
            scores=None,
            chosen=0,
            sampling_seconds=output.seconds,
            candidate_tokens=[output.n_tokens[span.start + j] for j in keep],
            candidate_truncated=[output.truncated[span.start + j] for j in keep],
        )

    @staticmethod
    def _choose(answer: Answer, scores: torch.Tensor, seconds: float) -> None:
        best = ranking(scores)[0]
        answer.scores = [float(x) for x in scores]
        answer.chosen = best
        answer.text = answer.candidates[best]
        answer.finish_reason = "length" if answer.candidate_truncated[best] else "stop"
        answer.completion_tokens = answer.candidate_tokens[best]
        answer.ranking_seconds = seconds

    def _scores(self, items: list[Sampled]) -> list[torch.Tensor]:
        """Ranker scores per request (one tensor of its unique candidates' scores), one ranker call."""
        config = self.ranker.config
        if config.features == "text":
            lists = [
                _list(
                    hashed_text_features([x.request.instruction], config.d_input)[0],
                    hashed_text_features(x.answer.candidates, config.d_input),
                )
                for x in items
            ]
        elif config.context in SAMPLED_CONTEXTS:
            lists = []
            for x in items:
                assert x.output.instruction is not None and x.output.responses is not None
                rows = [x.position * x.request.n + j for j in x.answer.sample_index]
                lists.append(_list(x.output.instruction[x.position], x.output.responses[rows]))
        elif config.context == "with_instruction":
            lists = self._teacher_forced(items, int(config.layer or 0))
        else:
            lists = []
            for x in items:
                h_inst, h_resp = list_features(
                    self.model,
                    x.request.instruction,
                    x.answer.candidates,
                    [int(config.layer or 0)],
                    [config.context],
                )
                lists.append(_list(h_inst[0], h_resp[config.context][:, 0]))
        inst, resp, _, valid = pad_lists(lists)
        with torch.no_grad():
            scores = self.ranker(inst, resp, valid)
        return [scores[row, : len(x.answer.candidates)] for row, x in enumerate(items)]

    def _teacher_forced(self, items: list[Sampled], layer: int) -> list[ListInput]:
        """``with_instruction`` features of every candidate of every request in ONE batched pass."""
        rows: list[list[int]] = []
        owner: list[int] = []
        prompt_ends: list[int] = []
        for index, x in enumerate(items):
            prompt_ids = prompt_token_ids(self.model, x.request.instruction)
            for text in x.answer.candidates:
                rows.append(prompt_ids + response_token_ids(self.model, text))
                prompt_ends.append(len(prompt_ids) - 1)
                owner.append(index)
        positions = [[end, -1] for end in prompt_ends]
        states: Float[torch.Tensor, "rows 2 d"] = read_token_states(self.model, rows, positions, [layer])[
            :, :, 0
        ]
        lists = []
        for index in range(len(items)):
            mine = [r for r, o in enumerate(owner) if o == index]
            lists.append(_list(states[mine[0], 0], states[mine, 1]))
        return lists


def _list(instruction: Float[torch.Tensor, " d"], responses: Float[torch.Tensor, "m d"]) -> ListInput:
    """A ranker input without labels (``positive`` is unused when scoring)."""
    return ListInput(instruction, responses, torch.zeros(len(responses), dtype=torch.bool))
