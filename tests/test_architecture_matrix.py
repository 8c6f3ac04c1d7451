"""The architecture matrix: every causal-LM architecture of TransformerBridge's registry, built
tiny offline and checked (load, residuals, writers, ROSI, abliteration, export, formula), with the
docs table generated from the same cases. The fast cases are the dense chat architectures users
bring most and two mixture-of-experts models: Mixtral (experts stored one tensor per expert, fused
in memory) and gpt-oss (experts fused on disk too, in the Conv1D orientation, with biases)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lens_safety.arch_matrix import (
    FAST_CASES,
    committed_rows,
    registry_architectures,
    run_case,
    table_row,
)

PAGE = Path(__file__).resolve().parent.parent / "docs" / "how-to" / "architectures.md"
ARCHS = registry_architectures()
SLOW_CASES = [a for a in ARCHS if a not in FAST_CASES]
#: architectures lens-safety must edit (the chat models users bring, mixture-of-experts included)
MUST_SUPPORT = list(FAST_CASES)


def test_the_matrix_is_the_bridge_registry_and_the_docs_table_lists_all_of_it() -> None:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    causal = [a for a in SUPPORTED_ARCHITECTURES if a.endswith(("ForCausalLM", "LMHeadModel"))]
    assert sorted(ARCHS) == sorted(causal) and len(ARCHS) > 60
    assert all(ARCHS[a] for a in FAST_CASES)
    rows = committed_rows(PAGE.read_text())
    assert list(rows) == list(ARCHS), (
        "regenerate: python -m lens_safety.arch_matrix docs/how-to/architectures.md"
    )
    assert all(row.split("|")[2].strip() == (ARCHS[a] or "—") for a, row in rows.items())


def _check(arch: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    result = run_case(arch, ARCHS[arch], tmp_path, tokenizer_dir)
    assert result.status not in ("failed", "bridge error") or arch not in FAST_CASES, result.detail
    if arch in MUST_SUPPORT:
        assert result.status == "supported", result.detail
        assert result.writers == 1 + 2 * 2  # embedding + (attn.o, mlp.out or fused experts) x 2 blocks
    committed = committed_rows(PAGE.read_text())[arch]
    assert table_row(result) == committed, (
        "the docs table is out of date: python -m lens_safety.arch_matrix docs/how-to/architectures.md "
        + arch
    )


@pytest.mark.parametrize("arch", FAST_CASES)
def test_fast_architecture(arch: str, tmp_path: Path, smollm2_dir: Path) -> None:
    _check(arch, tmp_path, smollm2_dir)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW_CASES)
def test_slow_architecture(arch: str, tmp_path: Path, smollm2_dir: Path) -> None:
    _check(arch, tmp_path, smollm2_dir)
