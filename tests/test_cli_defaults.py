"""The commands' defaults are the library's: an option that names a field of the job's settings
dataclass (or a parameter of the library function the command calls) has the same default, so
``lens-safety rosi`` and ``run_edit(model, out)`` do the same thing. Typer needs literal defaults at
``--help`` time (the library modules import torch), so the two are written twice; this test keeps
them equal."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

import pytest
import typer

from lens_safety.cli import _register, app
from lens_safety.organism.demonstration import DemoSettings
from lens_safety.pipelines import EditSettings
from lens_safety.pipelines.conditional import ConditionalSettings
from lens_safety.serving.server import ServeConfig
from lens_safety.srr.ranker import RankerConfig
from lens_safety.srr.train import TrainConfig


def _subcommand(path: str) -> Any:
    """The registered command at ``path`` (e.g. ``srr train``)."""
    _register()
    command: Any = typer.main.get_command(app)
    for part in path.split():
        command = command.commands[part]
    return command


def _shared_defaults(command: Any, settings: Any) -> dict[str, tuple[Any, Any]]:
    """``{field: (cli default, library default)}`` for every option named like a settings field
    that has a default. An option whose CLI default is ``None`` while the field's is not means
    "left out: the library's default stands" (``cli.common.given``) and is not compared here;
    ``test_conditional_cli`` checks on a run that ``refine`` is then the library's."""
    fields = {f.name: f.default for f in dataclasses.fields(settings) if f.default is not dataclasses.MISSING}
    return {
        p.name: (p.default, fields[p.name])
        for p in command.params
        if p.name in fields
        and p.name != "method"
        and not isinstance(fields[p.name], tuple)
        and not (p.default is None and fields[p.name] is not None)
    }


EDIT_OPTIONS = {"harmful", "n_train", "n_test", "max_new_tokens"}
SERVE_OPTIONS = {"n", "max_n", "host", "port", "max_tokens", "max_batch", "max_queue", "request_timeout"}


@pytest.mark.parametrize(
    ("command", "settings", "expected"),
    [
        ("rosi", EditSettings, EDIT_OPTIONS),
        ("amplify", EditSettings, EDIT_OPTIONS),
        ("ablate", EditSettings, EDIT_OPTIONS),
        ("conditional-rosi", ConditionalSettings, EDIT_OPTIONS),
        ("srr serve", ServeConfig, SERVE_OPTIONS),
    ],
)
def test_command_defaults_equal_the_settings_defaults(
    command: str, settings: Any, expected: set[str]
) -> None:
    shared = _shared_defaults(_subcommand(command), settings)
    assert expected <= set(shared)
    differing = {name: pair for name, pair in shared.items() if pair[0] != pair[1]}
    assert differing == {}


def test_demo_options_left_out_keep_the_preset_and_given_defaults_equal_both_presets() -> None:
    """``organism demo``: an option defaulting to ``None`` keeps the preset's value (full study or
    ``--quick``); any other default must be what both presets use, or ``--quick`` would silently
    run with a setting its preset does not have."""
    command = _subcommand("organism demo")
    fields = {f.name for f in dataclasses.fields(DemoSettings)}
    full, quick = DemoSettings(), DemoSettings.quick()
    fixed = {p.name: p.default for p in command.params if p.name in fields and p.default is not None}
    assert {"conditional", "template", "shrinkage"} <= set(fixed)
    differing = {
        name: (default, getattr(full, name), getattr(quick, name))
        for name, default in fixed.items()
        if not default == getattr(full, name) == getattr(quick, name)
    }
    assert differing == {}


@pytest.mark.parametrize(("command", "relative"), [("rosi", True), ("conditional-rosi", False)])
def test_over_refusal_bound_reads_the_same_flags_on_both_rosi_commands(command: str, relative: bool) -> None:
    """One flag pair on both commands; each keeps its own job's default basis."""
    param = next(p for p in _subcommand(command).params if p.name == "over_refusal_relative")
    assert param.opts == ["--relative-over-refusal"]
    assert param.secondary_opts == ["--absolute-over-refusal"]
    assert param.default is relative


#: options whose CLI value is the spelled-out form of the library's ``None`` default
SPELLED_OUT = {
    "judge": "substring (the library's default judge)",
    "contexts": "None on the CLI: every context, the library's CONTEXTS",
    "engine": "'hf' on the CLI: the bridge's own model, the library's None",
}


@pytest.mark.parametrize(
    ("command", "function", "settings"),
    [
        # train_ranker_directory's **options take their defaults from the two dataclasses
        ("srr train", "lens_safety.srr.train_job:train_ranker_directory", (RankerConfig, TrainConfig)),
        ("srr build-data", "lens_safety.srr.build:build_dataset", ()),
    ],
)
def test_srr_command_defaults_equal_the_library_defaults(
    command: str, function: str, settings: tuple[Any, ...]
) -> None:
    module, name = function.split(":")
    signature = inspect.signature(getattr(importlib.import_module(module), name))
    library = {
        k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty
    }
    for dataclass in settings:
        library.update({f.name: f.default for f in dataclasses.fields(dataclass) if f.name not in library})
    shared = {
        p.name: (p.default, library[p.name])
        for p in _subcommand(command).params
        if p.name in library and p.name not in SPELLED_OUT
    }
    assert {"seed"} <= set(shared) and len(shared) >= 5
    if settings:
        assert {"width", "tau", "dropout", "members", "weight_decay", "max_epochs", "patience"} <= set(shared)
    assert {name: pair for name, pair in shared.items() if pair[0] != pair[1]} == {}


PROMPT_OPTIONS = [
    "eval",
    "rosi",
    "ablate",
    "conditional-rosi",
    "directions",
    "probe",
    "srr eval",
    "srr build-data",
]


@pytest.mark.parametrize("command", PROMPT_OPTIONS)
def test_every_prompt_option_documents_the_sources_the_loader_reads(command: str) -> None:
    """``--harmful`` / ``--harmless`` are read by ``PromptSet.load`` everywhere, so every command's
    help names the same sources, including every external set the loader knows."""
    from lens_safety.external_prompts import EXTERNAL_SOURCES

    params = {p.name: p for p in _subcommand(command).params}
    for name in ("harmful", "harmless"):
        help_text = params[name].help or ""
        assert "builtin:" in help_text and "hf:" in help_text and ".jsonl" in help_text, (command, name)
        missing = [source for source in EXTERNAL_SOURCES if source not in help_text]
        assert missing == [], (command, name, missing)
