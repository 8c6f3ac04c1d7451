"""The ``info`` command and the foundation's bad-input contract: one line, exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli
from transformers import AutoConfig, AutoModelForCausalLM


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_info_json_on_embedded_default(smollm2, capsys):
    code, out, _ = run_cli(["info", "smollm2", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["n_layers"] == 30 and data["d_model"] == 576
    assert data["architecture"] == "LlamaForCausalLM" and data["tied_embeddings"] is True
    assert data["residual_writers"]["count"] == 1 + 2 * 30
    assert data["residual_writers"]["attn_out"] == "model.layers.{l}.self_attn.o_proj"
    assert "".join(data["post_instruction_tokens"]) == data["chat_template_tail"]


def test_info_tiny_gpt2_reports_conv1d_biases_and_pos_embed(tiny_dirs, capsys):
    code, out, _ = run_cli(["info", str(tiny_dirs["gpt2"]), "--json"], capsys)
    assert code == 0
    writers = json.loads(out)["residual_writers"]
    assert writers["layout"] == "conv1d" and writers["biases"] is True
    assert writers["embed"] == ["transformer.wte", "transformer.wpe"]


def test_unknown_spec(capsys):
    code, _, err = run_cli(["info", "no-such-model"], capsys)
    assert_one_line_error(code, err, "no-such-model", "check the spelling")


def test_missing_directory(capsys, tmp_path):
    code, _, err = run_cli(["info", str(tmp_path / "absent") + "/"], capsys)
    assert_one_line_error(code, err, "absent", "does not exist")


def test_directory_without_config(capsys, tmp_path):
    code, _, err = run_cli(["info", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "no config.json")


def test_unsupported_architecture(capsys, tmp_path, smollm2_dir: Path):
    config = AutoConfig.for_model(
        "biogpt",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, tmp_path / name)
    code, _, err = run_cli(["info", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "BioGptForCausalLM", "not supported")


def test_tokenizer_without_chat_template_and_explicit_fallback(capsys, tmp_path, tiny_dirs):
    target = tmp_path / "no-template"
    shutil.copytree(tiny_dirs["llama"], target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["info", str(target)], capsys)
    assert_one_line_error(code, err, "no chat template", "--no-chat-template")
    code, out, _ = run_cli(["info", str(target), "--no-chat-template", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["chat_template_tail"] == "\nAssistant:"


def test_tables_keep_their_width_when_stdout_is_redirected(capsys, monkeypatch):
    """Piped output used to wrap at rich's 80-column fallback; now a table row stays on one line."""
    monkeypatch.delenv("COLUMNS", raising=False)
    code, out, _ = run_cli(["info", "smollm2"], capsys)  # capsys: stdout is not a terminal
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert rows and any(len(line) > 80 for line in rows)
    assert all(line.split("│")[1].strip() for line in rows)  # a wrapped cell leaves the key column blank
    monkeypatch.setenv("COLUMNS", "70")
    code, out, _ = run_cli(["info", "smollm2"], capsys)
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 70


def test_help_screens_and_the_package_import_load_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, lens_safety\n"
        "from lens_safety.cli import main\n"
        "for argv in (['--help'], ['eval', '--help'], ['organism', 'demo', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), exc.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout, done.stdout[-500:]


def test_every_public_name_resolves_to_its_module_object() -> None:
    import importlib

    import lens_safety
    import lens_safety.organism

    for package in (lens_safety, lens_safety.organism):
        exports = package._EXPORTS
        assert set(exports) == set(package.__all__) - {"__version__"}
        for name, module in exports.items():
            imported = importlib.import_module(module)
            expected = imported if module == f"{package.__name__}.{name}" else getattr(imported, name)
            assert getattr(package, name) is expected
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        lens_safety.nothing_here  # noqa: B018


def test_the_public_verbs_of_every_job_are_top_level_names() -> None:
    """Edit, conditional ROSI, the demonstration, evaluation and SRR are reachable as
    ``lens_safety.<verb>`` (``lens_safety.srr`` is the SRR package itself)."""
    import lens_safety

    verbs = {
        "run_edit",
        "run_conditional",
        "demonstrate",
        "evaluate_model",
        "evaluate_refusal",
        "refusal_rate",
        "kl_divergence",
        "get_judge",
        "train_ranker_directory",
        "load_ranker",
    }
    assert verbs <= set(lens_safety.__all__)
    code = (  # a fresh interpreter: the subpackage is imported by the attribute access itself
        "import sys, lens_safety as ls\n"
        "assert 'lens_safety.srr' not in sys.modules\n"
        "assert ls.srr is sys.modules['lens_safety.srr']\n"
        "print(ls.srr.select.__module__, ls.evaluate_model.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["lens_safety.srr.select", "lens_safety.evaluation.suite"]
