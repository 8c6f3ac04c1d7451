"""Helpers shared by the CLI commands: quiet libraries, load a model, parse option values, render.

Only light imports at the top (``--help`` must not import torch); the model, prompt and table
modules are imported inside the helpers that need them. The typer options live in
:mod:`lens_safety.cli.options`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import typer

from lens_safety.errors import LensSafetyError, LensSafetyWarning
from lens_safety.fsutil import require_free, write_file_atomic

if TYPE_CHECKING:
    from rich.console import Console

    from lens_safety.evaluation.table import RosiTable
    from lens_safety.models import ChatModel

Number = TypeVar("Number", int, float)

_library_showwarning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    if issubclass(category, LensSafetyWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        _library_showwarning(message, category, *args, **kwargs)


def show_lens_safety_warnings() -> None:
    """Print every :class:`~lens_safety.errors.LensSafetyWarning` as one ``warning: …`` line on stderr."""
    warnings.filterwarnings("always", category=LensSafetyWarning)
    warnings.showwarning = _show_warning


def quiet_libraries() -> None:
    """Silence library chatter (progress bars of transformers, warnings) for clean CLI output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    show_lens_safety_warnings()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def load_cli_model(
    spec: str,
    device: str | None,
    dtype: str | None,
    no_chat_template: bool = False,
    system_prompt: str | None = None,
    *,
    selfcheck: bool = False,
) -> ChatModel:
    """Load a model for a CLI command with quiet libraries.

    ``selfcheck``: before a long job, check that greedy generation equals the reference
    (:func:`lens_safety.selfcheck.require_sound_generation`); a mismatch is one ``error:`` line.
    """
    quiet_libraries()
    from lens_safety.models import load_model

    loaded = load_model(
        spec, device=device, dtype=dtype, chat_template=not no_chat_template, system_prompt=system_prompt
    )
    if selfcheck:
        from lens_safety.selfcheck import require_sound_generation

        require_sound_generation(loaded)
    return loaded


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float (NaN: a metric over no lists; inf) replaced by ``None``."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(value) for value in data]
    return data


def json_text(data: Any) -> str:
    """``data`` as strict, indented JSON text (NaN -> null): what ``--json`` prints and what a
    command saves as a ``.json`` file."""
    return json.dumps(strict_json(data), indent=2, default=str, allow_nan=False)


def print_json(data: Any) -> None:
    """Print strict JSON on stdout (the only thing a ``--json`` command writes there); NaN -> null."""
    typer.echo(json_text(data))


#: table width when stdout is a file or a pipe (rich would fall back to 80 columns and wrap)
PIPED_WIDTH = 160


def stdout_console() -> Console:
    """A rich console on stdout: the terminal's width, or ``PIPED_WIDTH`` columns when redirected
    (``COLUMNS`` in the environment still wins)."""
    from rich.console import Console

    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=PIPED_WIDTH) if piped else Console()


