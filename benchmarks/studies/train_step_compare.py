"""Training-step times of this checkout against another revision (e.g. main), in one run.

Step times on these shared machines differ 3–4× between machines and days, so a speed-up is only
measured side by side: this script checks REV out into a git worktree, then runs
``benchmarks/train_step.py`` of both checkouts in alternation (``--rounds`` times each, each
checkout importing its own ``p4bg``) and prints the medians and the ratio REV ÷ this checkout.
The OpenMM worker bridge is the energy of both (the only one REV may have); this checkout's
TorchEnergy step is printed beside it.

    python benchmarks/studies/train_step_compare.py --base main --data data/alanine_dipeptide_600K
    python benchmarks/studies/train_step_compare.py --base HEAD~3 --data DATA --steps 2 --batch 8
    python benchmarks/studies/train_step_compare.py --base 909ce3d --data DATA --compile
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a row of train_step.py: [coupling] mixing [energy] NLL-ms mixed-ms share (the coupling column
# since the spline couplings; only the paper's RealNVP rows are compared)
ROW = re.compile(
    r"^\s+(?:rnvp\s+)?(swap|p4inv)\s+(?:(openmm|torch)\s+)?([\d.]+)\s+([\d.]+)\s+\d+%", re.M
)


def run_steps(
    checkout: Path, args: argparse.Namespace, energies: list[str], extra: tuple = ()
) -> dict:
    """{(model, energy): (nll ms, mixed ms)} from one train_step.py run of ``checkout``."""
    command = [sys.executable, str(checkout / "benchmarks" / "train_step.py"), "--data",
               str(Path(args.data).resolve()), "--steps", str(args.steps), "--batch",
               str(args.batch), "--device", args.device, *extra]  # fmt: skip
    if energies != ["openmm"]:
        command += ["--energies", *energies]
    if "--couplings" in (checkout / "benchmarks" / "train_step.py").read_text():
        command += ["--couplings", "rnvp"]  # the paper's model, as in revisions before splines
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"train_step.py of {checkout} failed:\n{result.stderr}")
    rows = {}
    for model, energy, nll, mixed in ROW.findall(result.stdout):
        rows[(model, energy or "openmm")] = (float(nll), float(mixed))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="main", help="git revision to compare against (main)")
    parser.add_argument("--data", default="data/alanine_dipeptide_600K")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per phase and run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per checkout")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true",
                        help="also time this checkout's P4Inv steps with compile=true and "
                        "TorchEnergy (one run per round; compilation is not timed)")  # fmt: skip
    args = parser.parse_args(argv)
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()  # fmt: skip
    here_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           text=True, capture_output=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="p4bg_base_") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), base_rev],
                       cwd=ROOT, check=True)  # fmt: skip
        try:
            runs: dict[str, list[dict]] = {"base": [], "here": [], "compiled": []}
            for _ in range(args.rounds):
                runs["base"].append(run_steps(base, args, ["openmm"]))
                runs["here"].append(run_steps(ROOT, args, ["openmm", "torch"]))
                if args.compile:
                    extra = ("--compile", "--models", "p4inv")
                    runs["compiled"].append(run_steps(ROOT, args, ["torch"], extra))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    print(f"batch {args.batch}, median of {args.rounds} alternating runs x {args.steps} steps; "
          f"base {args.base} ({base_rev}) against this checkout ({here_rev}"
          f"{', with uncommitted changes' if dirty else ''})")  # fmt: skip
    print(f"  {'model':<6} {'step':<6} {'base ms':>8} {'here ms':>8} {'base/here':>9}"
          f" {'here, TorchEnergy ms':>21} {'base/that':>9}")  # fmt: skip
    for model in ("swap", "p4inv"):
        for index, step in enumerate(("NLL", "mixed")):
            base_ms = statistics.median(r[(model, "openmm")][index] for r in runs["base"])
            here_ms = statistics.median(r[(model, "openmm")][index] for r in runs["here"])
            torch_ms = statistics.median(r[(model, "torch")][index] for r in runs["here"])
            print(
                f"  {model:<6} {step:<6} {base_ms:>8.1f} {here_ms:>8.1f} "
                f"{base_ms / here_ms:>8.2f}x {torch_ms:>21.1f} {base_ms / torch_ms:>8.2f}x"
            )
    if runs["compiled"]:
        print("  this checkout, P4Inv, TorchEnergy, compile=true (base: the OpenMM step above)")
        for index, step in enumerate(("NLL", "mixed")):
            base_ms = statistics.median(r[("p4inv", "openmm")][index] for r in runs["base"])
            ms = statistics.median(r[("p4inv", "torch")][index] for r in runs["compiled"])
            print(f"  {'p4inv':<6} {step:<6} {base_ms:>8.1f} {ms:>8.1f} {base_ms / ms:>8.2f}x")


if __name__ == "__main__":
    main()
