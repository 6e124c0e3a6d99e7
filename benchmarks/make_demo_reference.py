"""Make the 300 K reference that p4bg ships for the demo: systems/alanine_dipeptide/reference_300K.*

The reference is two things, each from the method that does it well (docs/results.md §8):
- the Ramachandran distribution: (φ, ψ) of the 300 K frames of a replica-exchange run, 5
  temperatures 300-600 K x 2 chains x 4.5 ns, every 0.25 ps (36,000 frames; 602 s here);
- ΔF(φ > 0 vs φ < 0): umbrella sampling on an 18 x 12 (φ, ψ) grid with MBAR on those frames,
  3.77 ± 0.09 kT (355 s here), recorded in the dataset's metadata.json by p4bg.umbrella.

    python -m p4bg.remd --ns 4.5 --chains 2 --n-temperatures 5 --exchange-every-ps 0.25 --seed 0 \\
        --platform Reference --out data/alanine_dipeptide_300K_remd45
    python -m p4bg.umbrella data/alanine_dipeptide_300K_remd45 ...      # optional: the ΔF
    python benchmarks/make_demo_reference.py data/alanine_dipeptide_300K_remd45 \\
        [--umbrella-record docs/results/reference_300K/remd45_umbrella_metadata.json]

The angles are stored as float32 radians with each chain's frame count (the time series the
floor of the KL and the error bars are cut along); the JSON says how they were made.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from analysis.geometry import dihedral
from p4bg.data import load_dataset, load_metadata
from p4bg.files import write_atomic, write_json
from p4bg.systems import load_system

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="the 300 K replica-exchange dataset (p4bg.remd)")
    parser.add_argument(
        "--umbrella-record",
        default=None,
        help="a metadata.json holding the umbrella ΔF, when the dataset's own has none",
    )
    parser.add_argument("--out", default=str(ROOT / "systems" / "alanine_dipeptide"))
    args = parser.parse_args()
    meta = load_metadata(args.dataset)
    if abs(float(meta["temperature_K"]) - 300.0) > 1e-6:
        raise SystemExit(f"{args.dataset}: frames at {meta['temperature_K']} K, not 300 K")
    data = load_dataset(args.dataset)
    system = load_system(meta["system"])
    xyz = data.xyz.astype(np.float64).reshape(len(data.xyz), -1, 3)
    phi = dihedral(xyz, system.phi_atoms).astype(np.float32)
    psi = dihedral(xyz, system.psi_atoms).astype(np.float32)
    lengths = np.array([int(r["frames"]) for r in meta["replicas"]], dtype=np.int64)
    record = (
        meta if args.umbrella_record is None else json.loads(Path(args.umbrella_record).read_text())
    )
    umbrella = record.get("umbrella")
    if not isinstance(umbrella, dict) or umbrella.get("status") != "complete":
        raise SystemExit(
            "no complete umbrella ΔF: run p4bg.umbrella on the dataset first, or "
            "give --umbrella-record"
        )
    out = Path(args.out)
    write_atomic(
        out / "reference_300K.npz",
        lambda tmp: np.savez_compressed(tmp, phi=phi, psi=psi, segment_lengths=lengths),
    )
    plan = umbrella["plan"]
    write_json(
        out / "reference_300K.json",
        {
            "temperature_K": 300.0,
            "system": meta["system"],
            "delta_f": umbrella["delta_f"],
            "delta_f_err": umbrella["delta_f_err"],
            "delta_f_method": f"umbrella sampling on a {plan['windows']} x {plan['psi_windows']} "
            f"(φ, ψ) grid, {plan['ns_per_window']} ns per window, MBAR",
            "delta_f_command": umbrella["command"],
            "frames": len(phi),
            "frames_method": f"replica exchange, {len(meta['temperatures_K'])} temperatures "
            f"{meta['temperatures_K'][0]:g}-{meta['temperatures_K'][-1]:g} K, "
            f"{len(lengths)} chains x {meta['ns_per_temperature_per_chain']} ns, a frame every "
            f"{meta['save_every_ps']} ps",
            "frames_command": meta["command"],
            "phi_positive_fraction_frames": float(np.mean(phi > 0)),
            "made_by": "python benchmarks/make_demo_reference.py " + str(args.dataset),
        },
    )
    print(
        f"wrote {out}/reference_300K.npz ({len(phi):,} frames) and reference_300K.json "
        f"(ΔF {umbrella['delta_f']:.3f} ± {umbrella['delta_f_err']:.3f} kT)"
    )


if __name__ == "__main__":
    main()
