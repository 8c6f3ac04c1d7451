"""Seeded LoRA fine-tuning of a causal LM on (prompt, target) examples, on CPU.

``fit_lora`` trains low-rank adapters ``Delta W = (alpha / r) B A`` (``A: [r, d_in]``,
``B: [d_out, r]``, peft's initialisation: ``A`` Kaiming-uniform, ``B = 0``) on the chosen
projections. Loss: per-example mean cross-entropy over the target tokens only, averaged over the
batch. The unembedding is applied only at target positions (saves most of the vocab projection).
AdamW, linear warm-up then linear decay, gradient clipping at 1.

Determinism: ``torch.manual_seed(seed)`` before the adapters are created, a fixed number of threads,
length-sorted batches whose order is shuffled per epoch by a generator seeded with ``seed + epoch``,
no dropout. Two runs with the same inputs, torch build and thread count give bitwise equal adapters.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int

from lens_safety.organism.data import TokenizedExample
from lens_safety.progress import track

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
    harmless_repeats: int = 1
    threads: int = 1
    max_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
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


def per_example_target_loss(
    hidden: Float[torch.Tensor, "batch seq d_model"],
    lm_head: torch.nn.Module,
    labels: Int[torch.Tensor, "batch seq"],
) -> Float[torch.Tensor, ""]:
    """Mean over examples of the mean next-token CE on target tokens (logits only where needed)."""
    shifted = labels[:, 1:]
    where = shifted != -100
    logits = lm_head(hidden[:, :-1][where])
    token_loss = torch.nn.functional.cross_entropy(logits, shifted[where], reduction="none")
    row_of = where.nonzero()[:, 0]
    counts = where.sum(1).clamp(min=1).to(token_loss.dtype)
    per_row = torch.zeros(labels.shape[0], dtype=token_loss.dtype).index_add_(0, row_of, token_loss) / counts
    return per_row[where.any(1)].mean()


def lora_config(config: TrainingConfig, n_layers: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        layers_to_transform=list(range(config.first_layer, n_layers)),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def fit_lora(
    base_dir: Path, examples: list[TokenizedExample], config: TrainingConfig, progress: bool = False
) -> FitResult:
    """Train LoRA adapters on ``examples`` starting from the HF model at ``base_dir`` (float32, CPU)."""
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(config.seed)
    model = get_peft_model(base, lora_config(config, base.config.num_hidden_layers))
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
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = per_example_target_loss(hidden, causal_lm.lm_head, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    tensors = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return FitResult(tensors, losses, len(schedule), time.perf_counter() - start)


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
    return file


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write indented JSON (UTF-8, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
