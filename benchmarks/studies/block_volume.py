"""The rigid block's volume factor (issue 27): is log J(c) constant, and is the formula right?

The transform places the 5 rigid-block atoms as ``x_block = R (ref + B c) + t``. The Jacobian
of (c, rotation vector ω, t) -> x_block is ``J(c) · g(ω)`` with ``J(c) = |det[T, Ω(ref + B c),
B]|`` and ``g(ω) = 2(1 − cos|ω|)/|ω|²`` (the Haar density of the rotation vector), so the
Boltzmann density with rigid motion integrated out is ``exp(−u) · J(c)`` in c. This prints

1. log J(c) − log J(0) over the MD frames of a dataset (mean, std, range; float32 error);
2. the closed form of :func:`p4bg.geometry.block_log_volume` against the 15 × 15 determinant
   ``log|det[T, Ω(y), B]|`` (which must differ by the constant log J(0) only);
3. for random (c, ω, t), log|det| of the autograd Jacobian (float64) of (c, ω, t) -> x_block
   against log J(c) + log g(ω).

    OMP_NUM_THREADS=1 python -m p4bg.simulate --ns 0.2 --out /tmp/bv_data --no-progress
    OMP_NUM_THREADS=1 python benchmarks/studies/block_volume.py --data /tmp/bv_data
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch.autograd.functional import jacobian

from p4bg.coordinates import MixedCoordinateTransform
from p4bg.data import load_dataset, load_metadata
from p4bg.geometry import block_log_volume, kabsch_align
from p4bg.systems import load_system


def frame_log_volume(block: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """log|det[T, Ω(y), B]| of blocks ``y`` [batch, k, 3] nm by a 15 × 15 determinant."""
    k = block.shape[1]
    eye = torch.eye(3, dtype=block.dtype)
    T = eye.repeat(k, 1).expand(len(block), -1, -1)  # [batch, 3k, 3]
    omega = torch.stack(
        [torch.cross(eye[i].expand_as(block), block, dim=-1).reshape(len(block), -1)
         for i in range(3)], -1)  # fmt: skip
    M = torch.cat([T, omega, basis.expand(len(block), -1, -1)], -1)
    return torch.linalg.slogdet(M)[1]


def rotation(omega: torch.Tensor) -> torch.Tensor:
    """Rotation matrix exp([ω]×) of a rotation vector ω [3] rad."""
    zero = omega.new_zeros(())
    skew = torch.stack([
        torch.stack([zero, -omega[2], omega[1]]),
        torch.stack([omega[2], zero, -omega[0]]),
        torch.stack([-omega[1], omega[0], zero]),
    ])  # fmt: skip
    return torch.linalg.matrix_exp(skew)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/tmp/bv_data", help="dataset folder (p4bg.simulate)")
    parser.add_argument("--draws", type=int, default=20, help="random (c, ω, t) for check 3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    data = load_dataset(args.data)
    system = load_system(load_metadata(args.data)["system"])
    xyz = data.xyz.astype(np.float64)
    t = MixedCoordinateTransform(system, xyz[data.split["train"]])
    ref, basis = t.reference, t.basis
    frames = torch.from_numpy(xyz).reshape(len(xyz), -1, 3)
    aligned = kabsch_align(frames[:, t.rigid_index], ref)
    k = len(t.rigid)

    log_j = block_log_volume(aligned, ref)
    log_j32 = block_log_volume(aligned.float(), ref.float()).double()
    print(f"1. log J(c) - log J(0) over {len(xyz)} MD frames of {args.data} ({system.name}):")
    print(f"   {'split':<6} {'frames':>7} {'mean':>9} {'std':>8} {'min':>9} {'max':>9}")
    for name, idx in [("all", np.arange(len(xyz))), *data.split.items()]:
        v = log_j[torch.from_numpy(idx)]
        print(f"   {name:<6} {len(v):>7d} {float(v.mean()):>9.4f} {float(v.std()):>8.4f} "
              f"{float(v.min()):>9.4f} {float(v.max()):>9.4f}")  # fmt: skip
    print(f"   float32 against float64: max |diff| = {float((log_j32 - log_j).abs().max()):.1e}")

    det15 = frame_log_volume(aligned, basis)
    inertia = torch.trace(ref.T @ ref) * torch.eye(3, dtype=ref.dtype) - ref.T @ ref
    const = 1.5 * math.log(k) + 0.5 * float(torch.logdet(inertia))
    dev = det15 - log_j - const
    print("2. closed form against the 15 x 15 determinant log|det[T, Omega(y), B]|:")
    print(
        f"   log J(0) = 1.5 log k + 1/2 log det I_ref = {const:.6f};  "
        f"max |log det15 - (log J(c) - log J(0)) - log J(0)| = {float(dev.abs().max()):.1e}"
    )

    print(f"3. autograd Jacobian of (c, omega, t) -> R (ref + B c) + t, {args.draws} draws:")
    print(f"   {'|omega|':>7} {'log|det| autograd':>18} {'log J(c) + log g':>17} {'diff':>8}")
    worst, without = 0.0, []
    for i in range(args.draws):
        z = torch.randn(t.n_rigid_latent, dtype=torch.float64)
        c = t.c_mean + (z * t.pca_std) @ t.pca_vectors.T
        omega = torch.randn(3, dtype=torch.float64)
        omega = omega / omega.norm() * math.pi * float(torch.rand(())) ** (1 / 3)
        v = torch.cat([c, omega, torch.randn(3, dtype=torch.float64)])

        def block(v: torch.Tensor) -> torch.Tensor:
            y = ref + (v[:9] @ basis.T).reshape(k, 3)
            return (y @ rotation(v[9:12]).T + v[12:]).reshape(-1)

        logdet = float(torch.linalg.slogdet(jacobian(block, v))[1])
        theta = float(omega.norm())
        y = (ref + (c @ basis.T).reshape(k, 3)).unsqueeze(0)
        expected = float(frame_log_volume(y, basis)[0]) + math.log(
            2 * (1 - math.cos(theta)) / theta**2
        )
        worst = max(worst, abs(logdet - expected))
        without.append(logdet - math.log(2 * (1 - math.cos(theta)) / theta**2))
        if i < 5:
            print(f"   {theta:>7.3f} {logdet:>18.10f} {expected:>17.10f} {logdet - expected:>8.1e}")
    print(
        f"   max |diff| over {args.draws} draws: {worst:.1e};  without J(c), "
        f"log|det| - log g varies by std {float(np.std(without)):.4f} over the draws"
    )


if __name__ == "__main__":
    main()
