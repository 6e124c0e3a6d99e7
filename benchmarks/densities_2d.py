"""Paper §4.3, Fig. 6 and 8, App. G: density estimation of FFJORD's 2-D toy distributions.

Models (forward = latent -> data, as every p4bg flow; training maximises the likelihood of data,
so it runs data -> latent through each model's inverse):

* ``RNVP``          — 5 layers of (coupling, swap, coupling, swap), conditioners 2×6 tanh:
                      1,230 parameters (``p4bg.flows.build_rnvp_2d``);
* ``P4Inv``         — 100 blocks of P4Inv, Bent, P4Inv, inverse Bent, P4Inv at the identity:
                      1,200 parameters; trained with the P4Inv layers' forward products (the
                      stack is used inverted, so data -> latent applies W x);
* ``P4Inv via inv`` — the same stack trained through the layers' inverses W⁻¹ (Sherman–Morrison),
                      the paper's Fig. 8.

Training (App. G): Adam, lr 5e-3 halved after every eighth of the run ("epoch"), batch 200;
P4Inv merges every N = 10 steps, forced every 10th, corrected every 50th merge, no penalty, Adam
state reset at merges. The paper runs 8 × 20,000 steps; ``--steps`` sets the total (default
4,000, a few minutes per model here). Test NLL (nats) on 20,000 fresh samples of each density.
Prints the table and writes the figure (data and samples of every model) to ``--out``.

    python benchmarks/densities_2d.py                         # all 8 densities, 4,000 steps
    python benchmarks/densities_2d.py --datasets moons rings --steps 500 --out /tmp/d2
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from p4bg.flows import build_bent_flow, build_rnvp_2d, count_parameters
from p4bg.nn import Inverse, MergeStats, P4Merger, Sequential

# ----------------------------------------------------------------------------- the densities
# FFJORD's toy distributions (Grathwohl et al., 2018), written from their descriptions: each
# returns n points, shape (n, 2), scaled to roughly [-4, 4]².


def eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    angles = rng.integers(0, 8, n) * (2 * np.pi / 8)
    centres = 4.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    return (centres + 0.5 * rng.standard_normal((n, 2))) / math.sqrt(2)


def checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return 2.0 * np.stack([x1, x2], 1)


def two_spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.sqrt(rng.uniform(size=n)) * 3 * np.pi  # 540° of arc
    sign = np.where(rng.uniform(size=n) < 0.5, 1.0, -1.0)
    xy = np.stack([-np.cos(t) * t, np.sin(t) * t], 1) * sign[:, None]
    return (xy + 0.5 * rng.uniform(size=(n, 2))) / 3.0


def pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    arms, rate = 5, 0.25
    arm = rng.integers(0, arms, n)
    radial = 1.0 + 0.3 * rng.standard_normal(n)
    tangential = 0.05 * rng.standard_normal(n)
    angle = arm * (2 * np.pi / arms) + rate * np.exp(radial)
    c, s = np.cos(angle), np.sin(angle)
    return 2.0 * np.stack([c * radial - s * tangential, s * radial + c * tangential], 1)


def rings(rng: np.random.Generator, n: int) -> np.ndarray:
    radius = rng.choice([0.5, 1.0, 1.5, 2.0], n) * 1.5
    angle = rng.uniform(0, 2 * np.pi, n)
    xy = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    return xy + 0.08 * rng.standard_normal((n, 2))


def moons(rng: np.random.Generator, n: int) -> np.ndarray:
    upper = rng.uniform(size=n) < 0.5
    t = rng.uniform(0, np.pi, n)
    xy = np.where(upper[:, None], np.stack([np.cos(t), np.sin(t)], 1),
                  np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1))  # fmt: skip
    xy = xy + 0.1 * rng.standard_normal((n, 2))
    return 2.0 * xy + np.array([-1.0, -0.2])


def swiss_roll(rng: np.random.Generator, n: int) -> np.ndarray:
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    xy = np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.standard_normal((n, 2))
    return xy / 5.0


def circles(rng: np.random.Generator, n: int) -> np.ndarray:
    radius = np.where(rng.uniform(size=n) < 0.5, 1.0, 0.5)
    angle = rng.uniform(0, 2 * np.pi, n)
    xy = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    return 3.0 * (xy + 0.08 * rng.standard_normal((n, 2)))


DATASETS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
    "pinwheel": pinwheel,
    "rings": rings,
    "moons": moons,
    "swissroll": swiss_roll,
    "circles": circles,
}


# -------------------------------------------------------------------------------- the models
def build_model(name: str) -> Sequential | Inverse:
    if name == "RNVP":
        return build_rnvp_2d()
    if name == "P4Inv":
        return Inverse(build_bent_flow(2, 100))  # data -> latent applies the layers' W x
    if name == "P4Inv via inv":
        return build_bent_flow(2, 100)  # data -> latent applies W⁻¹
    raise ValueError(name)


MODELS = ("RNVP", "P4Inv", "P4Inv via inv")
LOG_2PI = math.log(2 * math.pi)


def log_prob(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    z, ladj = model.inverse(x)
    return -0.5 * z.square().sum(1) - LOG_2PI + ladj


def train(
    model: torch.nn.Module,
    sampler: Callable[[np.random.Generator, int], np.ndarray],
    steps: int,
    seed: int,
    progress: bool,
    label: str,
) -> dict[str, float]:
    """App. G's recipe for ``steps`` steps; returns seconds, final train NLL and merge counts."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    merger = P4Merger(model, optimizer, every=10, force_every=10, correct_every=50)
    epoch = max(1, steps // 8)
    start = time.perf_counter()
    skipped = 0
    recent: list[float] = []
    totals = MergeStats()
    for step in tqdm(range(steps), desc=label, disable=not progress, leave=False):
        if step and step % epoch == 0:
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
        x = torch.from_numpy(sampler(rng, 200)).float()
        loss = -log_prob(model, x).mean()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            skipped += 1
            continue
        loss.backward()
        optimizer.step()
        event = merger.step()
        if event is not None:
            totals.add(event)
        recent = [*recent[-199:], float(loss.detach())]
    return {
        "seconds": time.perf_counter() - start,
        "train_nll": float(np.mean(recent)) if recent else math.nan,
        "skipped": skipped,
        "merges": totals,
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, sampler: Callable, seed: int, n: int = 20_000
) -> tuple[float, np.ndarray]:
    """Test NLL (nats) on ``n`` fresh points, and ``n`` samples of the model."""
    x = torch.from_numpy(sampler(np.random.default_rng(10_000 + seed), n)).float()
    nll = float(-log_prob(model, x).mean())
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    samples, _ = model(z)
    return nll, samples.numpy()


def plot(path: Path, data: dict[str, np.ndarray], samples: dict[tuple[str, str], np.ndarray],
         models: list[str]) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data)
    fig, axes = plt.subplots(len(names), 1 + len(models),
                             figsize=(2.2 * (1 + len(models)), 2.2 * len(names)),
                             squeeze=False)  # fmt: skip
    edges = np.linspace(-4.5, 4.5, 151)
    for row, name in enumerate(names):
        panels = [("data", data[name])] + [(m, samples[(name, m)]) for m in models]
        for col, (title, xy) in enumerate(panels):
            ax = axes[row, col]
            ok = np.isfinite(xy).all(1)
            ax.hist2d(xy[ok, 0], xy[ok, 1], bins=[edges, edges], cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=10)
            if col == 0:
                ax.set_ylabel(name, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=4000, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/densities_2d"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    torch.manual_seed(args.seed)
    counts = {m: count_parameters(build_model(m))["total"] for m in args.models}
    print("parameters: " + ", ".join(f"{m} {c:,}" for m, c in counts.items()))
    print(f"{args.steps} steps per model, batch 200, Adam lr 5e-3 halved every "
          f"{max(1, args.steps // 8)} steps; test NLL (nats) on 20,000 fresh points")  # fmt: skip
    data, samples, rows = {}, {}, []
    for name in args.datasets:
        sampler = DATASETS[name]
        data[name] = sampler(np.random.default_rng(20_000 + args.seed), 20_000)
        row = {"dataset": name}
        for m in args.models:
            torch.manual_seed(args.seed)
            model = build_model(m)
            info = train(model, sampler, args.steps, args.seed, not args.no_progress,
                         f"{name} {m}")  # fmt: skip
            nll, samples[(name, m)] = evaluate(model, sampler, args.seed)
            row[m] = nll
            row[f"{m} s"] = info["seconds"]
            merges = info["merges"]
            if merges.attempts:
                row[f"{m} merges"] = (f"{merges.accepted}/{merges.attempts} merges accepted, "
                                      f"max |I - A·A⁻¹| {merges.max_residual:.1e}")  # fmt: skip
        rows.append(row)
        cells = " | ".join(f"{row[m]:8.3f} ({row[f'{m} s']:.0f} s)" for m in args.models)
        print(f"| {name:12s} | {cells} |", flush=True)
    header = "| dataset      | " + " | ".join(f"{m:>16s}" for m in args.models) + " |"
    print("\ntest NLL (nats; lower is better), wall seconds of training in brackets")
    print(header)
    print("|" + "---|" * (1 + len(args.models)))
    for row in rows:
        cells = " | ".join(f"{row[m]:8.3f} ({row[f'{m} s']:4.0f} s)" for m in args.models)
        print(f"| {row['dataset']:12s} | {cells} |")
    for row in rows:
        for m in args.models:
            if f"{m} merges" in row:
                print(f"{row['dataset']} {m}: {row[f'{m} merges']}")
    if len(args.models) > 1:
        base = args.models[0]
        for m in args.models[1:]:
            ratio = np.mean([row[f"{m} s"] / row[f"{base} s"] for row in rows])
            better = sum(row[m] < row[base] for row in rows)
            print(f"{m} vs {base}: lower test NLL on {better}/{len(rows)} densities; "
                  f"training time ratio {ratio:.2f}")  # fmt: skip
    path = args.out / "densities_2d.png"
    plot(path, data, samples, args.models)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
