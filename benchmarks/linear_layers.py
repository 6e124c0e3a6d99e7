"""Paper Fig. 2 on this machine: invertible linear layers with log-determinant, three ways.

For n in --sizes and batch --batch it times, in one run,
  (a) forward + ladj, (b) inverse + ladj   (inference, under torch.no_grad), and
  (c) one training step: forward, loss 0.5·mean‖y‖² − mean ladj, backward, Adam step,
for a standard dense layer (torch.linalg.slogdet, and torch.linalg.inv for the inverse, every
call), an LU-parameterised layer (ladj from U's diagonal, inverse by triangular solves) and P4Inv.
A bare ``x @ A.T`` of the same size is printed beside them: the memory-bound floor of any O(n²)
layer. Medians over repeats; ratios are computed from numbers measured in this run.

    python benchmarks/linear_layers.py                      # n = 64, 512, 4096, batch 32
    python benchmarks/linear_layers.py --sizes 64 256 --budget 0.2   # quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from p4bg.nn import DenseLinear, LULinear, P4Inv


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def median_time(
    fn: Callable[[], object], device: torch.device, budget: float, max_reps: int
) -> float:
    """Median wall time of ``fn`` in seconds: 2 warm-up calls, then repeats until ``budget``
    seconds are spent (at least 3, at most ``max_reps``)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_layers(n: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.nn.Module]:
    """The three layers, all holding the same dense, well-conditioned random matrix W."""
    gen = torch.Generator().manual_seed(n)
    W = torch.eye(n, dtype=torch.float64) + torch.randn(
        n, n, generator=gen, dtype=torch.float64
    ) / (4 * n**0.5)
    standard = DenseLinear(n, weight=W, dtype=dtype, device=device)

    lu = LULinear(n, dtype=dtype, device=device)
    P, L, U = torch.linalg.lu(W)
    with torch.no_grad():
        lu.lower.copy_(L)
        lu.upper.copy_(U)
        lu.log_s.copy_(U.diagonal().abs().log())
        lu.sign_s.copy_(U.diagonal().sign())
        perm = P.argmax(dim=1)  # (P h)_i = h_perm[i]
        lu.perm.copy_(perm)
        lu.perm_inv.copy_(torch.argsort(perm))

    p4 = P4Inv(n, dtype=dtype, device=device)
    sign, logabsdet = torch.linalg.slogdet(W)
    with torch.no_grad():
        p4.A.copy_(W)
        p4.Ainv.copy_(torch.linalg.inv(W))
        p4.log_abs_det_A.copy_(logabsdet)
        p4.sign_A.copy_(sign)
    return {"standard": standard, "LU": lu, "P4Inv": p4}


def check_agreement(layers: dict[str, torch.nn.Module], x: torch.Tensor) -> float:
    """Largest relative disagreement of outputs and ladj between the layers: they hold the same
    W, so this must be at rounding level, or the timings compare different work."""
    with torch.no_grad():
        y_ref, l_ref = layers["standard"](x)
        worst = 0.0
        for layer in layers.values():
            y, ladj = layer(x)
            worst = max(worst, float((y - y_ref).abs().max() / y_ref.abs().max()))
            worst = max(worst, float((ladj - l_ref).abs().max() / (1 + l_ref.abs().max())))
            x_back, _ = layer.inverse(y)
            worst = max(worst, float((x_back - x).abs().max() / x.abs().max()))
    return worst


def bench_size(
    n: int, args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, float]]:
    dtype = getattr(torch, args.dtype)
    layers = make_layers(n, dtype, device)
    x = torch.randn(args.batch, n, dtype=dtype, device=device)
    A = layers["P4Inv"].A.to(dtype)
    results: dict[str, dict[str, float]] = {"agreement": {"max": check_agreement(layers, x)}}
    with torch.no_grad():
        t = median_time(lambda: x @ A.T, device, args.budget, args.max_reps)
    results["matmul"] = {"forward": t, "inverse": t, "train step": float("nan")}

    for name, layer in layers.items():
        opt = torch.optim.Adam(layer.parameters(), lr=1e-4)
        with torch.no_grad():
            y = layer(x)[0]

        def forward(layer: torch.nn.Module = layer) -> None:
            with torch.no_grad():
                layer(x)

        def inverse(layer: torch.nn.Module = layer, y: torch.Tensor = y) -> None:
            with torch.no_grad():
                layer.inverse(y)

        def train(layer: torch.nn.Module = layer, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            out, ladj = layer(x)
            (0.5 * out.square().sum(1).mean() - ladj.mean()).backward()
            opt.step()

        results[name] = {
            "forward": median_time(forward, device, args.budget, args.max_reps),
            "inverse": median_time(inverse, device, args.budget, args.max_reps),
            "train step": median_time(train, device, args.budget, args.max_reps),
        }
        if name == "standard":  # a layer that computes inv + slogdet at every call, forward too

            def forward_inv(layer: torch.nn.Module = layer) -> None:
                with torch.no_grad():
                    layer(x)
                    torch.linalg.inv(layer.weight)

            results[name]["forward*"] = median_time(forward_inv, device, args.budget, args.max_reps)
        else:
            results[name]["forward*"] = results[name]["forward"]
    results["matmul"]["forward*"] = results["matmul"]["forward"]
    return results


def fmt_ms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "—"
    return f"{seconds * 1e3:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[64, 512, 4096], help="matrix sizes n"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--budget", type=float, default=2.0, help="seconds of repeats per measurement"
    )
    parser.add_argument("--max-reps", type=int, default=200)
    args = parser.parse_args(argv)
    if args.batch < 1 or any(n < 2 for n in args.sizes):
        parser.error("--batch must be >= 1 and every size >= 2")
    device = pick_device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"{args.dtype}, batch {args.batch}; median milliseconds per call"
    )
    header = (
        f"{'n':>5} {'operation':<12} {'x@A.T':>9} {'standard':>10} {'LU':>10} {'P4Inv':>9}"
        f" {'std/P4Inv':>10} {'LU/P4Inv':>9} {'P4Inv/x@A.T':>12}"
    )
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        res = bench_size(n, args, device)
        if res["agreement"]["max"] > (1e-3 if args.dtype == "float32" else 1e-9):
            raise SystemExit(
                f"n={n}: the layers disagree ({res['agreement']['max']:.2e}); not timing"
            )
        for op in ("forward", "forward*", "inverse", "train step"):
            p4 = res["P4Inv"][op]
            print(
                f"{n:>5} {op:<12} {fmt_ms(res['matmul'][op]):>9} {fmt_ms(res['standard'][op]):>10}"
                f" {fmt_ms(res['LU'][op]):>10} {fmt_ms(p4):>9}"
                f" {res['standard'][op] / p4:>9.1f}x {res['LU'][op] / p4:>8.1f}x"
                + (f" {p4 / res['matmul'][op]:>11.2f}x" if op != "train step" else f" {'—':>12}")
            )
    print(
        "\nstd/P4Inv and LU/P4Inv: how many times faster P4Inv is. P4Inv/x@A.T: P4Inv's cost over "
        "one bare matrix product of the same size (1.0 = the memory-bound limit). forward*: the "
        "standard layer also computes torch.linalg.inv at every call (inv + slogdet each call), "
        "as a layer that keeps no inverse between calls must."
    )


if __name__ == "__main__":
    main()
