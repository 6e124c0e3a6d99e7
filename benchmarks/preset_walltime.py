"""Planned training wall time of two presets, from step costs measured side by side in one run.

A full `paper` run is 42,000 steps (hours on these CPUs), so instead of timing whole runs this
times what a run is made of, for each preset in the same process on the same machine: the median
NLL step, the median mixed step (sampling, OpenMM energies and forces, the KL term) and one
validation at the preset's own settings (validation NLL of ``val_frames`` held-out frames and the
reverse ESS of ``val_samples`` fresh samples), and multiplies by the preset's plan:

    wall ≈ nll_steps · t_nll + mixed_steps · t_mixed + refills · t_anneal
           + (anneal_steps − refills) · t_anneal_reuse
           + validations · t_val

It prints both plans side by side with the ratio to the first preset (the issue "Samples that
reweight" asks the new preset for at most 1.5× `paper`). Each preset is timed on its own
dataset (``data`` of the preset), since a validation's cost grows with the validation frames it
scores (``val_frames = 0``: all of them); ``--data`` times all on one dataset instead. Checkpoint
writes (every 1,000 steps, about 0.1 s each) are left out of both.

    python benchmarks/preset_walltime.py
    python benchmarks/preset_walltime.py --data DATA --steps 3 --presets paper quick   # quick
    python benchmarks/preset_walltime.py --presets paper spline spline_swap   # the spline models
    python benchmarks/preset_walltime.py --presets paper spline:nll_steps=16000   # a variant

A preset may carry overrides, ``NAME:key=value,key=value``, as ``--key=value`` would give them to
``p4bg.train``. Stages that run one after the other are joined by ``+`` and their plans added:
``spline+spline300`` is the 600 K spline model and the annealing to 300 K that starts from it
(a preset's ``init`` is left out: a fresh model's steps cost the same).

    python benchmarks/preset_walltime.py --presets paper spline spline+spline300   # 300 K
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from p4bg.config import PRESETS, TrainConfig, apply_overrides
from p4bg.training import Trainer
from p4bg.training.schedules import anneal_refills


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"spline:nll_steps=16000,hidden=64"`` -> ``("spline", {"nll_steps": "16000", ...})``."""
    name, _, rest = spec.partition(":")
    extra = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"preset_walltime: {spec!r}: overrides look like NAME:key=value,...")
        extra[key] = value
    return name, extra


def measure(
    preset: str, data: str | None, steps: int, flow: str | None, out: str
) -> dict[str, float]:
    """Seconds per NLL step, per mixed step and per validation of ``preset``, and its plan."""
    name, extra = split_spec(preset)
    changes = {"out": out, "init": "", **({"mixing": flow} if flow else {}),
               **({"data": data} if data else {})}  # fmt: skip
    config = apply_overrides(TrainConfig(), {**PRESETS[name], **extra, **changes}, preset)
    if not Path(config.data).is_dir():
        raise SystemExit(f"preset_walltime: the {preset} preset's dataset {config.data} is not "
                         "here; make it (docs/guide.md, 'The datasets behind the results') "
                         "or pass --data")  # fmt: skip
    trainer = Trainer(config, progress=False)
    times: dict[str, list[float]] = {"nll": [], "mixed": [], "anneal": []}
    lengths = {"nll": config.nll_steps, "mixed": config.mixed_steps, "anneal": config.anneal_steps}
    starts = {"nll": 0, "mixed": config.nll_steps, "anneal": config.nll_steps + config.mixed_steps}
    reuse: list[float] = []  # annealing steps that resample earlier draws
    for phase, start in starts.items():
        if lengths[phase] == 0:
            continue
        trainer.step = start  # the schedules (lr, w_e) read the step; the cost does not
        for _ in range(steps + 2):  # the first two warm up caches and worker processes
            trainer.anneal_buffer = None  # an annealing step that draws afresh
            t0 = time.perf_counter()
            trainer.train_step()
            times[phase].append(time.perf_counter() - t0)
        if phase == "anneal" and config.anneal_refill_every > 1:
            for _ in range(steps + 2):  # steps that reuse the draws of the step before
                trainer.step = start
                trainer.anneal_buffer.step = start
                t0 = time.perf_counter()
                trainer.train_step()
                reuse.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    trainer.validate()
    t_val = time.perf_counter() - t0
    if trainer.target is not None:
        trainer.target.close()
    total = config.total_steps
    n_val = total // config.val_every + (total % config.val_every != 0)
    t_nll = statistics.median(times["nll"][2:]) if times["nll"] else 0.0
    t_mixed = statistics.median(times["mixed"][2:]) if times["mixed"] else 0.0
    t_anneal = statistics.median(times["anneal"][2:]) if times["anneal"] else 0.0
    # draws afresh at every stage and every anneal_refill_every steps; resamples in between
    refills = anneal_refills(config) if config.anneal_steps else 0
    t_reuse = statistics.median(reuse[2:]) if reuse else t_anneal
    anneal_wall = refills * t_anneal + (config.anneal_steps - refills) * t_reuse
    wall = (config.nll_steps * t_nll + config.mixed_steps * t_mixed + anneal_wall
            + n_val * t_val)  # fmt: skip
    return {"data": config.data, "n_val_frames": trainer.n_val, "nll_steps": config.nll_steps,
            "mixed_steps": config.mixed_steps, "anneal_steps": config.anneal_steps,
            "t_nll": t_nll, "t_mixed": t_mixed, "t_anneal": t_anneal, "t_anneal_reuse": t_reuse,
            "anneal_refills": refills,
            "n_val": n_val, "t_val": t_val, "wall": wall}  # fmt: skip


