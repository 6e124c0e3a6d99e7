"""The paper's Fig. 6/8 at its own schedule (App. G: 8 × 20,000 steps) for every model, density
and seed, with the batched engine (benchmarks/density_stack.py): one process per model kind
trains all densities × seeds of that kind at once, resumable after a kill.

    python benchmarks/densities_2d_schedule.py --models P4Inv            # one kind per core
    python benchmarks/densities_2d_schedule.py --models "P4Inv via inv"
    python benchmarks/densities_2d_schedule.py --models RNVP
    python benchmarks/densities_2d_schedule.py --report                  # table + figure
    python benchmarks/densities_2d_schedule.py --models RNVP --steps 400 --out /tmp/s  # short

The recipe is densities_2d.py's (App. G): batch 200, Adam lr 5e-3 halved after every eighth of
the run, P4Inv merges every N = 10 steps, every 10th merge event forced, an inverse correction
every 50 merges of a layer. Each (density, seed) model starts from the parameters the one-model
loop would build (``torch.manual_seed(seed)`` then the model) and draws its batches from
``numpy.random.default_rng(seed)`` as that loop does; the fresh v of merged layers come from a
generator per model. Results (test NLL on 20,000 fresh points, merge counts, the largest
inverse residual of any layer at any merge event, wall time) go to OUT/KIND/result.json; a
checkpoint (OUT/KIND/checkpoint.pt, written atomically every --checkpoint-every steps) lets the
same command continue after a kill with the run it would have had.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from densities_2d import DATASETS, MODELS, build_model, evaluate, plot
from density_stack import P4InvStack, RNVPStack, StackStats, StackTrainer

from p4bg.files import write_atomic
from p4bg.nn import Inverse

PAPER_STEPS = 8 * 20_000
BATCH = 200


def slug(kind: str) -> str:
    return kind.replace(" ", "_")


def build_stack(kind: str, datasets: list[str], seeds: list[int]) -> torch.nn.Module:
    """The stack of every (density, seed) model of ``kind``, density-major, each initialised
    as densities_2d.py's loop initialises it."""
    models = []
    for _ in datasets:
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(build_model(kind))
    if kind == "RNVP":
        return RNVPStack(len(models), models)
    flows = [model.bijection if kind == "P4Inv" else model for model in models]
    return P4InvStack.from_models(flows, via_inverse=kind == "P4Inv via inv")


