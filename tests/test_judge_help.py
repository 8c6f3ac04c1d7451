"""Every command's ``--help`` states the judge it uses by default.

Commands with a ``--judge`` option are found by walking the CLI (so a command that gains the
option later is checked too); their help must say ``default: <judge>`` with the option's real
default. Commands that judge refusal without a ``--judge`` option must name their judge.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from cli_runner import run_cli as run

from lens_safety.cli import _register, app

#: commands that measure refusal with a fixed judge (no --judge option) and the judge they name
FIXED_JUDGE = {
    "rosi": "substring",
    "ablate": "substring",
    "conditional-rosi": "substring",
    "organism eval": "substring",
    "organism demo": "substring",
}
#: the default of commands whose --judge option has no default value (None), as they document it
DOCUMENTED_DEFAULT = {"eval": "substring", "srr eval": "substring"}


def _commands() -> Iterator[tuple[str, Any]]:
    _register()

    def walk(command: Any, path: list[str]) -> Iterator[tuple[str, Any]]:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), command

    yield from walk(typer.main.get_command(app), [])


def _help(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = run([*name.split(), "--help"], capsys)
    assert code == 0, err
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())  # rich boxes and line wraps removed


def test_commands_with_a_judge_option_state_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with_option = {
        name: next(p for p in command.params if "--judge" in getattr(p, "opts", ()))
        for name, command in _commands()
        if any("--judge" in getattr(p, "opts", ()) for p in command.params)
    }
    assert {"eval", "judge-agreement", "srr build-data", "srr eval", "srr relabel"} <= set(with_option)
    for name, option in with_option.items():
        default = option.default
        if isinstance(default, list | tuple):
            default = default[0] if default else None
        expected = default if default is not None else DOCUMENTED_DEFAULT.get(name)
        assert expected, f"{name}: --judge has no default and none is documented in this test"
        text = _help(name, capsys)
        assert re.search(rf"default:\s*{re.escape(str(expected))}\b", text, re.IGNORECASE), (name, text)


def test_commands_with_a_fixed_judge_name_it(capsys: pytest.CaptureFixture[str]) -> None:
    names = {name for name, _ in _commands()}
    for name, judge in FIXED_JUDGE.items():
        assert name in names
        text = _help(name, capsys)
        assert f"{judge} judge" in text, (name, text)
