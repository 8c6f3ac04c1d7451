"""The SRR ranker: a small listwise Transformer over hidden-state features.

Maths (SRR, arXiv 2505.15710):

* standardise every input feature with the training set's per-dimension mean and std (a choice
  the paper does not state; hidden states have a few huge dimensions, and this is recorded in the
  config as ``standardize``);
* shared projection ``z = W x + b`` to ``width`` (optionally plus a learned role embedding that
  tells the instruction from the responses: ``role_embedding``, off by default as in the paper);
* ONE Transformer encoder layer over ``[z_inst, z_resp_1 .. z_resp_m]`` (no positional encoding:
  permuting the candidates permutes the scores), padded candidates masked out;
* score ``s_i = cos(o_inst, o_resp_i) / tau``; ``p = softmax(s)`` over the list;
* loss ``KL(p* || p)`` with ``p*`` uniform over the positives;
* optionally an ensemble (``members = K``, our addition): K copies trained independently (seeds
  ``seed .. seed + K - 1``, each with its own early-stopping split), scores averaged,
  ``s_i = (1/K) sum_k s_i^(k)``.

Inputs are raw-HF-basis residual states (``lens_safety.srr.features``) or, for the text-only
baseline, hashed n-gram counts of the same width. A ranker is saved as ``ranker.safetensors`` +
``ranker.json`` (config, base model identity and weights hash, layer, context); loading it against a
different model raises :class:`~lens_safety.errors.LensSafetyError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from safetensors.torch import load_file, save_file
from torch import nn

from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel
from lens_safety.records import Record

WEIGHTS_FILE = "ranker.safetensors"
CONFIG_FILE = "ranker.json"
MAX_PARAMETERS = 5_000_000


@dataclass
class RankerConfig(Record):
    """Shape and hyper-parameters of a :class:`SafetyRanker`.

    Attributes:
        d_input: feature width (the model's ``d_model``, or the hashed text width).
        width: projection width (the encoder's ``d_model``).
        n_heads: attention heads of the encoder layer.
        ff_width: feed-forward width of the encoder layer.
        dropout: dropout inside the encoder layer (paper: 0.1).
        tau: softmax temperature of the cosine scores.
        standardize: standardise inputs with stored training mean / std.
        role_embedding: add a learned instruction / response embedding after the projection.
        features: ``hidden`` (residual states) or ``text`` (hashed n-grams, no hidden states).
        layer: feature layer (``None`` for text features).
        context: response encoding (``with_instruction`` / ``response_only`` / ``generated`` /
            ``generated_mean``).
        members: number of independently trained copies whose scores are averaged (1: the paper).
    """

    d_input: int
    width: int = 256
    n_heads: int = 4
    ff_width: int = 512
    dropout: float = 0.1
    tau: float = 0.1
    standardize: bool = True
    role_embedding: bool = False
    features: str = "hidden"
    layer: int | None = None
    context: str = "with_instruction"
    members: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class RankerMember(nn.Module):
    """One listwise scorer: standardisation, projection, one encoder layer, cosine scores."""

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        self.config = config
        self.projection = nn.Linear(config.d_input, config.width)
        self.encoder = nn.TransformerEncoderLayer(
            config.width, config.n_heads, config.ff_width, config.dropout, batch_first=True, norm_first=True
        )
        self.roles = nn.Parameter(torch.zeros(2, config.width)) if config.role_embedding else None
        self.register_buffer("feature_mean", torch.zeros(config.d_input))
        self.register_buffer("feature_std", torch.ones(config.d_input))

    def set_standardization(self, features: Float[torch.Tensor, "n d_input"]) -> None:
        """Store per-dimension mean and std (float64 reduction, std floored at 1e-6) of training features."""
        data = features.double()
        self._buffer("feature_mean").copy_(data.mean(0).float())
        self._buffer("feature_std").copy_(data.std(0, unbiased=False).clamp_min(1e-6).float())

    def _buffer(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        assert isinstance(value, torch.Tensor)
        return value

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.standardize:
            x = (x - self._buffer("feature_mean")) / self._buffer("feature_std")
        return self.projection(x)

    def forward(
        self,
        instruction: Float[torch.Tensor, "batch d_input"],
        responses: Float[torch.Tensor, "batch m d_input"],
        valid: Bool[torch.Tensor, "batch m"],
    ) -> Float[torch.Tensor, "batch m"]:
        batch, m, _ = responses.shape
        tokens = torch.cat([self._prepare(instruction).unsqueeze(1), self._prepare(responses)], dim=1)
        if self.roles is not None:
            role = torch.ones(m + 1, dtype=torch.long, device=tokens.device)
            role[0] = 0
            tokens = tokens + self.roles[role]
        pad = torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=valid.device), ~valid], dim=1)
        out = self.encoder(tokens, src_key_padding_mask=pad)
        return F.cosine_similarity(out[:, :1], out[:, 1:], dim=-1) / self.config.tau


class SafetyRanker(nn.Module):
    """Listwise ranker: the mean score of ``config.members`` :class:`RankerMember` (module docstring)."""

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        if config.width % config.n_heads:
            raise LensSafetyError(
                f"width {config.width} is not divisible by {config.n_heads} heads",
                "choose a width that is a multiple of n_heads",
            )
        if config.members < 1:
            raise LensSafetyError(
                f"an ensemble needs >= 1 member, got {config.members}", "pass --members 1 or more"
            )
        self.config = config
        #: identity of the model whose hidden states this ranker reads (``ChatModel.identity()``)
        self.base_model: dict[str, Any] | None = None
        self.members = nn.ModuleList([RankerMember(config) for _ in range(config.members)])
        n = self.n_parameters()
        if n > MAX_PARAMETERS:
            raise LensSafetyError(
                f"ranker has {n:,} parameters (limit {MAX_PARAMETERS:,})", "lower --width or --members"
            )

    @classmethod
    def from_members(cls, rankers: list[SafetyRanker]) -> SafetyRanker:
        """One ensemble ranker holding the (single-member) ``rankers``' weights, in order."""
        config = replace(rankers[0].config, members=sum(r.config.members for r in rankers))
        ensemble = cls(config)
        members = [m for r in rankers for m in r.members]
        for target, source in zip(ensemble.members, members, strict=True):
            target.load_state_dict(source.state_dict())
        ensemble.base_model = rankers[0].base_model
        return ensemble.eval()

    def n_parameters(self) -> int:
        """Trainable parameters (all members)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def set_standardization(self, features: Float[torch.Tensor, "n d_input"]) -> None:
        """Every member standardises with the mean and std of these training features."""
        for member in self.members:
            assert isinstance(member, RankerMember)
            member.set_standardization(features)

    def forward(
        self,
        instruction: Float[torch.Tensor, "batch d_input"],
        responses: Float[torch.Tensor, "batch m d_input"],
        valid: Bool[torch.Tensor, "batch m"] | None = None,
    ) -> Float[torch.Tensor, "batch m"]:
        """Scores ``cos(o_inst, o_resp_i) / tau`` (mean over members); padded candidates get ``-inf``."""
        batch, m, _ = responses.shape
        if valid is None:
            valid = torch.ones(batch, m, dtype=torch.bool, device=responses.device)
        scores = torch.stack([member(instruction, responses, valid) for member in self.members]).mean(0)
        return scores.masked_fill(~valid, float("-inf"))


def listwise_loss(
    scores: Float[torch.Tensor, "batch m"],
    positive: Bool[torch.Tensor, "batch m"],
    valid: Bool[torch.Tensor, "batch m"],
) -> Float[torch.Tensor, ""]:
    """Mean over lists of ``KL(p* || softmax(scores))``, ``p*`` uniform over the positives.

    ``KL = sum_{i in P} (1/k) (log(1/k) - log p_i)``; lists without positives are ignored.
    """
    log_p = torch.log_softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    target = (positive & valid).float()
    k = target.sum(-1)
    keep = k > 0
    target = target / k.clamp_min(1).unsqueeze(-1)
    safe_log_p = torch.where(target > 0, log_p, torch.zeros_like(log_p))
    kl = (target * (torch.log(target.clamp_min(1e-30)) - safe_log_p)).sum(-1)
    return kl[keep].mean() if bool(keep.any()) else scores.sum() * 0.0


def save_ranker(
    ranker: SafetyRanker,
    out_dir: str | Path,
    base_model: dict[str, Any] | None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``ranker.safetensors`` and ``ranker.json`` (config, base model identity, ``info``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ranker.state_dict().items()}, str(out / WEIGHTS_FILE))
    record = {
        "config": ranker.config.to_dict(),
        "base_model": base_model,
        "n_parameters": ranker.n_parameters(),
        **(info or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return out


def read_ranker_record(directory: str | Path) -> dict[str, Any]:
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise LensSafetyError(
            f"{path} holds no SRR ranker ({CONFIG_FILE} + {WEIGHTS_FILE})",
            "train one with `lens-safety srr train`",
        )
    return dict(json.loads((path / CONFIG_FILE).read_text()))


def load_ranker(directory: str | Path, model: ChatModel | None = None) -> SafetyRanker:
    """Load a saved ranker; with ``model`` given, refuse one trained on another base model.

    The check compares the base model's weights SHA-256 and width recorded at training time with
    ``model.identity()``.
    """
    record = read_ranker_record(directory)
    if model is not None:
        check_base_model(record.get("base_model"), model.identity(), Path(directory))
    config = RankerConfig(**record["config"])
    ranker = SafetyRanker(config)
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    if not any(k.startswith("members.") for k in state):  # saved before ensembles: one member
        state = {f"members.0.{k}": v for k, v in state.items()}
    ranker.load_state_dict(state)
    ranker.base_model = record.get("base_model")
    ranker.eval()
    return ranker


def check_base_model(recorded: dict[str, Any] | None, current: dict[str, Any], where: Path) -> None:
    """Raise unless the recorded base model (hash and width) is ``current``."""
    if not recorded:
        raise LensSafetyError(
            f"ranker {where} records no base model", "retrain it with `lens-safety srr train`"
        )
    for key in ("weights_sha256", "d_model"):
        if recorded.get(key) != current.get(key):
            raise LensSafetyError(
                f"ranker {where} was trained on {recorded.get('spec')} ({key} {str(recorded.get(key))[:12]}), "
                f"not on {current.get('spec')} ({str(current.get(key))[:12]})",
                "load the ranker's base model or train a ranker for this one",
            )
