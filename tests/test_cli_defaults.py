"""The edit commands' defaults are the library's: an option that names a field of the job's settings
dataclass has that field's default, so ``lens-safety rosi`` and ``run_edit(model, out)`` do the
same thing. Typer needs literal defaults at ``--help`` time (the settings modules import torch),
so the two are written twice; this test is what keeps them equal."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import typer

from lens_safety.cli import _register, app
from lens_safety.pipelines import EditSettings
from lens_safety.pipelines.conditional import ConditionalSettings


def _command(name: str) -> Any:
    """The registered command ``name`` (typer's own click command object)."""
    _register()
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _shared_defaults(command: Any, settings: Any) -> dict[str, tuple[Any, Any]]:
    """``{field: (cli default, library default)}`` for every option named like a settings field."""
    fields = {f.name: f.default for f in dataclasses.fields(settings)}
    return {
        p.name: (p.default, fields[p.name])
        for p in command.params
        if p.name in fields and p.name != "method" and not isinstance(fields[p.name], tuple)
    }


@pytest.mark.parametrize(
    ("command", "settings"),
    [("rosi", EditSettings), ("ablate", EditSettings), ("conditional-rosi", ConditionalSettings)],
)
def test_edit_command_defaults_equal_the_settings_defaults(command: str, settings: Any) -> None:
    shared = _shared_defaults(_command(command), settings)
    assert {"harmful", "n_train", "n_test", "max_new_tokens"} <= set(shared)
    differing = {name: pair for name, pair in shared.items() if pair[0] != pair[1]}
    assert differing == {}


@pytest.mark.parametrize(("command", "relative"), [("rosi", True), ("conditional-rosi", False)])
def test_over_refusal_bound_reads_the_same_flags_on_both_rosi_commands(command: str, relative: bool) -> None:
    """One flag pair on both commands; each keeps its own job's default basis."""
    param = next(p for p in _command(command).params if p.name == "over_refusal_relative")
    assert param.opts == ["--relative-over-refusal"]
    assert param.secondary_opts == ["--absolute-over-refusal"]
    assert param.default is relative
