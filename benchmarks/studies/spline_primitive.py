"""p4bg's rational-quadratic spline against zuko's MonotonicRQSTransform, side by side.

Both evaluate the same family of splines (the test suite checks that they agree on the same
knots); each is timed in its own parameter layout (p4bg: bin axis first; zuko: last). The table
gives ms per call of the spline alone, at the shapes of one coupling of the spline preset
(batch x features x bins), for the forward with its log-slopes, and the inverse with its
log-slopes, each with and without the backward pass. The inverse is p4bg's training direction
(NLL: frames to latent).

    python benchmarks/studies/spline_primitive.py
    python benchmarks/studies/spline_primitive.py --batch 256 --features 30 --bins 8 --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from p4bg.nn.spline import rational_quadratic_spline


def timed(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--bound", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    import zuko

    torch.manual_seed(0)
    shape = (args.batch, args.features)
    k = args.bins
    raw = [torch.randn(n, *shape, requires_grad=True) for n in (k, k, k - 1)]
    x = (2.0 * torch.randn(*shape)).requires_grad_()
    with torch.no_grad():
        y = rational_quadratic_spline(x, *raw, args.bound)[0]
    y.requires_grad_()

    def ours(inp, inverse, backward):
        out, ls = rational_quadratic_spline(inp, *raw, args.bound, inverse=inverse)
        if backward:
            (out.sum() + ls.sum()).backward()

    raw_last = [torch.randn(*shape, n, requires_grad=True) for n in (k, k, k - 1)]

    def theirs(inp, inverse, backward):  # zuko's own parametrisation: its bin axis is the last
        t = zuko.transforms.MonotonicRQSTransform(*raw_last, bound=args.bound)
        out, ls = (t.inv if inverse else t).call_and_ladj(inp)
        if backward:
            (out.sum() + ls.sum()).backward()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"zuko {zuko.__version__}; batch {args.batch} x {args.features} features x {k} bins, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'pass':<28}{'p4bg ms':>10}{'zuko ms':>10}{'zuko/p4bg':>11}")
    for name, inp, inverse in (
        ("forward + log-slopes", x, False),
        ("inverse + log-slopes", y, True),
    ):
        for backward in (False, True):
            a = timed(lambda inp=inp, inv=inverse, b=backward: ours(inp, inv, b), args.repeats)
            b = timed(lambda inp=inp, inv=inverse, b=backward: theirs(inp, inv, b), args.repeats)
            label = name + (", fwd+bwd" if backward else "")
            print(f"{label:<28}{a:>10.3f}{b:>10.3f}{b / a:>10.2f}x")


if __name__ == "__main__":
    main()
