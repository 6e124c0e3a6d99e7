"""A run trained before the package was reorganised (issue 27) resumes bitwise as it did then.

tests/fixtures/legacy_run/ was made by the code of commit 6f7f22c: a 200-frame 600 K dataset
(``data/``) and a ``smoke``-preset run (spline couplings, P4Inv mixing, float64, TorchEnergy)
stopped after step 13 (``run/``; its config uses the old key ``flow``). The same code resumed it
to step 26; ``expected.json`` holds SHA-256 digests of every tensor of that final checkpoint
(flow, optimizer, P4Inv merge schedule, coordinate fit) and its last metrics row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import torch

from p4bg.train import main

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"


def _digests(obj, prefix: str, out: dict) -> dict:
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous().numpy().tobytes()
        out[prefix] = hashlib.sha256(data).hexdigest()[:32]
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _digests(v, f"{prefix}/{k}", out)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _digests(v, f"{prefix}/{i}", out)
    elif isinstance(obj, int | float | str | bool) or obj is None:
        out[prefix] = obj
    return out


def test_a_run_from_before_the_reorganisation_resumes_bitwise(tmp_path, monkeypatch):
    shutil.copytree(FIXTURE, tmp_path / "legacy")
    monkeypatch.chdir(tmp_path / "legacy")  # the run's config names data and out relatively
    main(["--resume", "run", "--no-progress"])

    expected = json.loads((FIXTURE / "expected.json").read_text())
    state = torch.load("run/checkpoint.pt", map_location="cpu", weights_only=False)
    got: dict = {}
    for key in ("flow", "optimizer", "merger", "coordinates"):
        _digests(state[key], key, got)
    assert state["step"] == expected["step"] == 26
    assert state["counters"] == expected["counters"]
    tensors = {k: v for k, v in expected.items() if k.split("/")[0] in
               ("flow", "optimizer", "merger", "coordinates")}  # fmt: skip
    assert set(got) == set(tensors)
    different = [k for k in tensors if got[k] != tensors[k]]
    assert not different, f"not bitwise as before: {different[:5]}"
    with open("run/metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert {k: last[k] for k in expected["metrics_last"]} == expected["metrics_last"]
    # the checkpoint predates counting energy evaluations: counted from the resume on, and
    # metrics.csv leaves the columns empty rather than print a part of the cost as all of it
    assert state["evaluations_from"] == 13 and state["evaluations"]["mixed"] > 0
    assert last["evaluations_mixed"] == "" and last["evaluations_validation"] == ""
    assert "predates counting energy evaluations" in Path("run/train.log").read_text()
