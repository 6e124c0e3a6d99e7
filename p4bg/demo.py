"""The demo: a 300 K Boltzmann generator made from 600 K MD, against 300 K MD of the same cost.

examples:
  python -m p4bg.demo                    # everything in runs/demo/ (about 15 min on 2 cores)
  python -m p4bg.demo                    # again: continues where it stopped, or says it is done
  python -m p4bg.demo --out runs/demo2 --seed 1

What it does, in phases (each one line on the terminal, with the time it should take):
  1. data      600 K MD of alanine dipeptide (at 600 K the molecule crosses its barriers)
  2. 600 K     a spline + P4Inv Boltzmann generator learns the MD frames (maximum likelihood)
  3. 300 K     the model is annealed to 300 K by reweighting its own samples, stage by stage
  4. samples   300,000 conformations at 300 K with their energies and importance weights
  5. report    report.md and figures in runs/demo/report/
Meanwhile plain 300 K MD runs on the other core for exactly as long as the generator's
phases take, so both get the same CPU seconds. Both are compared with a 300 K reference shipped
with p4bg (replica exchange + umbrella sampling; systems/alanine_dipeptide/reference_300K.*).
On a machine with a GPU the training phases use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p4bg.cli import option, parse
from p4bg.config import ConfigError
from p4bg.demo_report import write_demo_report
from p4bg.files import write_json

__all__ = ["DemoOptions", "main"]

PROG = "python -m p4bg.demo"


@dataclass
class DemoOptions:
    """The options of ``python -m p4bg.demo``."""

    out: str = option("runs/demo", "folder of everything the demo makes")
    seed: int = option(0, "seed of the MD and of the training")
    device: str = option("auto", "training device: auto (a GPU when there is one), cpu, cuda")
    no_progress: bool = option(False, "no progress bars, a line per interval")
    # seconds instead of minutes, for the tests: every phase tiny (the numbers mean nothing)
    smoke: bool = option(False, hidden=True)


@dataclass
class Phase:
    """One phase: its name, what it does, its planned seconds on this project's 2-core CPU
    (measured; an estimate elsewhere), and the command that runs it."""

    name: str
    what: str
    planned_s: float
    command: list[str]
    done: Path  # exists once the phase is complete


@dataclass
class DemoState:
    """demo.json: what is done, and the CPU and wall seconds each part took."""

    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    md300: dict[str, float] = field(default_factory=dict)


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _load_state(path: Path) -> DemoState:
    if not path.is_file():
        return DemoState()
    data = json.loads(path.read_text())
    return DemoState(phases=data.get("phases", {}), md300=data.get("md300", {}))


# The sizes of the phases; ``--smoke`` shrinks them to seconds for the tests.
SIZES: dict[str, Any] = {
    "ns": "4",
    "equilibration_ps": "100",
    "samples": 300_000,
    "600 K": (),
    "300 K": (),
}
SMOKE: dict[str, Any] = {
    "ns": "0.04",
    "equilibration_ps": "1",
    "samples": 200,
    "600 K": (
        "--n_blocks=2",
        "--hidden=16",
        "--nll_steps=20",
        "--val_every=10",
        "--val_samples=64",
        "--checkpoint_every=10",
        "--log_every=5",
    ),
    "300 K": (
        "--n_blocks=2",
        "--hidden=16",
        "--anneal_steps=12",
        "--anneal_stages=2",
        "--anneal_samples=64",
        "--val_every=6",
        "--val_samples=64",
        "--checkpoint_every=6",
        "--log_every=3",
    ),
}


def _phases(opts: DemoOptions, out: Path) -> list[Phase]:
    """The generator's phases, their commands and planned seconds (measured on this project's
    2-core CPU with one core each for the generator and for the 300 K MD)."""
    seed, dev = str(opts.seed), f"--device={opts.device}"
    size = SMOKE if opts.smoke else SIZES
    data, bg600, bg300 = out / "data_600K", out / "bg600", out / "bg300"

    def train(preset: str, run: Path, stage: str, *extra: str) -> list[str]:
        if (run / "checkpoint.pt").is_file():
            return _python("p4bg.train", "--resume", str(run), "--no-progress", dev)
        return _python(
            "p4bg.train",
            "--preset",
            preset,
            f"--seed={seed}",
            "--out",
            str(run),
            "--no-progress",
            dev,
            f"--data={data}",
            *size[stage],
            *extra,
        )

    simulate = _python(
        "p4bg.simulate",
        "--ns",
        size["ns"],
        "--save-every-ps",
        "0.04",
        "--replicas",
        "2",
        "--workers",
        "1",
        "--seed",
        seed,
        "--out",
        str(data),
        "--resume",
        "--no-progress",
        "--equilibration-ps",
        size["equilibration_ps"],
    )
    sample = _python(
        "p4bg.sample",
        str(bg300),
        "--n-samples",
        str(size["samples"]),
        "--seed",
        seed,
        "--overwrite",
        "--no-progress",
        dev,
    )
    return [
        Phase(
            "data",
            f"600 K MD, {size['ns']} ns in 2 replicas, a frame every 0.04 ps",
            215,
            simulate,
            out / "done" / "data",
        ),
        Phase(
            "600 K",
            "a spline + P4Inv flow learns the frames (maximum likelihood)",
            280,
            train("demo600", bg600, "600 K"),
            out / "done" / "600K",
        ),
        Phase(
            "300 K",
            "the model is annealed to 300 K on its own reweighted samples",
            330,
            train("demo300", bg300, "300 K", f"--init={bg600}"),
            out / "done" / "300K",
        ),
        Phase(
            "samples",
            f"{size['samples']:,} conformations at 300 K with energies and weights",
            60,
            sample,
            out / "done" / "samples",
        ),
    ]


def _progress_of(phase: Phase, out: Path) -> str:
    """A short line on where a running phase stands, read from the files it writes."""
    if phase.name == "data":
        chunks = len(list((out / "data_600K").glob("replica_*/chunk_*.npz")))
        return f"{chunks} chunks of frames written"
    run = out / ("bg600" if phase.name == "600 K" else "bg300")
    metrics = run / "metrics.csv"
    if phase.name in ("600 K", "300 K") and metrics.is_file():
        lines = metrics.read_text().strip().splitlines()
        if len(lines) > 1:
            header, last = lines[0].split(","), lines[-1].split(",")
            row = dict(zip(header, last, strict=False))
            text = f"step {row.get('step')}"
            if row.get("val_ess"):
                text += f", validation ESS {100 * float(row['val_ess']):.1f} %"
            if row.get("anneal_temperature"):
                text += f" at {float(row['anneal_temperature']):.0f} K"
            return text
    return "running"


def _run(phase: Phase, out: Path, log: Path, env: dict[str, str], every: float) -> dict:
    """Run one phase's command with its output in ``log``; a progress line every ``every``
    seconds; (wall seconds, CPU seconds of the process and its children)."""
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(phase.command)}\n")
        f.flush()
        proc = subprocess.Popen(phase.command, stdout=f, stderr=subprocess.STDOUT, env=env)
        last = time.perf_counter()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.5)
            if time.perf_counter() - last >= every:
                last = time.perf_counter()
                print(
                    f"    {phase.name}: {_progress_of(phase, out)} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped by wait4: Popen must not wait for it again
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(
            f"p4bg.demo: phase '{phase.name}' failed (exit {code}); the end of "
            f"{log}:\n{tail}\nrerun `{PROG}` to continue from here"
        )
    return {"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime}


def _start_md300(out: Path, seed: int, stop: Path, log: Path) -> subprocess.Popen:
    """Plain 300 K MD on its own core until ``stop`` appears (it resumes on a rerun)."""
    command = _python(
        "p4bg.simulate",
        "--temperature",
        "300",
        "--ns",
        "1000",
        "--replicas",
        "1",
        "--workers",
        "1",
        "--save-every-ps",
        "1",
        "--chunk-frames",
        "50",
        "--equilibration-ps",
        "10",
        "--seed",
        str(seed + 5),
        "--out",
        str(out / "md300"),
        "--resume",
        "--stop-file",
        str(stop),
        "--no-progress",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("a") as f:  # the child keeps its own copy of the file descriptor
        f.write(f"\n$ {' '.join(command)}\n")
        f.flush()
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)


def _stop_md300(proc: subprocess.Popen, stop: Path) -> dict:
    """Ask the 300 K MD to stop after its current chunk; its (wall, CPU) seconds."""
    stop.touch()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, as in _run
    return {"cpu_s": usage.ru_utime + usage.ru_stime}


def run_demo(opts: DemoOptions) -> Path:
    """Every phase not yet done, the 300 K MD beside them, then the report; the report folder."""
    out = Path(opts.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    state_path = out / "demo.json"
    state = _load_state(state_path)
    phases = _phases(opts, out)
    every = 60.0 if opts.no_progress or not sys.stdout.isatty() else 15.0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core for the generator, one for MD
    todo = [p for p in phases if not p.done.exists()]
    stop = out / "md300.stop"
    stop.unlink(missing_ok=True)
    md = _start_md300(out, opts.seed, stop, out / "logs" / "md300.log") if todo else None
    wall_md = time.perf_counter()
    speed = 1.0  # measured time over planned, from the phases run so far
    try:
        for i, phase in enumerate(phases, 1):
            if phase.done.exists():
                print(f"[{i}/{len(phases) + 1}] {phase.name}: done before", flush=True)
                continue
            left = sum(p.planned_s for p in todo[todo.index(phase) :]) * speed
            print(
                f"[{i}/{len(phases) + 1}] {phase.name}: {phase.what} (about "
                f"{phase.planned_s * speed / 60:.0f} min; the demo about {left / 60:.0f} min "
                "more)",
                flush=True,
            )
            usage = _run(phase, out, out / "logs" / "demo.log", env, every)
            phase.done.parent.mkdir(exist_ok=True)
            phase.done.touch()  # a phase counts as done only once its command succeeded
            prior = state.phases.get(phase.name, {"wall_s": 0.0, "cpu_s": 0.0})
            state.phases[phase.name] = {k: prior[k] + usage[k] for k in usage}
            speed = usage["wall_s"] / phase.planned_s
            write_json(state_path, asdict(state))
    finally:
        if md is not None:
            usage = _stop_md300(md, stop)
            state.md300 = {
                "cpu_s": state.md300.get("cpu_s", 0.0) + usage["cpu_s"],
                "wall_s": state.md300.get("wall_s", 0.0) + time.perf_counter() - wall_md,
            }
            write_json(state_path, asdict(state))
    print(
        f"[{len(phases) + 1}/{len(phases) + 1}] report: BG against same-cost MD and the reference",
        flush=True,
    )
    return write_demo_report(out, asdict(state))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(DemoOptions, argv, PROG, __doc__ or "")
        report = run_demo(opts)
    except ConfigError as err:
        print(f"p4bg.demo: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\np4bg.demo: interrupted; rerun `{PROG}` to continue", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"report: {report / 'report.md'}")


if __name__ == "__main__":
    main()