def parse_numbers(value: str, option: str, example: str, *, integer: bool) -> list[float]:
    """Comma-separated non-negative integers (``integer``) or positive finite numbers, else a one-line error."""
    try:
        numbers = [int(x) if integer else float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        numbers = []
    if not numbers or any((n < 0) if integer else not (n > 0 and n < float("inf")) for n in numbers):
        kind = "non-negative block indices" if integer else "positive numbers"
        raise LensSafetyError(
            f"{option} must be comma-separated {kind}, got '{value}'", f"pass e.g. {option} {example}"
        )
    return [float(n) for n in numbers]


def parse_starts(value: str | None) -> tuple[int, ...] | None:
    """``--starts``: the first edited blocks to sweep, sorted and distinct (``None``: left out)."""
    if value is None:
        return None
    return tuple(sorted({int(b) for b in parse_numbers(value, "--starts", "10,15,20", integer=True)}))


def parse_injections(value: str | None) -> tuple[float, ...] | None:
    """``--injections``: the injections to sweep, in gaps (``None``: left out)."""
    if value is None:
        return None
    return tuple(parse_numbers(value, "--injections", "0.75,1,1.5", integer=False))


def given(**options: Any) -> dict[str, Any]:
    """The options the user passed: ``None`` means left out, so the job's default (or the preset's)
    stands."""
    return {k: v for k, v in options.items() if v is not None}


def parse_prompt_sets(value: str) -> list[str]:
    """Comma-separated prompt-set specs (files or ``builtin:`` names; ``none`` for none), each
    checked to load so a typo fails before any model work."""
    from lens_safety.prompts import PromptSet

    specs = [x.strip() for x in value.split(",") if x.strip()]
    if specs == ["none"]:
        return []
    for spec in specs:
        PromptSet.load(spec)
    return specs


def parse_heldout_pairs(value: str, option: str = "--heldout") -> list[tuple[str, str]]:
    """``'HARMFUL,HARMLESS;HARMFUL,HARMLESS'`` (``none`` for none) -> checked (harmful, harmless) pairs."""
    if value.strip() == "none":
        return []
    pairs: list[tuple[str, str]] = []
    for chunk in (c.strip() for c in value.split(";") if c.strip()):
        specs = [x.strip() for x in chunk.split(",")]
        if len(specs) != 2 or not all(specs):
            raise LensSafetyError(
                f"{option} needs pairs 'HARMFUL,HARMLESS', got {chunk!r}",
                "e.g. builtin:harmful_holdout_3,builtin:harmless_holdout_3 (pairs ';'-separated, or none)",
            )
        parse_prompt_sets(chunk)  # each set must load before any model work
        pairs.append((specs[0], specs[1]))
    return pairs


def parse_alpha(value: str, method: str = "rosi") -> float | Literal["auto"]:
    """``auto`` or a finite float in ``method``'s range (its registry entry's ``min_alpha``)."""
    if value == "auto":
        return "auto"
    from lens_safety.edits.methods import edit_method

    rule = edit_method(method)
    assert rule.min_alpha is not None and rule.default_alphas, f"{method} has no calibrated strength"
    example = f"{rule.default_alphas[len(rule.default_alphas) // 2]:g}"
    try:
        alpha = float(value)
    except ValueError:
        raise LensSafetyError(
            f"--alpha must be 'auto' or a number, got '{value}'", f"pass e.g. --alpha {example}"
        ) from None
    if not math.isfinite(alpha) or alpha < rule.min_alpha:
        raise LensSafetyError(
            f"--alpha must be a finite number >= {rule.min_alpha:g}, got {value} ({rule.label}: "
            f"{rule.alpha_why})",
            f"pass e.g. --alpha {example} or --alpha auto",
        )
    return alpha


def parse_alphas(value: str | None, method: str = "rosi") -> list[float] | None:
    """Comma-separated positive alphas of ``method``'s calibration sweep (``None``: its default
    grid); the rule is :meth:`~lens_safety.edits.methods.EditMethod.check_sweep`'s."""
    if value is None:
        return None
    from lens_safety.edits.methods import edit_method

    values = [parse_alpha(x.strip(), method) for x in value.split(",") if x.strip()]
    if not values or any(v == "auto" or v <= 0 for v in values):
        grid = ",".join(f"{a:g}" for a in edit_method(method).default_alphas or ())
        raise LensSafetyError(
            f"--alphas must be positive numbers, got '{value}' (0 is the baseline, measured anyway)",
            f"pass e.g. --alphas {grid}",
        )
    return [float(v) for v in values]


def parse_auto_int(value: str, option: str) -> int | Literal["auto"]:
    """``auto`` or an integer (a block index, a token position), else a one-line error naming ``option``."""
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise LensSafetyError(
            f"{option} must be 'auto' or an integer, got '{value}'", f"pass e.g. {option} auto"
        ) from None


def parse_layer(value: str) -> int | Literal["auto"]:
    """``--layer``: ``auto`` or a block index."""
    return parse_auto_int(value, "--layer")


def parse_list(value: str, option: str, kind: type[Number], example: str) -> list[Number]:
    """Comma-separated numbers of one ``kind`` (any sign), else a one-line error naming ``option``."""
    try:
        return [kind(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise LensSafetyError(
            f"cannot parse {option} '{value}'", f"pass comma-separated {kind.__name__}s, e.g. {example}"
        ) from None


def parse_blocks(value: str | None, n_layers: int | None) -> list[int] | None:
    """``all`` / ``None`` -> all blocks; ``a-b`` (inclusive) or ``a,b,c``.

    ``n_layers=None`` checks the syntax only (the caller checks the range once the model is loaded).
    """
    if value is None or value == "all":
        return None
    try:
        if "-" in value.strip("-"):
            lo, hi = (int(x) for x in value.split("-", 1))
            blocks = list(range(lo, hi + 1))
        else:
            blocks = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise LensSafetyError(
            f"--blocks must be 'all', 'a-b' or 'a,b,c', got '{value}'", "pass e.g. --blocks 15-29"
        ) from None
    bad = [b for b in blocks if b < 0 or (n_layers is not None and b >= n_layers)]
    if bad or not blocks:
        valid = "non-negative block indices" if n_layers is None else f"blocks 0..{n_layers - 1}"
        raise LensSafetyError(f"--blocks {value} is outside {valid}", f"use {valid}")
    return blocks


def print_export_summary(summary: dict[str, Any], as_json: bool) -> None:
    """An edit job's summary (``EditRun.to_dict()`` / ``ConditionalRun.to_dict()``): strict JSON,
    or its export line, the before -> after rates and its message."""
    if as_json:
        print_json(summary)
        return
    console = stdout_console()
    console.print(
        f"[bold]{summary['method']}[/bold] alpha={summary['alpha']:g} direction layer {summary['layer']} "
        f"-> {summary['out']} (max |logit diff| on reload {summary['max_abs_logit_diff']:.2g})"
    )
    for key in ("harmful_refusal", "harmless_refusal"):
        if key in summary:
            console.print(
                f"{key.replace('_', ' ')}: {summary[key]['before']:.2f} -> {summary[key]['after']:.2f}"
            )
    if "judge" in summary:
        counted = zip(summary["prompts"].values(), summary["n_test"], strict=True)
        sets = " / ".join(f"{name} (n={n})" for name, n in counted)
        console.print(f"judged by {summary['judge']} on {sets}", highlight=False)
    if summary.get("message"):
        console.print(summary["message"])


def check_writable(path: Path, overwrite: bool, option: str) -> None:
    """Fail before any work when the output file ``path`` exists (without ``--overwrite``) or its
    folder is missing or read-only."""
    require_free(path, overwrite, option=option)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise LensSafetyError(
            f"cannot write '{path}' (missing or read-only folder)", "choose a writable path"
        )


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records as JSON lines, atomically (a partial file never remains)."""
    write_file_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def print_rosi_table(table: RosiTable) -> None:
    """ROSI's table (``eval --compare``, ``report --table``) as a rich table, then one note per
    column naming its instrument."""
    from rich.table import Table

    out = Table(title="lens-safety: models side by side")
    out.add_column("model")
    for column in table.columns:
        out.add_column(column.title)
    for name, row in zip(table.labels, table.cells, strict=True):
        out.add_row(name, *[cell.text() for cell in row])
    console = stdout_console()
    console.print(out)
    for note in table.notes():
        console.print(note, soft_wrap=True, highlight=False)
