"""``lens-safety info MODEL``: what lens-safety sees in a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lens_safety.cli import app, options
from lens_safety.cli.common import load_cli_model, print_json, stdout_console

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lens_safety.architecture.types import ResidualWriter


@app.command()
def info(
    model: options.ModelArg = "smollm2",
    device: options.DeviceOpt = None,
    dtype: options.DtypeOpt = None,
    json: options.JsonOpt = False,
    no_chat_template: options.NoTemplateOpt = False,
) -> None:
    """Architecture, layers, width, dtype, chat-template tail, post-instruction tokens, residual writers."""
    loaded = load_cli_model(model, device, dtype, no_chat_template)
    from lens_safety.placement import device_map_of  # imports torch: not at --help

    writers = loaded.arch.writers
    summary: dict[str, Any] = {
        "spec": loaded.spec,
        "hf_path": str(loaded.hf_path),
        "architecture": loaded.arch.architecture,
        "model_type": loaded.arch.model_type,
        "n_layers": loaded.n_layers,
        "d_model": loaded.d_model,
        "d_vocab": loaded.arch.d_vocab,
        "normalization": loaded.arch.normalization,
        "tied_embeddings": loaded.arch.tied_embeddings,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "device_map": device_map_of(loaded.hf_model),
        "compatibility_mode": loaded.compatibility_mode,
        "chat_template_tail": loaded.chat.template_tail(),
        "post_instruction_tokens": loaded.chat.post_instruction_tokens(),
        "residual_writers": {
            "count": len(writers),
            "embed": [w.hf_name for w in writers if w.kind in ("embed", "pos_embed")],
            **{kind: _pattern(writers, kind) for kind in ("attn_out", "mlp_out", "mixer_out")},
            "experts": max((w.experts or 0 for w in writers), default=0),
            "layout": writers[-1].layout,
            "biases": any(w.has_bias for w in writers),
            "post_norm": any(w.post_norm for w in writers),
        },
    }
    if json:
        print_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"lens-safety info: {loaded.spec}", show_header=False)
    for key, value in summary.items():
        if key == "residual_writers":
            for k, v in value.items():
                table.add_row(f"writers.{k}", str(v))
        else:
            table.add_row(key, repr(value) if key == "chat_template_tail" else str(value))
    stdout_console().print(table)


def _pattern(writers: Sequence[ResidualWriter], kind: str) -> str | None:
    """The HF name of the first writer of ``kind`` with its block index as ``{l}`` (None if absent)."""
    first = next((w for w in writers if w.kind == kind), None)
    return None if first is None else first.hf_name.replace(f".{first.layer}.", ".{l}.", 1)
