"""torchrun with 2 processes (gloo, CPU) on the smoke preset: DDP training equals one process
with the same global batch, P4Inv state stays bitwise identical across ranks through merges,
a distributed run resumes exactly, and sharded sampling writes the single process's files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# one thread per process, as torchrun sets it; the single-process runs compared with them too
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(*args: str, processes: int = 2, expect: int = 0) -> subprocess.CompletedProcess:
    command = [*TORCHRUN, *args] if processes == 2 else [sys.executable, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT,
                            timeout=600)  # fmt: skip
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def smoke(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "smoke", f"--data={data}", f"--out={out}", "--no-progress", *extra]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def test_merges_are_rank_zeros_and_identical_on_every_rank(tmp_path):
    """Each rank trains on its own data and draws its own new v: at every one of >= 100 merges
    rank 0 decides and its state is broadcast, so A, A⁻¹, ln|det A|, the sign, the merge
    count, u and v end bitwise identical. Without the broadcast (--alone) they are not."""
    for mode in ("world", "alone"):
        out = tmp_path / mode
        out.mkdir()
        launch(str(HERE / "ddp_worker.py"), "merges", str(out), *(["--alone"] * (mode == "alone")))
        ranks = [load(out / f"rank{r}.pt") for r in (0, 1)]
        totals = ranks[0]["totals"]
        assert totals["accepted"] + totals["forced"] >= 100
        assert totals["skipped"] + totals["forced"] > 0  # decisions other than "accept" too
        same = all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k])
                   for k in ranks[0]["state"])  # fmt: skip
        if mode == "world":
            assert same
            assert ranks[0]["totals"] == ranks[1]["totals"]
        else:
            assert not same


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory):
    """A 2-process smoke run in float64 at 16 frames per process (global batch 32)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    launch("-m", "p4bg.train", *smoke(data, out, "--batch_size=16", "--dtype=float64"))
    return out


def test_ddp_training_equals_one_process_with_the_global_batch(ddp_run, data, tmp_path):
    single = tmp_path / "single"
    launch("-m", "p4bg.train", *smoke(data, single, "--batch_size=32", "--dtype=float64"),
           processes=1)  # fmt: skip
    a, b = load(ddp_run / "checkpoint.pt"), load(single / "checkpoint.pt")
    assert a["step"] == b["step"] >= 20 and a["world_size"] == 2 and len(a["ranks"]) == 2
    assert a["merger"]["totals"]["accepted"] > 0
    for key, value in b["flow"].items():
        torch.testing.assert_close(a["flow"][key], value, rtol=1e-9, atol=1e-11, msg=key)
    rows = [(ddp_run / "metrics.csv").read_text(), (single / "metrics.csv").read_text()]
    losses = [[float(r.split(",")[2]) for r in t.splitlines()[1:]] for t in rows]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-9)
    assert "2 process(es), global batch 32" in (ddp_run / "train.log").read_text()


def test_ddp_annealing_with_reused_draws_equals_one_process(data, tmp_path):
    """The annealing phase with draws reused for 3 steps: each rank draws its part of the global
    draws, every rank holds the gathered buffer and resamples the global batch alike, so two
    processes of 32 draws and 16 frames equal one process of 64 and 32; the evaluations are
    counted once per frame whatever rank evaluated it (4 draws of 64, 6 KL batches of 32,
    4 validations of 64 on rank 0)."""
    anneal = ["--dtype=float64", "--target_temperature=300", "--anneal_steps=8",
              "--anneal_stages=2", "--anneal_refill_every=3"]  # fmt: skip
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    launch("-m", "p4bg.train", *smoke(data, ddp, "--batch_size=16", "--anneal_samples=32",
                                      *anneal))  # fmt: skip
    launch("-m", "p4bg.train", *smoke(data, one, "--batch_size=32", "--anneal_samples=64",
                                      *anneal), processes=1)  # fmt: skip
    a, b = load(ddp / "checkpoint.pt"), load(one / "checkpoint.pt")
    assert a["step"] == b["step"] == 34
    expected = {"mixed": 6 * 32, "anneal": 4 * 64, "validation": 4 * 64}
    assert a["evaluations"] == b["evaluations"] == expected
    assert len(a["anneal_buffer"]["x"]) == len(b["anneal_buffer"]["x"]) == 64
    torch.testing.assert_close(a["anneal_buffer"]["x"], b["anneal_buffer"]["x"], rtol=1e-9,
                               atol=1e-11)  # fmt: skip
    for key, value in b["flow"].items():
        torch.testing.assert_close(a["flow"][key], value, rtol=1e-9, atol=1e-11, msg=key)


def test_failed_energies_leave_ddp_equal_to_one_process(data, tmp_path):
    """The energy term is the mean over the global batch's successful evaluations, however the
    failures fall on the ranks (a per-rank mean, averaged, would differ)."""
    args = ["--dtype=float64", "--nll_steps=2", "--mixed_steps=10"]
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    launch(str(HERE / "ddp_worker.py"), "train", str(tmp_path / "ddp"), "--fail-a-third", "--",
           *smoke(data, tmp_path / "ddp_run", "--batch_size=16", *args))  # fmt: skip
    launch(str(HERE / "ddp_worker.py"), "train", str(tmp_path / "one"), "--fail-a-third", "--",
           *smoke(data, tmp_path / "one_run", "--batch_size=32", *args), processes=1)  # fmt: skip
    a, b = load(tmp_path / "ddp" / "rank0.pt"), load(tmp_path / "one" / "rank0.pt")
    assert a["counters"]["energy_failures"] == b["counters"]["energy_failures"] > 30
    for key, value in b["state"].items():
        torch.testing.assert_close(a["state"][key], value, rtol=1e-9, atol=1e-11, msg=key)


