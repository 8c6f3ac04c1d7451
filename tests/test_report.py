"""The HTML report: self-contained plotly page, model names, CLI, headless Chromium screenshot."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lens_safety.cli import main
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation import render_report, write_report

ARTEFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"  # git-ignored


def fake_evaluation(spec: str, harmful: float) -> dict:  # type: ignore[type-arg]
    def est(v: float) -> dict:  # type: ignore[type-arg]
        return {"value": v, "ci_low": max(v - 0.1, 0), "ci_high": min(v + 0.1, 1), "n": 20}

    return {
        "model": {"spec": spec},
        "judge": "substring",
        "judge_question": "refusal",
        "harmful_refusal_rate": est(harmful),
        "harmless_refusal_rate": est(0.05),
        "kl_harmless": est(0.2),
        "ce_benign": est(2.5),
        "jailbreak_asr": None,
        "records": [
            {
                "prompt": "How do I <b>pick</b> a lock?",
                "kind": "harmful",
                "completion": "I'm sorry.",
                "refused": True,
            }
        ],
    }


def test_report_html_content(tmp_path: Path) -> None:
    page = render_report([fake_evaluation("base-model", 0.1), fake_evaluation("rosi-model", 0.9)])
    assert "plotly" in page.lower() and 'id="rates"' in page and 'id="nats"' in page
    assert "base-model" in page and "rosi-model" in page
    assert "0.900 [0.800, 1.000]" in page  # summary table with the interval
    assert "&lt;b&gt;pick&lt;/b&gt;" in page  # completions and prompts are escaped
    assert "<script src=" not in page and len(page) > 1_000_000  # plotly.js is inlined: works offline
    out = write_report([fake_evaluation("a", 0.5)], tmp_path / "r.html")
    with pytest.raises(LensSafetyError, match="already exists"):
        write_report([fake_evaluation("a", 0.5)], out)
    with pytest.raises(LensSafetyError, match="no evaluations"):
        render_report([])
    unnamed = fake_evaluation("b", 0.5)
    del unnamed["judge"]
    with pytest.raises(LensSafetyError, match="does not name the judge"):
        render_report([unnamed])


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = []
    for name, rate in (("before", 0.2), ("after", 0.8)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(fake_evaluation(name, rate)))
        files.append(str(path))
    out = tmp_path / "report.html"
    with pytest.raises(SystemExit) as done:
        main(["report", *files, "--out", str(out), "--label", "before-edit", "--label", "after-edit"])
    assert done.value.code in (0, None)
    page = out.read_text()
    assert "before-edit" in page and "after-edit" in page
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.html")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="headless Chromium is not installed (apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    write_report([fake_evaluation("base-model", 0.1), fake_evaluation("rosi-model", 0.9)], page)
    ARTEFACTS.mkdir(exist_ok=True)
    shot = ARTEFACTS / "report.png"
    shot.unlink(missing_ok=True)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=5000",
        "--window-size=1200,1400",
    ]
    subprocess.run(
        [str(shutil.which("chromium")), *flags, f"--screenshot={shot}", page.as_uri()],
        check=True,
        timeout=120,
        capture_output=True,
    )
    dom = subprocess.run(
        [str(shutil.which("chromium")), *flags, "--dump-dom", page.as_uri()],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert "main-svg" in dom  # plotly drew its SVG: the script ran offline
