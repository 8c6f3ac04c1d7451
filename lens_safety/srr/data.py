"""SRR candidate lists and their hidden-state features, built once and cached on disk.

:func:`build_dataset` samples ``n`` candidates per instruction (seeded, temperature option),
deduplicates them (whitespace-normalised exact text), optionally wraps a deterministic fraction of
the HARMFUL instructions in a jailbreak template (to obtain unsafe candidates from a model that
mostly refuses), labels every candidate (:mod:`lens_safety.srr.labels`) and reads the features
(:mod:`lens_safety.srr.features`, one batched pass per list and context).

All lists are stored, with ``mixed`` marking those with at least one positive and one negative;
training and evaluation use the mixed lists (:meth:`SRRDataset.mixed`). On disk a dataset is a
directory: ``lists.jsonl`` (one list per line), ``features.safetensors`` (``instruction``
``[n_lists, n_layers, d_model]``, ``response.<context>`` ``[n_candidates, n_layers, d_model]``,
``offsets`` ``[n_lists + 1]``; float32, raw HF basis) and ``meta.json`` (model identity,
settings, counts). Nothing is pickled; a directory is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.judges import Judge, get_judge
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.prompts import PromptSet, builtin_path
from lens_safety.srr.capture import SampledStates, sample_with_states
from lens_safety.srr.features import (
    CONTEXTS,
    POST_HOC_CONTEXTS,
    SAMPLED_CONTEXTS,
    check_context,
    check_layers,
    list_features,
)
from lens_safety.srr.labels import label_candidates

LISTS_FILE = "lists.jsonl"
FEATURES_FILE = "features.safetensors"
META_FILE = "meta.json"


@dataclass
class CandidateList:
    """One instruction and its deduplicated candidate responses.

    Attributes:
        instruction: the prompt given to the model (jailbreak-wrapped when ``jailbreak`` is set).
        source_instruction: the instruction before wrapping.
        kind: ``harmful`` or ``harmless``.
        category: harm category (surface topic for harmless prompts), when known.
        jailbreak: id of the template that wrapped the instruction, else ``None``.
        candidates: unique responses in sampling order.
        positive: per candidate, safe (harmful lists) / helpful and non-degenerate (harmless lists).
        reasons: per candidate, why (``refusal``, ``compliance``, ``helpful``, ``degenerate``).
        n_sampled: responses sampled before deduplication.
    """

    instruction: str
    source_instruction: str
    kind: str
    category: str | None
    jailbreak: str | None
    candidates: list[str]
    positive: list[bool]
    reasons: list[str] = field(default_factory=list)
    n_sampled: int = 0

    @property
    def mixed(self) -> bool:
        """At least one positive and one negative: usable for training and ranking metrics."""
        return any(self.positive) and not all(self.positive)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mixed": self.mixed}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> CandidateList:
        keys = (
            "instruction",
            "source_instruction",
            "kind",
            "category",
            "jailbreak",
            "candidates",
            "positive",
            "reasons",
            "n_sampled",
        )
        return cls(**{k: record[k] for k in keys if k in record})


def first_occurrences(texts: Sequence[str]) -> list[int]:
    """Indices of the unique texts in first-seen order (compared after collapsing whitespace)."""
    seen: set[str] = set()
    out: list[int] = []
    for index, text in enumerate(texts):
        key = re.sub(r"\s+", " ", text).strip()
        if key not in seen:
            seen.add(key)
            out.append(index)
    return out


def deduplicate(texts: Sequence[str]) -> list[str]:
    """Unique texts in first-seen order (compared after collapsing whitespace)."""
    return [texts[i] for i in first_occurrences(texts)]


def load_jailbreaks() -> list[dict[str, str]]:
    """The built-in jailbreak templates (``{"id", "name", "template"}`` with one ``{prompt}`` slot)."""
    lines = builtin_path("jailbreaks.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _unit_hash(*parts: object) -> float:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def wrap_harmful(prompts: PromptSet, fraction: float, seed: int) -> list[tuple[str, str | None]]:
    """``(prompt, template id)`` per instruction: a deterministic ``fraction`` are jailbreak-wrapped."""
    if not 0.0 <= fraction <= 1.0:
        raise LensSafetyError(
            f"jailbreak fraction {fraction} is outside [0, 1]", "pass a fraction such as 0.5"
        )
    templates = load_jailbreaks()
    out: list[tuple[str, str | None]] = []
    for text in prompts.prompts:
        if _unit_hash("wrap", seed, text) < fraction:
            template = templates[int(_unit_hash("template", seed, text) * len(templates))]
            out.append((template["template"].format(prompt=text), template["id"]))
        else:
            out.append((text, None))
    return out


@dataclass
class SRRDataset:
    """Candidate lists with their features (float32, raw HF basis; see the module docstring)."""

    lists: list[CandidateList]
    layers: tuple[int, ...]
    instruction: Float[torch.Tensor, "n_lists n_layers d_model"]
    responses: dict[str, Float[torch.Tensor, "n_candidates n_layers d_model"]]
    offsets: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lists)

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise LensSafetyError(
                f"layer {layer} has no stored features",
                f"use one of {list(self.layers)} or rebuild with --layers",
            )
        return self.layers.index(layer)

    def instruction_features(self, layer: int) -> Float[torch.Tensor, "n_lists d_model"]:
        return self.instruction[:, self._layer_index(layer)]

    def response_features(self, index: int, layer: int, context: str) -> Float[torch.Tensor, "m d_model"]:
        check_context(context)
        if context not in self.responses:
            raise LensSafetyError(
                f"context '{context}' was not stored", f"use one of {sorted(self.responses)}"
            )
        return self.responses[context][
            self.offsets[index] : self.offsets[index + 1], self._layer_index(layer)
        ]

    def subset(self, indices: Sequence[int]) -> SRRDataset:
        """The lists at ``indices`` (features sliced accordingly)."""
        idx = list(indices)
        spans = [torch.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]
        flat = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        offsets = [0]
        for span in spans:
            offsets.append(offsets[-1] + len(span))
        return SRRDataset(
            [self.lists[i] for i in idx],
            self.layers,
            self.instruction[idx],
            {k: v[flat] for k, v in self.responses.items()},
            offsets,
            dict(self.meta),
        )

    def mixed(self) -> SRRDataset:
        """Only the lists with at least one positive and one negative."""
        return self.subset([i for i, x in enumerate(self.lists) if x.mixed])

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in ("harmful", "harmless"):
            of_kind = [x for x in self.lists if x.kind == kind]
            out[f"n_lists_{kind}"] = len(of_kind)
            out[f"n_mixed_{kind}"] = sum(x.mixed for x in of_kind)
            out[f"n_all_positive_{kind}"] = sum(all(x.positive) for x in of_kind)
            out[f"n_all_negative_{kind}"] = sum(not any(x.positive) for x in of_kind)
            out[f"n_candidates_{kind}"] = sum(len(x.candidates) for x in of_kind)
        return out

    # ------------------------------------------------------------------ disk
    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the dataset directory atomically (refuses an existing one unless ``overwrite``)."""
        target = Path(out_dir)
        if target.exists() and not overwrite:
            raise LensSafetyError(f"{target} already exists", "pass --overwrite or choose another --out")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            with open(tmp / LISTS_FILE, "w", encoding="utf-8") as handle:
                for item in self.lists:
                    handle.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
            tensors = {
                "instruction": self.instruction.contiguous(),
                "offsets": torch.tensor(self.offsets, dtype=torch.long),
            }
            tensors.update({f"response.{k}": v.contiguous() for k, v in self.responses.items()})
            save_file(tensors, str(tmp / FEATURES_FILE))
            meta = {
                **self.meta,
                "layers": list(self.layers),
                "contexts": sorted(self.responses),
                "counts": self.counts(),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | Path) -> SRRDataset:
        path = Path(directory)
        if not (path / LISTS_FILE).is_file() or not (path / FEATURES_FILE).is_file():
            raise LensSafetyError(
                f"{path} is not an SRR data directory", "build one with `lens-safety srr build-data`"
            )
        meta = json.loads((path / META_FILE).read_text())
        records = [
            json.loads(x) for x in (path / LISTS_FILE).read_text(encoding="utf-8").splitlines() if x.strip()
        ]
        tensors = load_file(str(path / FEATURES_FILE))
        responses = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("response.")}
        offsets = [int(x) for x in tensors["offsets"].tolist()]
        return cls(
            [CandidateList.from_dict(r) for r in records],
            tuple(meta["layers"]),
            tensors["instruction"],
            responses,
            offsets,
            meta,
        )


