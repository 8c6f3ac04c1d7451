"""The demonstration's stages on an organism whose ROSI calibration exports nothing.

``lens_safety.organism.demonstration.demonstrate`` stops when no ROSI strength stays inside the
over-refusal and KL bounds on val. This runs the same functions with the same settings, in the
same order, records ROSI's sweep instead of exporting it, and goes on: the organism measured on
builtin test, the direction, the abliterated child (exported), ROSI's calibration (recorded),
conditional ROSI (calibrated, exported). Usage: ``python story_without_rosi.py MODEL OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lens_safety.calibration import calibrate_alpha
from lens_safety.models import load_model
from lens_safety.organism.demo_results import conditional_record, direction_record
from lens_safety.organism.demonstration import (
    DemoSettings,
    _Prompts,
    _repair_conditional,
    _Stages,
)
from lens_safety.pipelines import EditSettings, Splits, edit_and_export, load_chat_model, obtain_direction
from lens_safety.pipelines.steps import sweep_options


def main(model_spec: str, out: Path) -> None:
    out.mkdir(parents=True)
    s = DemoSettings(organism_spec=model_spec, base_spec=None, heldout=())
    prompts = _Prompts.load(s)
    stages = _Stages(s, prompts, progress=True)
    organism = load_chat_model(s.organism_spec, device="cpu")
    stages.measure("organism", organism)
    direction, report = obtain_direction(organism, None, s.direction_layer, prompts.full, progress=True)
    direction.save(out / "direction")
    stages.lap("find the direction")
    edit_and_export(
        organism, direction, Splits(), EditSettings(method="orthogonalize", n_test=0), out / "abliterated"
    )
    abliterated = load_model(out / "abliterated", device="cpu")
    stages.measure("abliterated", abliterated)
    rosi_settings = EditSettings(
        method="rosi",
        alphas=s.alphas,
        target_refusal=s.target_refusal,
        max_over_refusal=s.max_over_refusal,
        over_refusal_relative=s.over_refusal_relative,
        max_kl=s.max_kl,
        n_test=0,
        max_new_tokens=s.max_new_tokens,
    )
    rosi_sweep = calibrate_alpha(
        abliterated,
        direction,
        *prompts.val,
        method="rosi",
        alphas=s.alphas,
        **sweep_options(rosi_settings, True),
    )
    stages.lap("calibrate ROSI (recorded, not exported)")
    sweep, picked, choice, _ = _repair_conditional(
        abliterated, direction, prompts, s, out / "conditional-rosi", True
    )
    stages.lap("calibrate conditional ROSI, export")
    stages.measure("conditional", load_model(out / "conditional-rosi", device="cpu"))
    record = {
        "stages": {stage.name: stage.to_dict() for stage in stages.done},
        "direction": direction_record(direction, report),
        "rosi_calibration": rosi_sweep.to_dict(),
        "conditional": conditional_record(sweep, picked, choice, None),
        "timings": stages.timings,
    }
    (out / "demo.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
