"""Seeded LoRA fine-tuning of a causal LM on (prompt, target) examples, on CPU.

``fit_lora`` trains low-rank adapters ``Delta W = (alpha / r) B A`` (``A: [r, d_in]``,
``B: [d_out, r]``, peft's initialisation: ``A`` Kaiming-uniform, ``B = 0``) on the chosen
projections. Loss, per example, averaged over the batch (the unembedding is applied only at target
positions, which saves most of the vocab projection):

* refusal examples (harmful prompts): mean cross-entropy of the refusal target tokens;
* behaviour-keeping examples (harmless prompts) with ``harmless_objective="kl"``: mean over the
  target positions ``t`` of ``KL(p_base(. | x_<t) || p_adapted(. | x_<t))``, the soft next-token
  distribution of the frozen base (adapters disabled) as the target: self-distillation of the whole
  distribution, not only of the greedy token; with ``"ce"``: cross-entropy of the base's greedy
  answer (hard self-distillation).

``first_token_weight`` weighs the first target position ``w`` times the others (the first answer
token is where a model decides to refuse). With ``suppress_refusal_start`` the teacher at the first
target position is the base distribution conditioned on NOT opening with a refusal-start token.
AdamW, linear warm-up then linear decay, gradient clipping at 1.

Determinism: ``torch.manual_seed(seed)`` before the adapters are created, a fixed number of threads,
length-sorted batches whose order is shuffled per epoch by a generator seeded with ``seed + epoch``,
no dropout. Two runs with the same inputs, torch build and thread count give bitwise equal adapters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.divergence import kl_from_log_probs
from lens_safety.organism.data import TokenizedExample
from lens_safety.progress import track
from lens_safety.selection import refusal_token_ids

LLAMA_PROJECTIONS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of the organism's LoRA fine-tune (all recorded in ``training.json``).

    ``first_layer``: adapters go on blocks ``first_layer .. n_layers - 1`` only, so the backward pass
    stops there (cheaper on CPU). ``max_new_tokens``: length of the base model's self-distilled
    answers; ``drop_refusing_answers``: leave out harmless examples whose base answer the substring
    judge calls a refusal; ``harmless_repeats``: copies of each harmless example per epoch.
    ``harmless_objective``: ``"kl"`` (soft distillation from the base) or ``"ce"`` (its greedy
    answer); ``first_token_weight``: weight of the first target token relative to the others;
    ``suppress_refusal_start``: behaviour-keeping targets may not open with a refusal-start token
    (:func:`~lens_safety.selection.refusal_token_ids`): the base's greedy answers are generated so,
    and the KL teacher's first-token distribution is renormalised without those tokens.
    ``extra_harmless``: also self-distil ``builtin:harmless_extra`` (benign requests on the harmful
    categories' topics, written for training only, never in a val / test split), so that refusal
    has to key on intent rather than on topic words.
    ``more_harmless``: further benign prompt sets (files or ``builtin:`` specs), self-distilled
    like ``extra_harmless`` and appended after it in the order given; none may contain a
    validation or test prompt.
    ``more_harmful``: further harmful prompt sets (files, ``builtin:`` or external specs such as
    ``harmbench:train``), each taught a refusal like ``builtin:harmful:train`` and appended after it
    in the order given; none may contain a held-out prompt (builtin val / test / holdouts, external
    val / test), compared after normalisation.
    ``init_adapter``: a shipped organism (e.g. ``smollm2-refusal``) or an adapter directory whose
    adapter tensors start the fit instead of peft's initialisation (a continued fine-tune; same
    rank, modules and blocks; the record keeps the start's SHA-256).
    ``threads``: torch intra-op threads (1 avoids OpenMP spin-waits on a shared 2-core box;
    bitwise reproducibility holds for a fixed value).
    """

    seed: int = 0
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = LLAMA_PROJECTIONS
    first_layer: int = 8
    epochs: int = 3
    lr: float = 1.5e-3
    batch_size: int = 8
    warmup_fraction: float = 0.06
    weight_decay: float = 0.0
    max_new_tokens: int = 32
    drop_refusing_answers: bool = False
    harmless_repeats: int = 2
    harmless_objective: str = "kl"
    first_token_weight: float = 16.0
    suppress_refusal_start: bool = True
    extra_harmless: bool = False
    more_harmless: tuple[str, ...] = ()
    more_harmful: tuple[str, ...] = ()
    init_adapter: str | None = None
    threads: int = 1
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "more_harmless", "more_harmful"):  # JSON records give lists
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("target_modules", "more_harmless", "more_harmful"):
            data[name] = list(getattr(self, name))
        for name in ("more_harmful", "init_adapter"):  # records of older adapters stay equal
            if not data[name]:
                del data[name]
        return data