class Run:
    """One kind's training: the stack, its trainer, every model's data stream, the loop
    position; :meth:`state` and :meth:`load` make the checkpoint."""

    def __init__(self, kind: str, datasets: list[str], seeds: list[int], steps: int) -> None:
        self.kind, self.datasets, self.seeds, self.steps = kind, datasets, seeds, steps
        self.pairs = [(d, s) for d in datasets for s in seeds]
        self.stack = build_stack(kind, datasets, seeds)
        generators = [torch.Generator().manual_seed(1_000 * s + i)
                      for i, (_, s) in enumerate(self.pairs)]  # fmt: skip
        self.trainer = StackTrainer(self.stack, lr=5e-3, every=10, force_every=10,
                                    correct_every=50, generators=generators)  # fmt: skip
        self.rngs = [np.random.default_rng(s) for _, s in self.pairs]
        self.step = 0
        self.seconds = 0.0
        # each model's last 200 finite losses (densities_2d.py's train_nll), oldest first
        self.recent = torch.full((len(self.pairs), 200), math.nan, dtype=torch.float64)

    def lr(self, step: int) -> float:
        epoch = max(1, self.steps // 8)
        return 5e-3 * 0.5 ** (step // epoch)

    def batch(self) -> torch.Tensor:
        xs = [DATASETS[d](rng, BATCH) for (d, _), rng in zip(self.pairs, self.rngs, strict=True)]
        return torch.from_numpy(np.stack(xs)).to(torch.get_default_dtype())

    def advance(self, n: int) -> None:
        for _ in range(n):
            self.trainer.optimizer.lr = self.lr(self.step)
            losses = self.trainer.step(self.batch()).double()
            finite = torch.isfinite(losses)
            shifted = torch.cat([self.recent[:, 1:], losses[:, None]], 1)
            self.recent = torch.where(finite[:, None], shifted, self.recent)
            self.step += 1

    def state(self) -> dict:
        """Everything a continuation needs, copied (the run goes on changing its own)."""
        t = self.trainer
        state = {
            "kind": self.kind, "datasets": self.datasets, "seeds": self.seeds,
            "steps": self.steps, "step": self.step, "seconds": self.seconds,
            "stack": self.stack.state_dict(), "optimizer": t.optimizer.state_dict(),
            "trainer": {"steps": t.steps, "events": t.events, "skipped": t.skipped,
                        "stats": t.stats.as_lists()},
            "generators": [g.get_state() for g in t.generators],
            "rngs": [r.bit_generator.state for r in self.rngs],
            "recent": self.recent,
        }  # fmt: skip
        return copy.deepcopy(state)

    def load(self, state: dict) -> None:
        plan = {k: state[k] for k in ("kind", "datasets", "seeds", "steps")}
        mine = {"kind": self.kind, "datasets": self.datasets, "seeds": self.seeds,
                "steps": self.steps}  # fmt: skip
        if plan != mine:
            raise SystemExit(f"the checkpoint is of another run ({plan}); use its options or "
                             "another --out")  # fmt: skip
        self.stack.load_state_dict(state["stack"])
        t = self.trainer
        t.optimizer.load_state_dict(state["optimizer"])
        t.steps, t.events, t.skipped = (state["trainer"][k] for k in ("steps", "events",
                                                                       "skipped"))  # fmt: skip
        t.stats = StackStats.from_lists(state["trainer"]["stats"])
        for g, s in zip(t.generators, state["generators"], strict=True):
            g.set_state(s)
        for r, s in zip(self.rngs, state["rngs"], strict=True):
            r.bit_generator.state = s
        self.step, self.seconds, self.recent = state["step"], state["seconds"], state["recent"]


def train_kind(kind: str, args: argparse.Namespace) -> dict:
    """Train (or continue) every model of ``kind``; evaluate and write result.json."""
    folder = args.out / slug(kind)
    folder.mkdir(parents=True, exist_ok=True)
    result_path, checkpoint = folder / "result.json", folder / "checkpoint.pt"
    run = Run(kind, args.datasets, args.seeds, args.steps)
    if checkpoint.is_file():
        run.load(torch.load(checkpoint, weights_only=False))
        print(f"{kind}: continuing at step {run.step:,} of {run.steps:,}", flush=True)
    from tqdm import tqdm

    bar = tqdm(total=run.steps, initial=run.step, desc=kind, disable=not sys.stderr.isatty())
    last_log = time.perf_counter()
    while run.step < run.steps:
        n = min(args.checkpoint_every - run.step % args.checkpoint_every, run.steps - run.step)
        start = time.perf_counter()
        run.advance(n)
        run.seconds += time.perf_counter() - start
        write_atomic(checkpoint, lambda tmp: torch.save(run.state(), tmp))
        bar.update(n)
        if not bar.disable or time.perf_counter() - last_log < args.log_seconds:
            continue
        last_log = time.perf_counter()
        stats = run.trainer.stats
        print(
            f"{kind}: step {run.step:,}/{run.steps:,}, {run.seconds / run.step * 1e3:.1f} ms "
            f"a step, mean train NLL {np.nanmean(run.recent.numpy()):.3f}, max inverse "
            f"residual {float(stats.max_residual.nan_to_num(0).max()):.1e}",
            flush=True,
        )
    bar.close()
    models: dict[str, dict] = {}
    samples = {}
    stats = run.trainer.stats.as_lists()
    for k, (density, seed) in enumerate(run.pairs):
        model = run.stack.to_model(k)
        if kind == "P4Inv":
            model = Inverse(model)
        nll, xy = evaluate(model, DATASETS[density], seed)
        entry = {"density": density, "seed": seed, "test_nll": nll,
                 "train_nll_last_200": float(np.nanmean(run.recent[k].numpy())),
                 "skipped_steps": int(run.trainer.skipped[k])}  # fmt: skip
        if kind != "RNVP":
            entry["merges"] = {name: values[k] for name, values in stats.items()}
        models[f"{density}/{seed}"] = entry
        if seed == args.seeds[0]:
            samples[density] = xy
    result = {"kind": kind, "steps": run.steps, "seeds": run.seeds, "batch": BATCH,
              "seconds": run.seconds,
              "ms_per_step": run.seconds / max(run.step, 1) * 1e3, "models": models,
              "threads": torch.get_num_threads()}  # fmt: skip
    write_atomic(result_path, json.dumps(result, indent=1) + "\n")
    np.savez(folder / "samples_seed_first.npz", **samples)
    print(f"{kind}: done, {run.seconds / 3600:.2f} h; {result_path}", flush=True)
    return result


def report(args: argparse.Namespace) -> None:
    """The table (mean ± standard deviation over seeds) and the figure from result.json files."""
    results = {}
    for kind in MODELS:
        path = args.out / slug(kind) / "result.json"
        if path.is_file():
            results[kind] = json.loads(path.read_text())
    if not results:
        raise SystemExit(f"no result.json under {args.out}; train first")
    kinds = list(results)
    densities = list(dict.fromkeys(m["density"] for m in next(iter(results.values()))["models"]
                                   .values()))  # fmt: skip
    lines = ["| density | " + " | ".join(kinds) + " |", "|" + "---|" * (1 + len(kinds))]
    wins = dict.fromkeys(kinds, 0)
    for d in densities:
        cells, means = [], {}
        for kind in kinds:
            nll = [m["test_nll"] for m in results[kind]["models"].values() if m["density"] == d]
            means[kind] = float(np.mean(nll))
            spread = float(np.std(nll, ddof=1)) if len(nll) > 1 else math.nan
            cells.append(f"{means[kind]:.3f} ± {spread:.3f} (n={len(nll)})")
        wins[min(means, key=means.get)] += 1
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    print("test NLL (nats, lower is better), mean ± standard deviation over seeds")
    print("\n".join(lines))
    print(
        "lowest mean test NLL: " + ", ".join(f"{k} {n}/{len(densities)}" for k, n in wins.items())
    )
    for kind, r in results.items():
        merges = [m["merges"] for m in r["models"].values() if "merges" in m]
        line = (f"{kind}: {r['steps']:,} steps, {r['seconds'] / 3600:.2f} h, "
                f"{r['ms_per_step']:.1f} ms a step")  # fmt: skip
        if merges:
            keys = (
                "attempts",
                "accepted",
                "forced",
                "skipped",
                "refused",
                "nonfinite_resets",
                "corrections",
                "fallbacks",
            )
            total = {k: sum(m[k] for m in merges) for k in keys}
            worst = max(m["max_residual"] for m in merges)
            line += (f"; merges {total['accepted']:,} accepted, {total['forced']:,} forced, "
                     f"{total['skipped']:,} skipped, {total['refused']} refused, "
                     f"{total['nonfinite_resets']} reset for non-finite u or v, of "
                     f"{total['attempts']:,}; {total['corrections']:,} corrections "
                     f"({total['fallbacks']} by LU); max inverse residual {worst:.1e}")  # fmt: skip
        print(line)
    # the data panels as densities_2d.py draws them, for the seed whose samples are shown
    first = results[kinds[0]]["seeds"][0]
    data = {d: DATASETS[d](np.random.default_rng(20_000 + first), 20_000) for d in densities}
    samples = {}
    for kind in kinds:
        with np.load(args.out / slug(kind) / "samples_seed_first.npz") as f:
            for d in densities:
                samples[(d, kind)] = f[d]
    print(off_support_table(data, samples, kinds, first))
    path = args.out / "densities_2d_schedule.png"
    plot(path, data, samples, kinds)
    print(f"figure: {path}")


EDGES = np.linspace(-4.5, 4.5, 151)  # the figure's grid


def off_support_share(xy: np.ndarray, empty: np.ndarray) -> float:
    """The share of points ``xy`` [n, 2] that fall in the cells ``empty`` [150, 150] of the
    figure's grid, or outside it, or are not finite."""
    ok = np.isfinite(xy).all(1)
    ix = np.digitize(xy[ok, 0], EDGES) - 1
    iy = np.digitize(xy[ok, 1], EDGES) - 1
    inside = (ix >= 0) & (ix < len(EDGES) - 1) & (iy >= 0) & (iy < len(EDGES) - 1)
    off = (~inside).sum() + empty[ix[inside], iy[inside]].sum()
    return float(off + (~ok).sum()) / len(xy)


def off_support_table(data: dict[str, np.ndarray], samples: dict[tuple[str, str], np.ndarray],
                      kinds: list[str], seed: int, n_data: int = 1_000_000) -> str:  # fmt: skip
    """Fig. 6's "cleaner separation of modes" as a number: the share of a model's samples
    that land where the density has no mass, i.e. in the cells of the figure's 150 × 150 grid
    in which ``n_data`` fresh data points put none (the smears between modes and arms). The
    data row is the same share for the figure's own data points: the floor."""
    n = len(next(iter(data.values())))
    lines = [f"share of samples off the data's support (cells empty of {n_data:,} data points; "
             f"seed {seed}, {n:,} samples)",
             "| density | data (floor) | " + " | ".join(kinds) + " |",
             "|" + "---|" * (2 + len(kinds))]  # fmt: skip
    for d, points in data.items():
        big = DATASETS[d](np.random.default_rng(30_000 + seed), n_data)
        counts, _, _ = np.histogram2d(big[:, 0], big[:, 1], bins=[EDGES, EDGES])
        empty = counts == 0
        cells = [off_support_share(points, empty)]
        cells += [off_support_share(samples[(d, k)], empty) for k in kinds]
        lines.append(f"| {d} | " + " | ".join(f"{100 * c:.2f} %" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[], choices=list(MODELS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=PAPER_STEPS,
                        help=f"training steps (default the paper's {PAPER_STEPS:,})")  # fmt: skip
    parser.add_argument("--checkpoint-every", type=int, default=2_000)
    parser.add_argument("--log-seconds", type=float, default=300.0,
                        help="a log line at most this often (no terminal)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/densities_2d_schedule"))
    parser.add_argument("--report", action="store_true", help="table and figure of what is done")
    args = parser.parse_args()
    if args.steps < 8 or args.checkpoint_every < 1:
        parser.error("--steps must be >= 8 and --checkpoint-every >= 1")
    if not args.models and not args.report:
        parser.error("name --models to train, or --report")
    for kind in args.models:
        train_kind(kind, args)
    if args.report:
        report(args)


if __name__ == "__main__":
    main()
