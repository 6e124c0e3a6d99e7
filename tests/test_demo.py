"""python -m p4bg.demo: the whole demo at smoke size (seconds), its report, and its resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p4bg.demo", "--smoke", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)  # fmt: skip


def test_the_demo_runs_reports_and_resumes(tmp_path):
    out = tmp_path / "demo"
    first = demo(out)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("[")] == [
        "[1/5] data", "[2/5] 600 K", "[3/5] 300 K", "[4/5] samples", "[5/5] report"]  # fmt: skip
    report = out / "report"
    for name in ("report.md", "metrics.json", "ramachandran.png", "free_energy_phi.png",
                 "energies.png", "training.png", "conformations.pdb"):  # fmt: skip
        assert (report / name).is_file(), name
    assert "energy evaluations: 600 K MD" in (report / "report.md").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["checks"][0]) >= {"check", "value", "threshold", "passed"}
    state = json.loads((out / "demo.json").read_text())
    # the 300 K MD ran beside the generator's phases, on its own core, and was counted
    assert state["md300"]["cpu_s"] > 0 and set(state["phases"]) == {"data", "600 K", "300 K",
                                                                     "samples"}  # fmt: skip
    md_meta = json.loads((out / "md300" / "metadata.json").read_text())
    assert md_meta["temperature_K"] == 300.0
    # a rerun does nothing twice: every phase is done, the report is written again
    second = demo(out)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("done before") == 4