def default_layers(model: ChatModel, ranker_layer: int | None = None) -> tuple[int, ...]:
    """Every third layer, the final (pre-norm) residual stream and the default ranker layer."""
    layers = set(range(0, model.n_layers + 1, 3)) | {model.n_layers, default_ranker_layer(model)}
    if ranker_layer is not None:
        layers.add(ranker_layer)
    return tuple(sorted(layers))


def default_ranker_layer(model: ChatModel) -> int:
    """The paper's region: within the lower 25% of layers (``floor(0.2 * n_layers)``)."""
    return max(1, int(0.2 * model.n_layers))


def _sample(
    model: ChatModel,
    prompts: list[str],
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    progress: bool,
    capture_layers: Sequence[int] | None = None,
    pooled: bool = False,
) -> tuple[list[list[str]], SampledStates | None]:
    """Completions grouped by prompt, and their ``generated`` (and with ``pooled``
    ``generated_mean``) features when ``capture_layers``."""
    if n < 2:
        raise LensSafetyError(
            f"n = {n} candidates cannot be ranked", "sample at least 2 candidates per instruction (--n)"
        )
    sampled = sample_with_states(
        model,
        prompts,
        n=n,
        layers=capture_layers or (),
        max_new_tokens=max_new_tokens,
        batch_size=max(1, 64 // n),
        temperature=temperature,
        seed=seed,
        progress=progress,
        pooled=pooled,
    )
    return sampled.generations.grouped(), sampled if capture_layers else None


def build_dataset(
    model: ChatModel,
    harmful: PromptSet | Sequence[str] | str,
    harmless: PromptSet | Sequence[str] | str,
    *,
    n: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    jailbreak_fraction: float = 0.5,
    judge: Judge | str | None = None,
    layers: Sequence[int] | None = None,
    contexts: Sequence[str] = CONTEXTS,
    progress: bool = False,
) -> SRRDataset:
    """Sample, deduplicate, label and featurise candidate lists for harmful and harmless instructions.

    Args:
        model: the frozen model that generates AND encodes the candidates.
        harmful, harmless: instructions (PromptSet, list, file path or ``builtin:…`` spec).
        n: candidates sampled per instruction (before deduplication).
        temperature: sampling temperature (whole vocabulary, no top-k / top-p).
        max_new_tokens: length cap of a candidate.
        seed: seeds sampling and the choice of jailbreak-wrapped instructions.
        jailbreak_fraction: fraction of harmful instructions wrapped in a jailbreak template.
        judge: refusal judge (default: the substring judge).
        layers: feature layers (default :func:`default_layers`).
        contexts: response encodings to store (``with_instruction``, ``response_only``,
            ``generated`` / ``generated_mean``: read while sampling, see
            :mod:`lens_safety.srr.capture`).
    """
    started = time.perf_counter()
    judge_obj = get_judge(judge)
    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    layer_ids = check_layers(model, layers if layers is not None else default_layers(model))
    for context in contexts:
        check_context(context)
    wrapped = wrap_harmful(harmful_set, jailbreak_fraction, seed)
    specs: list[tuple[str, str, str, str | None, str | None]] = [
        (p, src, "harmful", cat, jb)
        for (p, jb), src, cat in zip(
            wrapped, harmful_set.prompts, harmful_set.categories or [None] * len(harmful_set), strict=True
        )
    ]
    specs += [
        (p, p, "harmless", cat, None)
        for p, cat in zip(
            harmless_set.prompts, harmless_set.categories or [None] * len(harmless_set), strict=True
        )
    ]
    if not specs:
        raise LensSafetyError("no instructions to build lists from", "pass harmful and/or harmless prompts")
    capture = layer_ids if set(contexts) & set(SAMPLED_CONTEXTS) else None
    post_hoc = [c for c in contexts if c in POST_HOC_CONTEXTS]
    samples, sampled = _sample(
        model,
        [s[0] for s in specs],
        n,
        temperature,
        max_new_tokens,
        seed,
        progress,
        capture,
        pooled="generated_mean" in contexts,
    )
    generation_seconds = time.perf_counter() - started
    lists: list[CandidateList] = []
    inst_rows: list[torch.Tensor] = []
    resp_rows: dict[str, list[torch.Tensor]] = {c: [] for c in contexts}
    offsets = [0]
    for i, ((prompt, source, kind, category, jb), drawn) in enumerate(
        track(list(zip(specs, samples, strict=True)), "reading features", len(specs), progress)
    ):
        keep = first_occurrences(drawn)
        candidates = [drawn[j] for j in keep]
        positive, reasons = label_candidates(judge_obj, kind, prompt, candidates)
        lists.append(
            CandidateList(prompt, source, kind, category, jb, candidates, positive, reasons, len(drawn))
        )
        h_resp: dict[str, torch.Tensor] = {}
        if post_hoc:
            h_inst, h_resp = list_features(model, prompt, candidates, layer_ids, post_hoc)
        if sampled is not None:
            rows = [i * n + j for j in keep]
            h_resp.update({c: sampled.response_states(c)[rows] for c in SAMPLED_CONTEXTS if c in contexts})
            h_inst = h_inst if post_hoc else sampled.instruction[i]
        inst_rows.append(h_inst)
        for context in contexts:
            resp_rows[context].append(h_resp[context])
        offsets.append(offsets[-1] + len(candidates))
    meta = {
        "model": model.identity(),
        "settings": {
            "n": n,
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "jailbreak_fraction": jailbreak_fraction,
            "judge": judge_obj.name,
        },
        "prompts": {"harmful": harmful_set.metadata(), "harmless": harmless_set.metadata()},
        "space": "raw_hf",
        "feature_layers_note": f"0..{model.n_layers - 1} = hook_resid_pre; {model.n_layers} = final resid_post (pre-norm)",
        "generation_seconds": generation_seconds,
        "total_seconds": time.perf_counter() - started,
    }
    return SRRDataset(
        lists,
        layer_ids,
        torch.stack(inst_rows),
        {c: torch.cat(v) for c, v in resp_rows.items()},
        offsets,
        meta,
    )
