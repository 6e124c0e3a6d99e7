"""Build alanine_dipeptide_ff96.pdb: the atoms of alanine-dipeptide.prmtop at a minimised
structure, the starting point of MD for the field's alanine dipeptide benchmark.

``alanine-dipeptide.prmtop`` is the file openmmtools ships for its ``AlanineDipeptideImplicit``
test system (openmmtools/data/alanine-dipeptide-gbsa, MIT licence, Chodera lab): Amber ff96
made by tleap with mbondi2 Born radii, ACE-ALA-NME, 22 atoms, in the same order as
``systems/alanine_dipeptide``. The works this system is compared with (FAB, TA-BG, CMT) build
their System from it with OBC1 implicit solvent, no cutoff and, for the BG benchmark, no
constraints; ``system.toml`` says the same and ``tests/test_benchmark_systems.py`` checks the
energies against openmmtools' own System.

The positions are those of ``systems/alanine_dipeptide/alanine_dipeptide.pdb`` (the same atoms
in the same order, L-alanine, φ −70°, ψ 140°), minimised with this force field.
Run from anywhere: ``python systems/alanine_dipeptide_ff96/build.py``.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    import openmm
    import openmm.app as app

    prmtop = app.AmberPrmtopFile(str(HERE / "alanine-dipeptide.prmtop"))
    start = app.PDBFile(str(HERE.parent / "alanine_dipeptide" / "alanine_dipeptide.pdb"))
    mine = [(a.residue.name, a.element.symbol) for a in prmtop.topology.atoms()]
    theirs = [(a.residue.name, a.element.symbol) for a in start.topology.atoms()]
    assert mine == theirs, "the prmtop's atoms are not those of systems/alanine_dipeptide"
    system = prmtop.createSystem(nonbondedMethod=app.NoCutoff, implicitSolvent=app.OBC1)
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(start.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 1e-3, 0)
    state = context.getState(getPositions=True, getEnergy=True)
    with open(HERE / "alanine_dipeptide_ff96.pdb", "w") as out:
        out.write(
            "REMARK   1 ACE-ALA-NME, Amber ff96 + OBC1 (alanine-dipeptide.prmtop), "
            "minimised; made by build.py\n"
        )
        app.PDBFile.writeFile(prmtop.topology, state.getPositions(), out)
    print(f"minimised: {state.getPotentialEnergy()}")


if __name__ == "__main__":
    main()
