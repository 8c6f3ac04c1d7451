"""Next-token distributions, KL divergence to a reference model and cross-entropy on benign text.

The one KL of lens-safety is :func:`kl_from_log_probs`: for a reference distribution ``P`` and a
compared distribution ``Q`` over the vocabulary ``V``, given as log-probabilities (float64),
``KL(P || Q) = sum_{v in V} p(v) (log p(v) - log q(v))``, natural log (nats), along the last axis
(one value per row / position), clamped at 0. Every KL the library reports is
``KL(P_ref || Q_model)``: ``P`` is the unedited / base / reference model, ``Q`` the edited /
intervened model.

Next-token distributions at the last prompt position (the first generated token) come from
:func:`last_logits` / :func:`last_token_log_probs`: prompts formatted with the chat template, left
padded, one forward pass per batch that computes the unembedding at the last position only
(``logits_to_keep=1``), logits cast to float64 and log-softmaxed. The *first-token KL* of a prompt
set is ``KL`` of those rows, averaged over prompts (:func:`mean_first_token_kl`); selection and
calibration use it.

:func:`kl_divergence` measures a model against a reference on harmless prompts:

* ``first_token`` — ``KL(P_ref || P_model)`` of the next-token distributions at the last prompt
  position (the first generated token), ``sum_v p_ref(v) (log p_ref(v) - log p_model(v))``;
* ``continuation`` — the reference greedily generates its own continuation ``y_1..y_T`` (up to and
  including its end-of-sequence token); both models score ``prompt + y`` in one forward pass and
  the per-position KL is averaged over the ``T`` positions that predict ``y_1..y_T`` (the first of
  them is the first-token KL), then over prompts.

Log-probabilities are computed in float64. Both models must share the tokenizer (same vocabulary
and the same token ids for the prompts); otherwise a :class:`LensSafetyError` is raised.

Cross-entropy (:func:`cross_entropy`): raw text (no chat template, one BOS when the model uses
one), ``CE = - sum_t log p(x_t | x_<t) / number of predicted tokens`` over all texts (token
weighted), in nats; the interval is a bootstrap over texts of that ratio.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from jaxtyping import Float

from lens_safety.activations import row_batches
from lens_safety.chat import EncodedBatch
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.bootstrap import Estimate, bootstrap
from lens_safety.evaluation.generation import Intervention, generate
from lens_safety.forward_pass import forward, forward_rows
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.prompts import PromptSet, PromptSource, builtin_path
from lens_safety.records import Record


@dataclass
class KLResult(Record):
    """KL(reference || model) on harmless prompts (nats), first token and over the reference's continuation."""

    first_token: Estimate
    continuation: Estimate
    per_prompt_first: list[float] = field(default_factory=list)
    per_prompt_continuation: list[float] = field(default_factory=list)
    reference: str = ""
    max_new_tokens: int = 0


@dataclass
class CEResult(Record):
    """Token-weighted cross-entropy (nats per predicted token) on held-out text."""

    ce: Estimate
    per_text: list[float]
    n_tokens: list[int]


def check_same_tokenizer(model: ChatModel, reference: ChatModel) -> None:
    """Refuse a reference whose tokenizer differs (KL over mismatched vocabularies is meaningless)."""
    if model.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise LensSafetyError(
            f"reference model '{reference.spec}' uses a different tokenizer from '{model.spec}'",
            "compare against a model of the same family (same vocabulary), e.g. the model before its edit",
        )


def kl_from_log_probs(
    log_p: Float[torch.Tensor, "*rows vocab"],
    log_q: Float[torch.Tensor, "*rows vocab"],
    *,
    clamp: bool = True,
) -> Float[torch.Tensor, "*rows"]:
    """``KL(P || Q) = sum_v p(v) (log p(v) - log q(v))`` along the last axis, in nats.

    ``log_p``: log-probabilities of the reference ``P``; ``log_q``: of the compared ``Q`` (same
    shape; float64 in every measurement). Computed as ``(exp(log_p) * (log_p - log_q)).sum(-1)``,
    then clamped at 0: KL is non-negative, and rounding can leave a value of order ``-1e-17`` for
    two equal distributions. ``clamp=False`` keeps the plain sum, for a training loss whose
    gradient must not vanish where the adapted model still equals its base.
    """
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.clamp_min(0.0) if clamp else kl


def last_logits(
    model: ChatModel,
    prompts: PromptSet,
    batch_size: int,
    system_prompt: str | None,
    *,
    share_prefix: bool = False,
) -> Iterator[Float[torch.Tensor, "batch vocab"]]:
    """float64 logits ``[batch, vocab]`` at the last prompt position, one left-padded batch at a
    time (``share_prefix``: the batch's shared leading tokens computed once,
    :func:`~lens_safety.forward_pass.forward_rows`; only under position-independent hooks)."""
    with torch.inference_mode():
        for rows in row_batches(model, prompts, batch_size, system_prompt):
            output = forward_rows(model, rows, share_prefix=share_prefix, logits_to_keep=1)
            yield output.logits[:, -1].double().cpu()


def last_token_log_probs(
    model: ChatModel,
    prompts: PromptSource,
    batch_size: int = 16,
    system_prompt: str | None = None,
    *,
    share_prefix: bool = False,
) -> Float[torch.Tensor, "n_prompts vocab"]:
    """float64 next-token log-probabilities at the last prompt position (:func:`last_logits`)."""
    prompt_set = PromptSet.load(prompts)
    rows = last_logits(model, prompt_set, batch_size, system_prompt, share_prefix=share_prefix)
    return torch.cat([torch.log_softmax(x, -1) for x in rows])


