"""How far apart independent MD datasets are on the metrics a Boltzmann generator is held to.

A model is scored against one MD reference: its reweighted ΔF against the reference's, and its
Ramachandran KL against the reference's floor (the reference's first half against its second
half). Both comparisons assume the reference is close to the Boltzmann distribution. This script
measures that assumption with MD alone: for every pair of datasets simulated with other seeds it
prints the KL of one's first half against the other's second half beside each dataset's own
floor, and every dataset's ΔF with its error (block averaging and replica spread, as in
``p4bg.analyze``).

    python benchmarks/studies/md_vs_md.py data/alanine_dipeptide_600K_reference \
        data/alanine_dipeptide_600K_reference_s3 data/alanine_dipeptide_600K_100ns

Each dataset is read whole (``--split all``); ``--max-frames`` thins a large one evenly (every
k-th frame) so that all are compared at similar sizes. No GPU, no torch work: numpy and the
dataset reader only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from analysis.metrics import md_delta_f, ramachandran_kl
from analysis.summary import split_halves


def load(path: str, max_frames: int) -> dict:
    """φ/ψ (radians) of every frame, thinned evenly to at most ``max_frames``, with replica
    segments for the ΔF error."""
    from p4bg.analyze import Reference

    ref = Reference(path, "all", None)
    stride = max(1, -(-len(ref.phi) // max_frames))
    keep = np.arange(0, len(ref.phi), stride)
    position = np.full(len(ref.phi), -1)
    position[keep] = np.arange(len(keep))
    segments = [position[s[s % stride == 0]] for s in ref.segments]
    return {
        "name": Path(path).name,
        "phi": ref.phi[keep],
        "psi": ref.psi[keep],
        "segments": [s for s in segments if len(s)],
        "ns": float(ref.meta.get("ns_total", float("nan"))),
        "seed": ref.meta.get("seed"),
        "stride": stride,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", help="MD dataset folders from p4bg.simulate")
    parser.add_argument(
        "--max-frames", type=int, default=200_000,
        help="thin each dataset evenly to at most this many frames (200,000)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if len(args.datasets) < 2:
        parser.error("give at least two datasets to compare")
    sets = [load(p, args.max_frames) for p in args.datasets]

    print(
        "| dataset | seed | ns | frames used | P(φ>0) | ΔF (kT) | ΔF per replica (kT) "
        "| floor KL (own halves) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for d in sets:
        a, b = split_halves(len(d["phi"]))
        d["floor"] = ramachandran_kl(d["phi"][a], d["psi"][a], d["phi"][b], d["psi"][b])
        f = md_delta_f(d["phi"], d["segments"])
        p = float(np.mean(d["phi"] > 0))
        print(f"| {d['name']} | {d['seed']} | {d['ns']:g} | {len(d['phi']):,} (every "
              f"{d['stride']}) | {100 * p:.2f} % | {f['delta_f']:.2f} ± "
              f"{f['delta_f_err']:.2f} | {', '.join(f'{x:.2f}' for x in f['delta_f_replicas'])} "
              f"| {d['floor']:.3f} |")  # fmt: skip

    print("\nKL(first half of row ‖ second half of column); diagonal: the row's own floor;")
    print("ratio: off-diagonal KL ÷ the row's floor, the number a perfect model would score\n")
    print("| first half of ↓ vs second half of → | " + " | ".join(d["name"] for d in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for r in sets:
        a, _ = split_halves(len(r["phi"]))
        cells = []
        for c in sets:
            _, b = split_halves(len(c["phi"]))
            kl = ramachandran_kl(r["phi"][a], r["psi"][a], c["phi"][b], c["psi"][b])
            cells.append(f"{kl:.3f} ({kl / r['floor']:.2f}×)")
        print(f"| {r['name']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
