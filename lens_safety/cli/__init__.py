"""The ``lens-safety`` command line: thin typer commands over the library's functions.

Each command module registers its commands on :data:`app` or on one of its groups
(:data:`judge_app`, :data:`organism_app`, :data:`srr_app`); a command module imports only this
package, :mod:`~lens_safety.cli.options` (the shared typer options) and
:mod:`~lens_safety.cli.common` (the shared helpers), never another command module. Every user error is a
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


judge_app = typer.Typer(
    help="The learned refusal judge ('--judge learned'): train it, compare it with the keyword judges.",
    no_args_is_help=True,
)
organism_app = typer.Typer(
    help="The refusal model organism (smollm2-refusal): rebuild its adapter, measure it.",
    no_args_is_help=True,
)
srr_app = typer.Typer(
    help="Safety Representation Ranking: best-of-N with a hidden-state ranker.", no_args_is_help=True
)
app.add_typer(judge_app, name="judge")
app.add_typer(organism_app, name="organism")
app.add_typer(srr_app, name="srr")

# Command modules, imported for their side effect of registering commands.
COMMAND_MODULES = (
    "info",
    "doctor",
    "directions",
    "edit",
    "evaluate",
    "report",
    "judge",
    "organism",
    "organism_demo",
    "srr_serve",
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