def test_ranks_hold_identical_state_after_100_merges_in_training(data, tmp_path):
    """p4bg.train itself: every parameter, P4Inv buffer and Adam moment bitwise equal on both
    ranks after more than 100 merges (one merge event per step)."""
    launch(str(HERE / "ddp_worker.py"), "train", str(tmp_path), "--",
           *smoke(data, tmp_path / "run", "--merge_every=1", "--nll_steps=40"))  # fmt: skip
    r0, r1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    assert r0["totals"]["accepted"] + r0["totals"]["forced"] >= 100
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    for index, entry in r0["adam"].items():
        for name, value in entry.items():
            assert torch.equal(value, r1["adam"][index][name]), (index, name)


def test_a_killed_ddp_run_resumes_exactly(ddp_run, data, tmp_path):
    run = tmp_path / "run"
    launch(str(HERE / "ddp_worker.py"), "train", str(tmp_path), "--stop-at", "13", "--",
           *smoke(data, run, "--batch_size=16", "--dtype=float64"))  # fmt: skip
    stopped = load(run / "checkpoint.pt")["step"]
    assert 13 <= stopped < 26
    # one process cannot continue a two-process run: it says how to
    err = launch("-m", "p4bg.train", "--resume", str(run), processes=1, expect=2).stderr
    assert "torchrun --nproc_per_node=2 -m p4bg.train --resume" in err
    launch("-m", "p4bg.train", "--resume", str(run), "--no-progress")
    a, b = load(run / "checkpoint.pt"), load(ddp_run / "checkpoint.pt")
    assert a["step"] == b["step"]
    for key, value in b["flow"].items():
        assert torch.equal(a["flow"][key], value), key


def test_sharded_sampling_writes_the_single_process_files(ddp_run, data, tmp_path):
    """torchrun sampling (--n-samples: torchrun's parser takes --n for its own options) equals
    one process making the same two shards; the merged set is analyzed like any other."""
    # why the count has a name of its own: torchrun's parser fails on --n before p4bg runs
    err = launch("-m", "p4bg.sample", str(ddp_run), "--n", "5", expect=2).stderr
    assert "ambiguous option: --n could match --nnodes" in err
    single = tmp_path / "single"
    shutil.copytree(ddp_run, single)
    launch("-m", "p4bg.sample", str(ddp_run), "--n-samples", "250", "--batch", "64", "--seed",
           "4", "--no-progress", "--overwrite")  # fmt: skip
    launch("-m", "p4bg.sample", str(single), "--n", "250", "--batch", "64", "--seed", "4",
           "--shards", "2", "--no-progress", "--overwrite", processes=1)  # fmt: skip
    info = json.loads((ddp_run / "samples.json").read_text())
    assert (info["n_samples"], info["shards"], info["processes"]) == (250, 2, 2)
    assert info["status"] == "complete" and not (ddp_run / ".shards").exists()
    with np.load(ddp_run / "samples.npz") as a, np.load(single / "samples.npz") as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-6, err_msg=key)
        assert len(np.unique(a["log_q"])) == 250  # two shards, two different streams
    mdtraj = pytest.importorskip("mdtraj")
    pdb = str(ddp_run / "samples.pdb")
    xa = mdtraj.load(str(ddp_run / "samples.dcd"), top=pdb).xyz
    xb = mdtraj.load(str(single / "samples.dcd"), top=pdb).xyz
    assert xa.shape == (250, 22, 3)
    np.testing.assert_allclose(xa, xb, atol=1e-5)
    launch("-m", "p4bg.analyze", str(ddp_run), "--reference", str(data), "--n-workers", "1",
           processes=1)  # fmt: skip
    metrics = json.loads((ddp_run / "report" / "metrics.json").read_text())
    assert metrics["models"][ddp_run.name]["n_samples"] == 250


@pytest.mark.slow
def test_compiled_ddp_equals_eager(ddp_run, data, tmp_path):
    """compile=true under DDP: the compiled passes inside the DDP module (about 2 minutes)."""
    run = tmp_path / "compiled"
    launch("-m", "p4bg.train", *smoke(data, run, "--batch_size=16", "--dtype=float64",
                                      "--compile=true"))  # fmt: skip
    a, b = load(run / "checkpoint.pt"), load(ddp_run / "checkpoint.pt")
    for key, value in b["flow"].items():
        torch.testing.assert_close(a["flow"][key], value, rtol=1e-9, atol=1e-11, msg=key)


@pytest.mark.parametrize(("body", "code"), [("pass", 0), ("raise SystemExit(3)", 3),
                                            ("raise ValueError('bad')", 1)])  # fmt: skip
def test_a_torchrun_process_ends_with_its_exit_handlers_output_and_code(tmp_path, body, code):
    """run_process ends a launched process by os._exit (no interpreter teardown for leaked
    gloo threads to abort), yet as Python's exit would: exit handlers run, buffered output
    arrives, the code is main's (1 and a traceback for an error)."""
    marker = tmp_path / "atexit-ran"
    script = (
        "import atexit, pathlib\n"
        "from p4bg import distributed\n"
        f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
        "def main():\n"
        "    print('buffered line')\n"
        f"    {body}\n"
        "distributed.run_process(main)\n"
        "print('never reached')\n"
    )
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0"}  # launched(), without joining a group
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert result.returncode == code, result.stderr
    assert result.stdout == "buffered line\n"
    assert marker.read_text() == "yes"
    assert ("ValueError: bad" in result.stderr) == (code == 1)