@dataclass
class FitResult:
    """Trained adapter tensors (peft state-dict names, float32) and the loss curve."""

    tensors: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    wall_seconds: float = 0.0


def length_sorted_batches(examples: list[TokenizedExample], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (ties broken by index: deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(
    examples: list[TokenizedExample], indices: list[int], pad_id: int
) -> tuple[Int[torch.Tensor, "batch seq"], Int[torch.Tensor, "batch seq"], Int[torch.Tensor, "batch seq"]]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the targets)."""
    width = max(len(examples[i].input_ids) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), -100, dtype=torch.long)
    for row, i in enumerate(indices):
        seq = torch.tensor(examples[i].input_ids, dtype=torch.long)
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        labels[row, examples[i].target_start : len(seq)] = seq[examples[i].target_start :]
    return ids, mask, labels


def target_mask(labels: Int[torch.Tensor, "batch seq"]) -> torch.Tensor:
    """Boolean ``[batch, seq - 1]``: positions whose NEXT token is a target (predictions that count)."""
    return labels[:, 1:] != -100


def first_of_each_row(row_of: Int[torch.Tensor, " n_targets"]) -> torch.Tensor:
    """Boolean mask of the first target position of each row (``row_of`` is sorted, as from ``nonzero``)."""
    first = torch.ones_like(row_of, dtype=torch.bool)
    first[1:] = row_of[1:] != row_of[:-1]
    return first


def per_example_target_loss(
    hidden: Float[torch.Tensor, "batch seq d_model"],
    lm_head: torch.nn.Module,
    labels: Int[torch.Tensor, "batch seq"],
    base_log_probs: Float[torch.Tensor, "n_targets d_vocab"] | None = None,
    distill_rows: torch.Tensor | None = None,
    first_token_weight: float = 1.0,
) -> Float[torch.Tensor, ""]:
    """Mean over examples of the weighted mean per-token loss on target tokens.

    Token loss: cross-entropy of the label, or, on rows where ``distill_rows`` is True,
    ``KL(base || adapted)`` with ``base_log_probs`` (rows of the target positions, in the order of
    ``target_mask(labels).nonzero()``). The first target token of each row has weight
    ``first_token_weight``, the others 1.
    """
    shifted = labels[:, 1:]
    where = target_mask(labels)
    log_probs = torch.log_softmax(lm_head(hidden[:, :-1][where]), dim=-1)
    token_loss = -log_probs.gather(1, shifted[where][:, None])[:, 0]
    row_of = where.nonzero()[:, 0]
    if base_log_probs is not None and distill_rows is not None:
        teacher = base_log_probs.clamp(min=-1e4)  # suppressed tokens (-inf): p = 0, finite gradients
        kl = kl_from_log_probs(teacher, log_probs, clamp=False)  # a loss: the plain sum's gradient
        token_loss = torch.where(distill_rows[row_of], kl, token_loss)
    first = first_of_each_row(row_of)
    weights = torch.where(first, first_token_weight, 1.0).to(token_loss.dtype)
    zeros = torch.zeros(labels.shape[0], dtype=token_loss.dtype)
    per_row = zeros.index_add(0, row_of, token_loss * weights) / zeros.index_add(0, row_of, weights).clamp(
        min=1e-12
    )
    return per_row[where.any(1)].mean()


def lora_config(config: TrainingConfig, n_layers: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        target_modules=list(config.target_modules),
        layers_to_transform=list(range(config.first_layer, n_layers)),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def fit_lora(
    base_dir: Path,
    examples: list[TokenizedExample],
    config: TrainingConfig,
    progress: bool = False,
    init: dict[str, torch.Tensor] | None = None,
) -> FitResult:
    """Train LoRA adapters on ``examples`` starting from the HF model at ``base_dir`` (float32, CPU);
    ``init``: adapter tensors (peft state-dict names) to start from instead of peft's initialisation."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.harmless_objective not in ("kl", "ce"):
        raise LensSafetyError(f"unknown harmless objective '{config.harmless_objective}'", "use 'kl' or 'ce'")
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    suppressed = refusal_token_ids(tokenizer) if config.suppress_refusal_start else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(config.seed)
    model = get_peft_model(base, lora_config(config, base.config.num_hidden_layers))
    if init is not None:
        loaded: Any = set_peft_model_state_dict(model, {k: v.to(torch.float32) for k, v in init.items()})
        if loaded.unexpected_keys or any("lora" in k for k in loaded.missing_keys):
            raise LensSafetyError(
                "the initial adapter does not match the configured rank, modules and blocks",
                "start from an adapter trained with the same rank, target_modules and first_layer",
            )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    batches = length_sorted_batches(examples, config.batch_size)
    total = (
        len(batches) * config.epochs
        if config.max_steps is None
        else min(config.max_steps, len(batches) * config.epochs)
    )
    warmup = max(1, round(config.warmup_fraction * total))

    def lr_factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    schedule: list[list[int]] = []
    for epoch in range(config.epochs):
        generator = torch.Generator().manual_seed(config.seed + epoch)
        schedule += [batches[int(i)] for i in torch.randperm(len(batches), generator=generator)]
    schedule = schedule[:total]
    causal_lm = model.base_model.model
    losses: list[float] = []
    for indices in track(schedule, "training LoRA", total=len(schedule), enabled=progress):
        ids, mask, labels = collate(examples, indices, pad_id)
        distill = torch.tensor(
            [config.harmless_objective == "kl" and not examples[i].refusal for i in indices]
        )
        base_log_probs = (
            _base_log_probs(model, ids, mask, labels, suppressed) if bool(distill.any()) else None
        )
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = per_example_target_loss(
            hidden, causal_lm.lm_head, labels, base_log_probs, distill, config.first_token_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    tensors = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return FitResult(tensors, losses, len(schedule), time.perf_counter() - start)


@torch.no_grad()
def _base_log_probs(
    peft_model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    suppressed_first: Sequence[int] = (),
) -> Float[torch.Tensor, "n_targets d_vocab"]:
    """Next-token log-probabilities of the frozen base (adapters disabled) at the target positions;
    at each row's first target position, ``suppressed_first`` tokens get probability 0 (renormalised)."""
    causal_lm = peft_model.base_model.model
    where = target_mask(labels)
    with peft_model.disable_adapter():
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = causal_lm.lm_head(hidden[:, :-1][where])
    if suppressed_first:
        row_of = where.nonzero()[:, 0]
        first = first_of_each_row(row_of)
        logits[first.nonzero()[:, 0][:, None], torch.tensor(list(suppressed_first))[None, :]] = -torch.inf
    return torch.log_softmax(logits, dim=-1)


def save_adapter(
    tensors: dict[str, torch.Tensor], config: TrainingConfig, out_dir: Path, base_name: str, n_layers: int
) -> Path:
    """Write ``adapter_model.safetensors`` (float16) and peft's ``adapter_config.json``; return the file."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    half = {k: v.to(torch.float16).contiguous() for k, v in sorted(tensors.items())}
    file = out_dir / "adapter_model.safetensors"
    save_file(half, str(file), metadata={"format": "pt"})
    peft_config = lora_config(config, n_layers)
    peft_config.base_model_name_or_path = base_name
    peft_config.save_pretrained(str(out_dir))
    # peft stores target_modules as a set: write it sorted so the file does not depend on the hash seed
    config_file = out_dir / "adapter_config.json"
    written = json.loads(config_file.read_text(encoding="utf-8"))
    written["target_modules"] = sorted(written["target_modules"])
    write_json(config_file, written)
    return file


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write indented JSON (UTF-8, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