def add_stages(stages: list[dict[str, float]]) -> dict[str, float]:
    """The plan of stages run one after the other: steps, validations and wall add up; each
    step time is the steps' weighted mean."""
    out: dict[str, float] = {"data": " then ".join(str(s["data"]) for s in stages),
                             "n_val_frames": stages[-1]["n_val_frames"]}  # fmt: skip
    for key in ("nll_steps", "mixed_steps", "anneal_steps", "n_val", "wall"):
        out[key] = sum(s[key] for s in stages)
    for phase in ("nll", "mixed", "anneal"):
        n = out[f"{phase}_steps"]
        out[f"t_{phase}"] = (
            sum(s[f"{phase}_steps"] * s[f"t_{phase}"] for s in stages) / n if n else 0.0
        )
    out["t_val"] = sum(s["n_val"] * s["t_val"] for s in stages) / max(out["n_val"], 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="one dataset for all presets (default: "
                        "each preset's own)")  # fmt: skip
    parser.add_argument("--presets", nargs="+", default=["paper", "reweight"])
    parser.add_argument("--flow", default=None, choices=("p4inv", "swap"),
                        help="the mixing of every preset (default: each preset's own)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=30, help="timed steps per phase")
    args = parser.parse_args(argv)
    unknown = [s for p in args.presets for s in p.split("+") if split_spec(s)[0] not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.flow + ' flow' if args.flow else 'each preset' + chr(39) + 's flow'}, "
          f"median of {args.steps} steps per phase")  # fmt: skip
    rows = {}
    with tempfile.TemporaryDirectory(prefix="p4bg_walltime_") as tmp:
        measured: dict[str, dict[str, float]] = {}
        for preset in args.presets:
            for stage in preset.split("+"):
                if stage not in measured:
                    measured[stage] = measure(stage, args.data, args.steps, args.flow,
                                              f"{tmp}/{len(measured)}")  # fmt: skip
            rows[preset] = add_stages([measured[s] for s in preset.split("+")])
    base = rows[args.presets[0]]["wall"]
    width = max(12, *(len(p) for p in args.presets))
    print(f"  {'preset':<{width}} {'NLL steps':>9} {'ms/step':>8} {'mixed':>6} {'ms/step':>8} "
          f"{'anneal':>6} {'ms/step':>8} {'val':>4} {'s/val':>6} {'planned h':>9} "
          f"{'ratio':>6}")  # fmt: skip
    for preset, r in rows.items():
        print(f"  {preset:<{width}} {r['nll_steps']:>9,} {r['t_nll'] * 1e3:>8.1f} "
              f"{r['mixed_steps']:>6,} {r['t_mixed'] * 1e3:>8.1f} {r['anneal_steps']:>6,} "
              f"{r['t_anneal'] * 1e3:>8.1f} {r['n_val']:>4} {r['t_val']:>6.2f} "
              f"{r['wall'] / 3600:>9.2f} {r['wall'] / base:>6.2f}")  # fmt: skip
    for preset, r in rows.items():
        print(f"  {preset}: data {r['data']}, {r['n_val_frames']:,} validation frames scored")


if __name__ == "__main__":
    main()
