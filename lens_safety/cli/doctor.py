"""``lens-safety doctor``: installed versions, model hashes, and the generation self-check."""

from __future__ import annotations

import platform
from typing import Annotated, Any

import typer

from lens_safety.cli import app, options
from lens_safety.cli.common import load_cli_model, print_json, stdout_console
from lens_safety.errors import LensSafetyError


def _model_row(spec: str, device: str | None, reference: str) -> dict[str, Any]:
    from lens_safety.selfcheck import check_generation

    model = load_cli_model(spec, device, None)
    check = check_generation(model, reference=reference, raise_on_mismatch=False)  # type: ignore[arg-type]
    row: dict[str, Any] = {
        "spec": spec,
        "architecture": model.arch.architecture,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "weights_sha256": model.weights_hash,
        "adapter_sha256": model.lineage.get("adapter_sha256"),
        "selfcheck": check.to_dict(),
    }
    row["_model"], row["_check"] = model, check
    return row


@app.command()
def doctor(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Model specs to check (default: the embedded smollm2 and smollm2-refusal)."),
    ] = None,
    reference: Annotated[
        str, typer.Option("--reference", help="Self-check reference: auto, vanilla or uncached.")
    ] = "auto",
    device: options.DeviceOpt = None,
    json: options.JsonOpt = False,
) -> None:
    """Print the versions that decide generation and check greedy generation against transformers."""
    from lens_safety.selfcheck import installed_versions, mismatch_message

    versions = {"python": platform.python_version(), **installed_versions()}
    rows = [_model_row(spec, device, reference) for spec in models or ["smollm2", "smollm2-refusal"]]
    failed = [row for row in rows if not row["_check"].ok]
    if json:
        print_json({"versions": versions, "models": [_public(row) for row in rows], "ok": not failed})
    else:
        _render(versions, rows)
    if failed:
        row = failed[0]
        raise LensSafetyError(
            f"{row['spec']}: {mismatch_message(row['_check'], row['_model'].tokenizer)}",
            "install the tested versions with the README's command (pip install -c constraints.txt …)",
        )


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _render(versions: dict[str, str], rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    console = stdout_console()
    table = Table(title="lens-safety doctor: versions", show_header=False)
    for name, version in versions.items():
        table.add_row(name, version)
    console.print(table)
    checks = Table(title="greedy generation self-check (batched bridge generate vs reference)")
    for column in ("model", "weights sha256", "adapter sha256", "reference", "result"):
        checks.add_column(column)
    for row in rows:
        check = row["_check"]
        checks.add_row(
            row["spec"],
            row["weights_sha256"][:16],
            (row["adapter_sha256"] or "-")[:16],
            check.reference,
            "ok: token ids equal" if check.ok else "MISMATCH",
        )
    console.print(checks)
