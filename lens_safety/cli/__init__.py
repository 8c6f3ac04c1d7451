"""The ``lens-safety`` command line: thin typer commands over the library's functions.

Each sub-module registers its commands on :data:`app`. Every user error is a
:class:`~lens_safety.errors.LensSafetyError`, printed as one ``error: …`` line with exit status 2.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from lens_safety.errors import LensSafetyError

app = typer.Typer(
    name="lens-safety",
    help="Safety interpretability for chat LLMs: refusal directions, probes, ROSI edits, export, SRR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Safety interpretability for chat LLMs: refusal directions, probes, ROSI edits, export, SRR."""


# Command modules, imported for their side effect of registering commands.
COMMAND_MODULES = (
    "info",
    "doctor",
    "directions",
    "rosi",
    "conditional",
    "evaluate",
    "judge",
    "organism",
    "srr",
    "srr_experiments",
    "srr_data",
)


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"lens_safety.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lens_safety.cli.{name}":
                raise


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning user errors into one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register()
    from lens_safety.cli.common import show_lens_safety_warnings

    show_lens_safety_warnings()
    try:
        app(args=argv)  # standalone mode: usage errors print and exit 2 on their own
    except LensSafetyError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