def mean_first_token_kl(
    reference: Float[torch.Tensor, "n_prompts vocab"], other: Float[torch.Tensor, "n_prompts vocab"]
) -> float:
    """Mean over prompts of ``KL(reference || other)`` of next-token log-probability rows."""
    return float(kl_from_log_probs(reference, other).mean())


def _log_probs(
    model: ChatModel, batch: EncodedBatch, intervention: Intervention | None
) -> Float[torch.Tensor, "batch seq vocab"]:
    with torch.inference_mode(), intervention() if intervention is not None else nullcontext():
        logits = forward(model, batch).logits
    return logits.double().log_softmax(-1).cpu()


def kl_divergence(
    model: ChatModel,
    reference: ChatModel,
    prompts: PromptSource,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    system_prompt: str | None = None,
    intervention: Intervention | None = None,
    progress: bool = False,
) -> KLResult:
    """KL(reference || model) at the first generated token and over the reference's greedy continuation.

    ``intervention`` is applied to ``model`` only (so ``reference`` may be the same object, e.g. to
    measure an ``add_direction`` edit against the unedited model).
    """
    check_same_tokenizer(model, reference)
    prompt_set = PromptSet.load(prompts)
    gens = generate(
        reference,
        prompt_set,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
    )
    first: list[float] = []
    continuation: list[float] = []
    n_batches = -(-len(prompt_set) // batch_size)
    for b in track(range(n_batches), "KL to reference", total=n_batches, enabled=progress):
        rows = range(b * batch_size, min((b + 1) * batch_size, len(prompt_set)))
        prompt_rows = [
            reference.chat.token_ids(reference.chat.format(prompt_set[i], system_prompt)) for i in rows
        ]
        if [
            model.chat.token_ids(model.chat.format(prompt_set[i], system_prompt)) for i in rows
        ] != prompt_rows:
            raise LensSafetyError(
                f"model '{model.spec}' and reference '{reference.spec}' format the prompts into different tokens",
                "use models with the same chat template, or pass the same --system-prompt",
            )
        # the continuation keeps its end-of-sequence token (when it had one): KL is scored on it too
        continuations = [
            gens.token_ids[i] + ([] if gens.truncated[i] else [int(reference.tokenizer.eos_token_id)])
            for i in rows
        ]
        full = [p + c for p, c in zip(prompt_rows, continuations, strict=True)]
        batch = reference.chat.pad(full)
        log_ref = _log_probs(reference, batch, None)
        log_model = _log_probs(model, batch, intervention)
        if log_ref.shape != log_model.shape:
            raise LensSafetyError(
                "model and reference have different vocabulary sizes",
                "compare models with the same tokenizer",
            )
        kl = kl_from_log_probs(
            log_ref, log_model
        )  # [batch, seq]: KL of the distribution predicting position t+1
        width = batch.input_ids.shape[1]
        for j, (_prompt_ids, c) in enumerate(zip(prompt_rows, continuations, strict=True)):
            start = width - len(c) - 1  # the last prompt token predicts the first continuation token
            per_position = kl[j, start : start + max(len(c), 1)]
            first.append(float(kl[j, start]))
            continuation.append(float(per_position.mean()))
    return KLResult(
        bootstrap(first), bootstrap(continuation), first, continuation, reference.spec, max_new_tokens
    )


def benign_texts() -> list[str]:
    """The built-in held-out prose paragraphs (``benign_text.txt``)."""
    lines = builtin_path("benign_text.txt").read_text(encoding="utf-8").splitlines()
    return [x.strip() for x in lines if x.strip()]


def cross_entropy(
    model: ChatModel,
    texts: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    intervention: Intervention | None = None,
    progress: bool = False,
) -> CEResult:
    """Token-weighted cross-entropy of ``model`` on raw ``texts`` (default: the built-in benign text)."""
    items = benign_texts() if texts is None else [str(t) for t in texts]
    if not items:
        raise LensSafetyError("no texts for cross-entropy", "pass at least one text")
    rows = [model.chat.token_ids(t)[:max_length] for t in items]
    short = [i for i, r in enumerate(rows) if len(r) < 2]
    if short:
        raise LensSafetyError(f"text {short[0]} has fewer than 2 tokens", "give texts of at least two tokens")
    nll: list[float] = []
    counts: list[int] = []
    n_batches = -(-len(rows) // batch_size)
    for b in track(range(n_batches), "cross-entropy", total=n_batches, enabled=progress):
        chunk = rows[b * batch_size : (b + 1) * batch_size]
        batch = model.chat.pad(chunk)
        with torch.inference_mode(), intervention() if intervention is not None else nullcontext():
            logits = forward(model, batch).logits
        width = batch.input_ids.shape[1]
        for j, row in enumerate(chunk):
            start = width - len(row)
            # log p(x_t | x_<t) = z_t - logsumexp(z) in float64, on the row's own positions only
            z = logits[j, start : width - 1].double().cpu()
            targets = batch.input_ids[j, start + 1 :].unsqueeze(-1)
            predicted = z.gather(-1, targets).squeeze(-1) - torch.logsumexp(z, -1)
            nll.append(float(-predicted.sum()))
            counts.append(len(row) - 1)
    per_text = [s / c for s, c in zip(nll, counts, strict=True)]
    estimate = bootstrap(per_text, weights=counts)
    return CEResult(estimate, per_text, counts)
