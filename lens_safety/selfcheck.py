"""Run-time self-check: greedy generation through the bridge equals vanilla transformers.

Every number that depends on generation (refusal, over-refusal, calibration, SRR candidates) is
only as good as the decoding behind it, and an upstream release can break decoding silently (the
KV cache of :mod:`lens_safety.bridge_cache`). :func:`check_generation` is a fast guard run by every
long job before it starts: two short instructions of different lengths are decoded greedily by
:func:`lens_safety.evaluation.generate` (one left-padded batch, the KV cache, the bridge's hooks)
and by a reference, one prompt at a time without padding, and the new token ids must be equal. The
batch is decoded twice, plainly and with its shared chat-template prefix computed once
(``share_prefix=True``, what calibration and evaluation use): rows 3 and 4 of the comparison are
the second decode of prompts 1 and 2.

The reference is chosen by ``reference``:

* ``"vanilla"``: a plain ``AutoModelForCausalLM`` loaded from the model's own Hugging Face
  directory, same dtype and device: the strongest check, at the cost of a second copy of the weights;
* ``"uncached"``: the bridge's model itself, decoding greedily with a full forward pass per token
  and no KV cache (argmax of the last position's logits, until EOS): no extra memory; it
  catches cache, padding and position errors but not a bridge forward that differs from HF;
* ``"auto"`` (default): ``vanilla`` when the weights are at most :data:`VANILLA_MAX_BYTES` and
  the weights are unprocessed, else ``uncached``.

Where the two first differ, the difference is accepted as a *numerical tie* only if the bridge's
own next-token logits (full forward, no cache, float64 comparison) at that prefix rate the two
tokens within :data:`TIE_TOLERANCE` of each other: batched and one-at-a-time decoding round
differently, which matters in half precision. Broken decoding differs by many logits. Any other
mismatch raises :class:`~lens_safety.errors.LensSafetyError` (one ``error:`` line naming the
installed versions and the fix). Set ``LENS_SAFETY_SKIP_SELFCHECK=1`` to skip it knowingly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch

from lens_safety.architecture import clean_hf_name
from lens_safety.checkpoint_files import weight_files
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import completion_length, end_of_sequence_ids, generate
from lens_safety.fsutil import write_file_atomic
from lens_safety.models import ChatModel
from lens_safety.placement import placement_kwargs, read_parameter
from lens_safety.sources import cache_dir

#: the two instructions of the check (different lengths, so the batch is left-padded)
CHECK_PROMPTS = ("Name a colour.", "Write one short sentence about the sea and the sky at dawn.")
CHECK_NEW_TOKENS = 8
#: largest checkpoint (bytes of weight files) for which ``auto`` loads a vanilla reference copy
VANILLA_MAX_BYTES = 2 * 1024**3
#: packages whose versions decide generation
VERSION_PACKAGES = ("torch", "transformers", "transformer-lens", "peft", "accelerate", "tokenizers")
SKIP_ENV = "LENS_SAFETY_SKIP_SELFCHECK"
#: largest logit gap between the two tokens at a first difference that counts as a numerical tie
TIE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.25}

Reference = Literal["auto", "vanilla", "uncached"]


def installed_versions() -> dict[str, str]:
    """Installed versions of the packages that decide generation (``"not installed"`` if absent)."""
    versions = {}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class GenerationCheck:
    """Outcome of :func:`check_generation`: the reference used and the token ids compared."""

    reference: str
    prompts: tuple[str, ...]
    tokens: list[list[int]]
    expected: list[list[int]]
    versions: dict[str, str]
    ties: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Equal token ids, or a first difference that is a numerical tie (see module docstring)."""
        return all(
            a == b or i in self.ties for i, (a, b) in enumerate(zip(self.tokens, self.expected, strict=True))
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _vanilla_reference(model: ChatModel, rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    placement = placement_kwargs(model.hf_model)
    vanilla: Any = AutoModelForCausalLM.from_pretrained(str(model.hf_path), dtype=model.dtype, **placement)
    if not placement:
        vanilla.to(model.device)
    vanilla.eval()
    out = []
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor([row], device=model.device)
            new = vanilla.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=CHECK_NEW_TOKENS,
                do_sample=False,
                temperature=None,
                top_k=None,
                top_p=None,
                pad_token_id=int(model.tokenizer.pad_token_id),
            )[0, ids.shape[1] :].tolist()
            out.append(new[: completion_length(new, eos)[0]])
    del vanilla
    return out


def _uncached_reference(model: ChatModel, rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for row in rows:
            ids = list(row)
            new: list[int] = []
            for _ in range(CHECK_NEW_TOKENS):
                tensor = torch.tensor([ids], device=model.device)
                logits = model.hf_model(input_ids=tensor, use_cache=False).logits[0, -1]
                token = int(torch.argmax(logits.double()))
                if token in eos:
                    break
                new.append(token)
                ids.append(token)
            out.append(new)
    return out


def _choose(model: ChatModel, reference: Reference) -> str:
    if reference != "auto":
        return reference
    size = sum(path.stat().st_size for path in weight_files(model.hf_path))
    return "vanilla" if size <= VANILLA_MAX_BYTES and not model.compatibility_mode else "uncached"


def _first_difference(got: list[int], want: list[int]) -> int:
    return next(
        (j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
    )


def logit_gap(model: ChatModel, prefix: list[int], a: int, b: int) -> float:
    """``|logit(a) - logit(b)|`` of the bridge's next token after ``prefix`` (no cache, float64)."""
    with torch.inference_mode():
        logits = model.hf_model(input_ids=torch.tensor([prefix], device=model.device), use_cache=False).logits
    row = logits[0, -1].double()
    return float((row[a] - row[b]).abs())


def _ties(model: ChatModel, rows: list[list[int]], got: list[list[int]], want: list[list[int]]) -> list[int]:
    tolerance = TIE_TOLERANCE.get(model.dtype, 1e-3)
    ties = []
    for i, (row, a, b) in enumerate(zip(rows, got, want, strict=True)):
        j = _first_difference(a, b)
        if a != b and j < min(len(a), len(b)) and logit_gap(model, row + b[:j], a[j], b[j]) <= tolerance:
            ties.append(i)
    return ties


def mismatch_message(check: GenerationCheck, tokenizer: Any) -> str:
    i = next(
        i
        for i, (a, b) in enumerate(zip(check.tokens, check.expected, strict=True))
        if a != b and i not in check.ties
    )
    got, want = check.tokens[i], check.expected[i]
    versions = ", ".join(f"{k} {v}" for k, v in check.versions.items())
    return (
        f"greedy generation through the TransformerBridge differs from the {check.reference} reference "
        f"(prompt {i + 1}, new token {_first_difference(got, want) + 1}: "
        f"{tokenizer.decode(got)!r} vs {tokenizer.decode(want)!r}); installed: {versions}"
    )


def check_generation(
    model: ChatModel, *, reference: Reference = "auto", raise_on_mismatch: bool = True
) -> GenerationCheck:
    """Compare batched greedy generation with a reference on two short prompts (see module docstring).

    Run it before any in-memory edit or intervention: the reference decodes the weights as loaded.
    """
    if reference not in ("auto", "vanilla", "uncached"):
        raise LensSafetyError(f"unknown self-check reference '{reference}'", "use auto, vanilla or uncached")
    chosen = _choose(model, reference)
    eos = end_of_sequence_ids(model)
    got = [
        generate(
            model,
            list(CHECK_PROMPTS),
            max_new_tokens=CHECK_NEW_TOKENS,
            batch_size=len(CHECK_PROMPTS),
            share_prefix=shared,
        ).token_ids
        for shared in (False, True)
    ]
    rows = [model.chat.token_ids(model.chat.format(p)) for p in CHECK_PROMPTS]
    make = _vanilla_reference if chosen == "vanilla" else _uncached_reference
    expected = make(model, rows, eos)
    tokens, expected, rows = got[0] + got[1], expected + expected, rows + rows
    ties = _ties(model, rows, tokens, expected)
    check = GenerationCheck(chosen, CHECK_PROMPTS * 2, tokens, expected, installed_versions(), ties)
    if raise_on_mismatch and not check.ok:
        raise LensSafetyError(
            mismatch_message(check, model.tokenizer),
            "install the tested versions with the README's command (pip install -c constraints.txt …) "
            "or run `lens-safety doctor` and report the versions",
        )
    return check


#: lens-safety modules whose code decides generation: part of the cache key of a passed check
_CODE = (
    "bridge_cache.py",
    "chat.py",
    "models.py",
    "activations.py",
    "selfcheck.py",
    "evaluation/generation.py",
)


def loaded_weights_sample(model: ChatModel) -> str:
    """SHA-256 of about 4096 evenly strided entries of every parameter as loaded in memory, so a
    model edited in place after loading does not match the record of its checkpoint (an offloaded
    parameter, read from the checkpoint at each call, is sampled as materialised)."""
    digest = hashlib.sha256()
    offloaded = {name for name, param in model.hf_model.named_parameters() if param.device.type == "meta"}
    with torch.no_grad():
        for name, param in model.hf_model.named_parameters():
            if name in offloaded:
                param = read_parameter(model.hf_model, clean_hf_name(name))
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float64)
            digest.update(name.encode() + sample.numpy().tobytes())
    return digest.hexdigest()


def check_key(model: ChatModel, reference: str) -> str:
    """SHA-256 of everything a check's outcome depends on: the checkpoint and a sample of the
    weights in memory, device and dtype, the installed versions, the interpreter and the
    lens-safety code that generates."""
    root = Path(__file__).parent
    code = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in _CODE}
    facts = {
        "weights": model.weights_hash,
        "loaded": loaded_weights_sample(model),
        "spec": model.spec,
        "device": str(model.device),
        "device_map": model.device_map,
        "dtype": str(model.dtype),
        "compatibility_mode": model.compatibility_mode,
        "reference": reference,
        "versions": installed_versions(),
        "python": sys.version,
        "code": code,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def require_sound_generation(model: ChatModel) -> GenerationCheck | None:
    """:func:`check_generation` once per loaded model, unless ``LENS_SAFETY_SKIP_SELFCHECK=1``.

    A passed check is remembered on disk (``cache_dir()/selfcheck/KEY.json``, :func:`check_key`):
    the same weights on the same device, dtype, versions and code decode the same way, so a later
    run skips the two reference decodes. A failed check is never stored.
    """
    if os.environ.get(SKIP_ENV, "") == "1":
        return None
    if model.generation_check is not None:
        return model.generation_check
    record = cache_dir() / "selfcheck" / f"{check_key(model, _choose(model, 'auto'))}.json"
    try:
        stored = json.loads(record.read_text(encoding="utf-8"))
        stored.pop("ok", None)
        check = GenerationCheck(**{**stored, "prompts": tuple(stored["prompts"])})
    except (OSError, ValueError, TypeError, KeyError):
        check = check_generation(model)
        record.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(record, json.dumps(check.to_dict(), indent=1))
    if not check.ok:  # a stored record that does not pass is ignored: check again
        check = check_generation(model)
    model.generation_check = check
    return check
