"""Paper §4.2, Fig. 3–5, App. F: fit a single invertible linear layer to a linear map y = T x.

Targets: a 32-dim positive definite matrix with eigenvalues close to 1 (``pd32``), a random
rotation in SO(128) (``so128``) and −I₁₀₁ (``neg_identity``, det −1: det = 0 must be crossed).
Every method starts from W = I, sees the same stream of x ~ N(0, I) batches and takes plain SGD
steps at lr 1e-2:

* ``linear``       — W trained directly (a standard linear layer);
* ``P4Inv N=k``    — P4Inv, merged every k steps, forced every 10th attempt, corrected every 50th
                     merge (App. F; penalty Cp = 0.1 for pd32 and so128, 0 for −I, as Table 1);
* ``P4Inv inverse``— P4Inv trained through its inverse: the model is y = W⁻¹ x (Sherman–Morrison).

The loss. With J summed over the n output components, a merged rank-one step moves W along v
with gain ≈ 2·lr·‖v‖² ≈ 2·lr·n (v ~ N(0, I)): about 0.6 for n = 32 but 2 for n = 101 and 2.6 for
n = 128, where SGD oscillates or diverges. The plain layer's gain is 2·lr per direction. With J
*averaged* over components (``--loss mean``, the default) both gains shrink by n: the rank-one
step gains 2·lr·‖v‖²/n ≈ 0.02 and the plain layer 2·lr/n, which is the same expected progress per
step (a random direction carries 1/n of the error). So the mean is the loss under which the two
parameterisations are compared at one learning rate; ``--loss sum`` shows what happens otherwise.

Reached = ‖W − T‖_F / √n < --tol (1e-3). Prints one table per loss and writes the loss,
eigenvalue and −I residual/determinant plots to --out.

    python benchmarks/linear_problems.py                       # all problems, both losses
    python benchmarks/linear_problems.py --problems neg_identity --losses mean
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from p4bg.nn import P4Inv, P4Merger, p4inv_penalty

LR = 1e-2


@dataclass
class Problem:
    name: str
    target: torch.Tensor
    penalty: float
    max_iters: int


def make_problems(max_iters: dict[str, int]) -> dict[str, Problem]:
    gen = torch.Generator().manual_seed(2021)
    q32, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen))
    eig = 1.0 + 0.3 * (2 * torch.rand(32, generator=gen) - 1)  # eigenvalues in [0.7, 1.3]
    pd = q32 @ torch.diag(eig) @ q32.T
    q128, r = torch.linalg.qr(torch.randn(128, 128, generator=gen))
    q128 = q128 * torch.sign(torch.diagonal(r))  # Haar-distributed
    if torch.linalg.det(q128) < 0:
        q128[:, 0] *= -1  # SO(128): det +1
    return {
        "pd32": Problem("pd32", pd, 0.1, max_iters["pd32"]),
        "so128": Problem("so128", q128, 0.1, max_iters["so128"]),
        "neg_identity": Problem("neg_identity", -torch.eye(101), 0.0, max_iters["neg_identity"]),
    }


@dataclass
class Run:
    method: str
    loss_kind: str
    reached: int | None = None  # first iteration with ‖W − T‖/√n < tol
    final_error: float = math.nan
    final_loss: float = math.nan
    residual_final: float = math.nan  # max |I − A Ainv| of the stored inverse
    residual_peak: float = math.nan
    det_sign: float = math.nan  # of the effective map, as the layer tracks it
    det_sign_true: float = math.nan  # by slogdet, for comparison
    merges: str = ""
    seconds: float = 0.0
    curve: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    # (iteration, loss, error, inverse residual, ln|det W|)
    eigs: list[torch.Tensor] = field(default_factory=list)


def run_method(problem: Problem, method: str, loss_kind: str, args: argparse.Namespace) -> Run:
    T = problem.target
    n = T.shape[0]
    torch.manual_seed(args.seed)  # the same v draws for every P4Inv run
    data = torch.Generator().manual_seed(args.seed + 1)  # the same x stream for every method
    x_test = torch.randn(1024, n, generator=torch.Generator().manual_seed(7))
    y_test = x_test @ T.T
    run = Run(method, loss_kind)

    layer: P4Inv | None = None
    if method == "linear":
        W = torch.nn.Parameter(torch.eye(n))
        params = [W]

        def model(x: torch.Tensor) -> torch.Tensor:
            return x @ W.T

        def effective() -> torch.Tensor:
            return W.detach()
    else:
        layer = P4Inv(n, bias=False)
        params = list(layer.parameters())
        through_inverse = method.endswith("inverse")
        every = 1 if through_inverse else int(method.split("N=")[1])

        def model(x: torch.Tensor) -> torch.Tensor:
            return (layer.inverse(x) if through_inverse else layer(x))[0]

        def effective() -> torch.Tensor:
            return layer.weight_inverse() if through_inverse else layer.weight()

    opt = torch.optim.SGD(params, lr=LR)
    merger = (
        P4Merger(layer, opt, every=every, force_every=10, correct_every=50, track_residual=False)
        if layer is not None
        else None
    )

    def reduce(err: torch.Tensor) -> torch.Tensor:
        sq = err.square()
        return sq.mean() if loss_kind == "mean" else sq.sum(1).mean()

    start = time.perf_counter()
    log_every = max(1, problem.max_iters // 400)
    eig_every = max(1, problem.max_iters // 60)
    for it in range(1, problem.max_iters + 1):
        x = torch.randn(args.batch, n, generator=data)
        loss = reduce(model(x) - x @ T.T)
        if layer is not None and problem.penalty:
            loss = loss + problem.penalty * p4inv_penalty(layer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if merger is not None:
            merger.step()
        Weff = effective()
        error = float(torch.linalg.matrix_norm(Weff - T)) / math.sqrt(n)
        if not math.isfinite(error):
            break
        if run.reached is None and error < args.tol:
            run.reached = it
        if it % log_every == 0 or it == 1:
            residual = layer.inverse_residual() if layer is not None else math.nan
            with torch.no_grad():
                test_loss = float(reduce(model(x_test) - y_test))
            logdet = float(torch.linalg.slogdet(Weff)[1])
            run.curve.append((it, test_loss, error, residual, logdet))
            run.residual_peak = max(
                residual, run.residual_peak if math.isfinite(run.residual_peak) else 0.0
            )
        if it % eig_every == 0 or it == 1:
            run.eigs.append(torch.linalg.eigvals(Weff))
        if run.reached is not None and it >= run.reached + args.extra_iters:
            break
    run.seconds = time.perf_counter() - start
    Weff = effective()
    run.final_error = float(torch.linalg.matrix_norm(Weff - T)) / math.sqrt(n)
    with torch.no_grad():
        run.final_loss = float(reduce(model(x_test) - y_test))
    run.det_sign_true = float(torch.linalg.slogdet(Weff)[0])
    if layer is not None:
        run.residual_final = layer.inverse_residual()
        run.det_sign = layer.det_sign()
        t = merger.totals
        counts = (t.accepted, t.skipped, t.forced, t.nonfinite_resets, t.corrections, t.fallbacks)
        run.merges = "/".join(str(c) for c in counts)
    else:
        run.det_sign = run.det_sign_true
    return run


def fmt(value: float, spec: str = ".1e") -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def print_table(problem: Problem, runs: list[Run], tol: float) -> None:
    base = next((r for r in runs if r.method == "linear"), None)
    print(
        f"\n{problem.name} (n = {problem.target.shape[0]}), loss = {runs[0].loss_kind}, "
        f"penalty Cp = {problem.penalty}, lr = {LR}, reached: ‖W−T‖/√n < {tol:g}"
    )
    header = (
        f"  {'method':<14} {'reached at':>10} {'x linear':>8} {'final err':>9} {'final loss':>10}"
        f" {'residual':>9} {'peak res':>9} {'det sign':>8} {'merges a/s/f/nan/corr/fb':>26}"
        f" {'s':>6}"
    )
    print(header)
    for r in runs:
        ratio = (
            f"{r.reached / base.reached:.2f}"
            if base is not None and base.reached and r.reached
            else "—"
        )
        sign = "—" if math.isnan(r.det_sign) else f"{r.det_sign + 0.0:+.0f}"
        if not math.isnan(r.det_sign_true) and r.det_sign != r.det_sign_true:
            sign += "!"
        print(
            f"  {r.method:<14} {r.reached if r.reached else 'not':>10} {ratio:>8}"
            f" {fmt(r.final_error):>9} {fmt(r.final_loss):>10} {fmt(r.residual_final):>9}"
            f" {fmt(r.residual_peak):>9} {sign:>8} {r.merges or '—':>26} {r.seconds:>6.1f}"
        )


def plot(problem: Problem, runs: list[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_kind = runs[0].loss_kind
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        its = [c[0] for c in r.curve]
        axes[0].semilogy(its, [max(c[1], 1e-30) for c in r.curve], label=r.method)
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel(f"test loss ({loss_kind})")
    axes[0].set_title(f"{problem.name}: loss")
    axes[0].legend()
    target_eigs = torch.linalg.eigvals(problem.target)
    for r in runs:
        if r.method not in ("linear", "P4Inv N=1"):
            continue
        pts = torch.stack(r.eigs)
        marker = "." if r.method == "linear" else "s"
        axes[1].scatter(
            pts.real.flatten(),
            pts.imag.flatten(),
            s=2,
            marker=marker,
            alpha=0.4,
            label=f"{r.method} (trajectory)",
        )
        axes[1].scatter(pts[-1].real, pts[-1].imag, marker="x", color="red", s=20)
    axes[1].scatter(
        target_eigs.real,
        target_eigs.imag,
        marker="s",
        facecolors="none",
        edgecolors="black",
        s=30,
        label="target",
    )
    axes[1].set_xlabel("Re λ")
    axes[1].set_ylabel("Im λ")
    axes[1].set_title(f"{problem.name}: eigenvalues of W during training (final: red x)")
    axes[1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = out / f"{problem.name}_{loss_kind}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    if problem.name == "neg_identity":  # paper Fig. 5: residual and |det| while crossing det = 0
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax2 = ax.twinx()
        for r in runs:
            its = [c[0] for c in r.curve]
            if r.method.startswith("P4Inv N"):
                ax.semilogy(
                    its, [max(c[3], 1e-17) for c in r.curve], "k-", label=f"{r.method} residual"
                )
            ax2.plot(its, [c[4] for c in r.curve], label=f"{r.method} ln|det W|")
            if r.reached:
                ax.axvline(r.reached, ls="--", color="gray")
        ax.set_xlabel("iteration")
        ax.set_ylabel("max |I − A·Ainv|")
        ax2.set_ylabel("ln |det W|")
        ax.set_title("−I₁₀₁: inverse residual and determinant (dashed: target reached)")
        fig.legend(loc="center right", fontsize=8)
        fig.tight_layout()
        path = out / f"neg_identity_residual_det_{loss_kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--problems",
        nargs="+",
        default=["pd32", "so128", "neg_identity"],
        choices=["pd32", "so128", "neg_identity"],
    )
    parser.add_argument("--losses", nargs="+", default=["mean", "sum"], choices=["mean", "sum"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument(
        "--max-iters",
        type=int,
        default=None,
        help="cap on iterations for every problem (default: per problem)",
    )
    parser.add_argument(
        "--extra-iters", type=int, default=200, help="iterations to go on after reaching the target"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/linear_problems"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    caps = {"pd32": 30_000, "so128": 150_000, "neg_identity": 100_000}
    if args.max_iters is not None:
        caps = dict.fromkeys(caps, args.max_iters)
    problems = make_problems(caps)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, float64, SGD lr {LR}, batch {args.batch}, seed {args.seed}")
    for loss_kind in args.losses:
        for name in args.problems:
            problem = problems[name]
            methods = ["linear", "P4Inv N=1"]
            if name == "pd32":
                methods += ["P4Inv N=10", "P4Inv N=50"]
            methods.append("P4Inv inverse")
            runs = [run_method(problem, m, loss_kind, args) for m in methods]
            print_table(problem, runs, args.tol)
            if not args.no_plots:
                for path in plot(problem, runs, args.out):
                    print(f"  wrote {path}")
    print(
        "\nx linear: iterations to reach the target relative to the plain linear layer. residual: "
        "max |I − A·Ainv| of the stored inverse at the end (peak: largest seen). det sign: as the "
        "layer tracks it ('!' if slogdet disagrees). merges: accepted/skipped/forced/non-finite "
        "resets/corrections/exact fallbacks."
    )


if __name__ == "__main__":
    main()
