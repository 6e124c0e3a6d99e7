"""A system folder, ``systems/<name>/`` (a PDB and a ``system.toml``), loaded into one object.

Adding a molecule means adding a folder: the PDB fixes the atom order, ``system.toml`` the force
field, the simulation defaults and the coordinate layout (Z-matrix, rigid block, φ/ψ atoms).
Everything the rest of p4bg needs about a system comes from :func:`load_system`.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p4bg.units import R
from p4bg.zmatrix import LayoutError, build_layout, central_dihedrals, chirality_centres

# Where a system named by its folder name is looked for, in order: ./systems/ (a user's own, in
# the working directory), the repository's systems/ (a clone, or an editable install), and the
# copy of it inside an installed wheel (pyproject.toml packs systems/ as p4bg/builtin_systems).
SYSTEMS_DIR = Path(__file__).resolve().parents[2] / "systems"
INSTALLED_SYSTEMS_DIR = Path(__file__).resolve().parents[1] / "builtin_systems"


def system_dirs() -> list[Path]:
    """The folders holding systems by name, first match wins (see above)."""
    found = []
    for folder in (Path.cwd() / "systems", SYSTEMS_DIR, INSTALLED_SYSTEMS_DIR):
        if folder.is_dir() and folder.resolve() not in [f.resolve() for f in found]:
            found.append(folder)
    return found


__all__ = [
    "INSTALLED_SYSTEMS_DIR",
    "SYSTEMS_DIR",
    "MolecularSystem",
    "SystemConfigError",
    "available_platforms",
    "load_system",
    "measure_platforms",
    "system_dirs",
]


class SystemConfigError(ValueError):
    """A system folder or its ``system.toml`` is missing or malformed."""


_NONBONDED = ("NoCutoff", "CutoffNonPeriodic", "CutoffPeriodic", "Ewald", "PME", "LJPME")
# AllBonds and HAngles would constrain distances that are not Z-matrix bonds (ring closures,
# H-X-H), which the coordinate transform cannot hold fixed (p4bg.constraints)
_CONSTRAINTS = ("None", "HBonds")
_INTEGRATORS = ("LangevinMiddle", "Langevin")
_IMPLICIT = ("None", "HCT", "OBC1", "OBC2", "GBn", "GBn2")

# key -> (type, required); sections are dicts of the same shape.
_SCHEMA: dict[str, Any] = {
    "name": (str, True),
    "pdb": (str, True),
    "forcefield": {
        "files": (list, False),  # OpenMM force-field XML files; or:
        "prmtop": (str, False),  # an Amber prmtop in the folder (atom order = the PDB's)
        "implicit_solvent": (str, False),  # with a prmtop: the GB model
        "nonbonded_method": (str, True),
        "constraints": (str, True),
    },
    "simulation": {
        "temperature": (float, True),
        "integrator": (str, True),
        "timestep_fs": (float, True),
        "friction_per_ps": (float, True),
    },
    "coordinates": {"rigid_atoms": (list, True), "z_matrix": (list, True)},
    "dihedrals": {"phi": (list, True), "psi": (list, True)},
}
# Without them the layout comes from the topology (p4bg.zmatrix) and φ/ψ are the central
# residue's backbone torsions.
_OPTIONAL_SECTIONS = ("coordinates", "dihedrals")


@dataclass
class MolecularSystem:
    """A molecule, its force field and its coordinate layout.

    Units: positions nm, temperature K, kT kJ/mol, timestep fs, friction 1/ps.
    Atom indices are 0-based in the PDB's order.
    """

    name: str
    path: Path
    topology: Any  # mdtraj.Topology
    openmm_topology: Any  # openmm.app.Topology
    openmm_system: Any  # openmm.System
    temperature: float
    positions: np.ndarray  # [n_atoms, 3], nm, float64 (the minimised PDB structure)
    z_matrix: np.ndarray  # [n_internal, 4] int: atom, bond partner, angle partner, torsion partner
    rigid_atoms: np.ndarray  # [n_rigid] int
    phi_atoms: tuple[int, int, int, int]
    psi_atoms: tuple[int, int, int, int]
    forcefield_files: list[str] = field(default_factory=list)
    prmtop: str | None = None  # the Amber prmtop the System comes from, if not from XML files
    implicit_solvent: str = "None"  # with a prmtop: OpenMM's GB model
    nonbonded_method: str = "NoCutoff"
    constraints: str = "None"
    integrator: str = "LangevinMiddle"
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def dim(self) -> int:
        """Cartesian dimension 3·n_atoms (66 for alanine dipeptide)."""
        return 3 * self.n_atoms

    @property
    def constrained_bonds(self) -> dict[tuple[int, int], float]:
        """The distances the System constrains (``constraints`` = "HBonds"): ``{(i, j): nm}``
        with i < j; empty without constraints."""
        out = {}
        for k in range(self.openmm_system.getNumConstraints()):
            i, j, length = self.openmm_system.getConstraintParameters(k)
            out[(min(i, j), max(i, j))] = float(getattr(length, "_value", length))
        return out

    @property
    def kT(self) -> float:
        """Thermal energy at ``temperature``, kJ/mol."""
        return R * self.temperature

    def is_l(self, xyz: np.ndarray) -> np.ndarray:
        """True for the frames in which every residue with a CB is an L amino acid.

        xyz: positions, shape (frames, n_atoms, 3), nm. Non-finite frames are False."""
        from analysis.geometry import is_l_chirality

        out = np.ones(len(xyz), dtype=bool)
        for n, ca, c, cb in chirality_centres(self.topology):
            out &= is_l_chirality(xyz, n, ca, c, cb)
        return out

    def make_integrator(self, temperature: float | None = None, seed: int = 0) -> Any:
        """A fresh OpenMM integrator as ``system.toml`` specifies, with its random seed set."""
        import openmm

        cls = {
            "LangevinMiddle": openmm.LangevinMiddleIntegrator,
            "Langevin": openmm.LangevinIntegrator,
        }[self.integrator]
        integrator = cls(
            self.temperature if temperature is None else temperature,
            self.friction_per_ps,
            self.timestep_fs * 1e-3,
        )
        integrator.setRandomNumberSeed(int(seed))
        return integrator


def _fail(file: Path, key: str, problem: str) -> SystemConfigError:
    return SystemConfigError(f"{file}: key '{key}' {problem}; fix the file (see docs/design.md §4)")


def _validate(data: dict, schema: dict, file: Path, prefix: str = "") -> None:
    for key in data:
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise _fail(file, prefix + key, f"is not a known key (known: {known})")
    for key, spec in schema.items():
        full = prefix + key
        if isinstance(spec, dict):
            if key in _OPTIONAL_SECTIONS and key not in data:
                continue
            section = data.get(key)
            if not isinstance(section, dict):
                raise _fail(file, full, "is missing or is not a [section]")
            _validate(section, spec, file, full + ".")
            continue
        kind, required = spec
        if key not in data:
            if required:
                raise _fail(file, full, "is missing")
            continue
        value = data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            data[key] = value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _fail(file, full, f"must be a {kind.__name__}, got {value!r}")


def _int_list(value: list, file: Path, key: str, n_atoms: int, length: int | None = None) -> list:
    if length is not None and len(value) != length:
        raise _fail(file, key, f"must list {length} atom indices, got {len(value)}")
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n_atoms:
            raise _fail(file, key, f"has {v!r}, not an atom index in [0, {n_atoms})")
    return value


def _resolve(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.is_dir():
        return candidate.resolve()
    if candidate.name == "system.toml" and candidate.is_file():
        return candidate.parent.resolve()
    dirs = system_dirs()
    for base in dirs:
        if (base / str(name_or_path) / "system.toml").is_file():
            return (base / str(name_or_path)).resolve()
    available = sorted({p.name for base in dirs for p in base.iterdir()
                        if (p / "system.toml").is_file()})  # fmt: skip
    raise SystemConfigError(
        f"unknown system {str(name_or_path)!r}: not a folder, and not in "
        f"{', '.join(str(d) for d in dirs) or 'any systems folder'}; available systems: "
        f"{', '.join(available) or 'none'}"
    )


def load_system(name_or_path: str | Path, temperature: float | None = None) -> MolecularSystem:
    """Load ``systems/<name>/`` (or a folder path) into a :class:`MolecularSystem`.

    ``temperature`` (K) overrides the file's default. Raises :class:`SystemConfigError` naming
    the file and key for anything missing or malformed.
    """
    import mdtraj
    import openmm.app as app

    folder = _resolve(name_or_path)
    file = folder / "system.toml"
    if not file.is_file():
        raise SystemConfigError(
            f"{folder}: no system.toml; a system folder needs one (docs/design.md §4)"
        )
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SystemConfigError(f"{file}: not valid TOML ({err})") from err
    _validate(data, _SCHEMA, file)

    pdb_path = folder / data["pdb"]
    if not pdb_path.is_file():
        raise _fail(file, "pdb", f"names {pdb_path}, which does not exist")
    ff, sim, coords = data["forcefield"], data["simulation"], data.get("coordinates")
    if ff["nonbonded_method"] not in _NONBONDED:
        raise _fail(file, "forcefield.nonbonded_method", f"must be one of {_NONBONDED}")
    if ff["constraints"] not in _CONSTRAINTS:
        raise _fail(file, "forcefield.constraints", f"must be one of {_CONSTRAINTS}")
    if ("files" in ff) == ("prmtop" in ff):
        raise _fail(file, "forcefield", "must name either files (OpenMM XML) or a prmtop")
    if "implicit_solvent" in ff and "prmtop" not in ff:
        raise _fail(
            file,
            "forcefield.implicit_solvent",
            "goes with a prmtop; with XML files name an implicit-solvent file instead",
        )
    if ff.get("implicit_solvent", "None") not in _IMPLICIT:
        raise _fail(file, "forcefield.implicit_solvent", f"must be one of {_IMPLICIT}")
    if "prmtop" in ff and not (folder / ff["prmtop"]).is_file():
        missing = folder / ff["prmtop"]
        raise _fail(file, "forcefield.prmtop", f"names {missing}, which does not exist")
    if sim["integrator"] not in _INTEGRATORS:
        raise _fail(file, "simulation.integrator", f"must be one of {_INTEGRATORS}")
    for key in ("temperature", "timestep_fs", "friction_per_ps"):
        if not sim[key] > 0:
            raise _fail(file, f"simulation.{key}", f"must be > 0, got {sim[key]}")
    if temperature is not None and not temperature > 0:
        raise SystemConfigError(f"temperature must be > 0 K, got {temperature}")

    pdb = app.PDBFile(str(pdb_path))
    n_atoms = pdb.topology.getNumAtoms()
    constraints = None if ff["constraints"] == "None" else getattr(app, ff["constraints"])
    if "prmtop" in ff:
        system, omm_topology = _prmtop_system(
            folder / ff["prmtop"], pdb.topology, file, ff, constraints
        )
    else:
        omm_topology = pdb.topology
        forcefield = app.ForceField(*ff["files"])
        system = forcefield.createSystem(
            pdb.topology,
            nonbondedMethod=getattr(app, ff["nonbonded_method"]),
            constraints=constraints,
        )
    topology = mdtraj.Topology.from_openmm(omm_topology)
    positions = np.array(pdb.getPositions(asNumpy=True)._value, dtype=np.float64)  # nm
    if coords is None or "dihedrals" not in data:
        try:
            if coords is None:
                pairs = [system.getConstraintParameters(k)[:2]
                         for k in range(system.getNumConstraints())]  # fmt: skip
                layout = build_layout(topology, positions, pairs)
                coords = {"rigid_atoms": layout.rigid_atoms.tolist(),
                          "z_matrix": layout.z_matrix.tolist()}  # fmt: skip
            if "dihedrals" not in data:
                phi_auto, psi_auto = central_dihedrals(topology)
                data["dihedrals"] = {"phi": list(phi_auto), "psi": list(psi_auto)}
        except LayoutError as err:
            raise _fail(file, "coordinates" if coords is None else "dihedrals",
                        f"is missing and cannot be made from {pdb_path.name} ({err})"
                        ) from err  # fmt: skip
    rigid = _int_list(coords["rigid_atoms"], file, "coordinates.rigid_atoms", n_atoms)
    rows = coords["z_matrix"]
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise _fail(file, f"coordinates.z_matrix[{i}]", "must be a list of 4 atom indices")
        _int_list(row, file, f"coordinates.z_matrix[{i}]", n_atoms, length=4)
    placed = set(rigid)
    for i, (atom, *refs) in enumerate(rows):
        if atom in placed:
            raise _fail(file, f"coordinates.z_matrix[{i}]", f"places atom {atom} a second time")
        missing = [r for r in refs if r not in placed]
        if missing or len(set(refs)) != 3:
            raise _fail(
                file,
                f"coordinates.z_matrix[{i}]",
                f"references {missing or refs}, which must be 3 distinct atoms placed before it "
                "(rigid atoms or earlier rows)",
            )
        placed.add(atom)
    if placed != set(range(n_atoms)) or len(rigid) != len(set(rigid)):
        raise _fail(
            file,
            "coordinates",
            f"must place every atom exactly once; unplaced: {sorted(set(range(n_atoms)) - placed)}",
        )

    dihedrals = data["dihedrals"]
    phi = tuple(_int_list(dihedrals["phi"], file, "dihedrals.phi", n_atoms, 4))
    psi = tuple(_int_list(dihedrals["psi"], file, "dihedrals.psi", n_atoms, 4))

    return MolecularSystem(
        name=data["name"],
        path=folder,
        topology=topology,
        openmm_topology=omm_topology,
        openmm_system=system,
        temperature=float(sim["temperature"] if temperature is None else temperature),
        positions=positions,
        z_matrix=np.asarray(rows, dtype=np.int64).reshape(-1, 4),
        rigid_atoms=np.asarray(rigid, dtype=np.int64),
        phi_atoms=phi,  # type: ignore[arg-type]
        psi_atoms=psi,  # type: ignore[arg-type]
        forcefield_files=list(ff.get("files", [])),
        prmtop=ff.get("prmtop"),
        implicit_solvent=ff.get("implicit_solvent", "None"),
        nonbonded_method=ff["nonbonded_method"],
        constraints=ff["constraints"],
        integrator=sim["integrator"],
        timestep_fs=float(sim["timestep_fs"]),
        friction_per_ps=float(sim["friction_per_ps"]),
    )


def _prmtop_system(
    path: Path, topology: Any, file: Path, ff: dict, constraints: Any
) -> tuple[Any, Any]:
    """The System of an Amber prmtop, built as openmmtools builds its test systems
    (``AmberPrmtopFile.createSystem``), and the prmtop's topology (its bonds are the force
    field's), after checking that its atoms are the PDB's in the same order (residue and
    element: OpenMM's PDB reader renames some hydrogens), since the PDB gives the positions."""
    import openmm.app as app

    prmtop = app.AmberPrmtopFile(str(path))
    theirs = [(a.residue.name, a.element.symbol) for a in prmtop.topology.atoms()]
    ours = [(a.residue.name, a.element.symbol) for a in topology.atoms()]
    if theirs != ours:
        first = next(
            (k for k, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), len(ours)
        )
        raise _fail(file, "forcefield.prmtop",
                    f"has {len(theirs)} atoms, the PDB {len(ours)}; they differ first at atom "
                    f"{first} ({theirs[first] if first < len(theirs) else '-'} in the prmtop, "
                    f"{ours[first] if first < len(ours) else '-'} in the PDB): write the PDB from "
                    "the prmtop's topology")  # fmt: skip
    implicit = ff.get("implicit_solvent", "None")
    method = ff["nonbonded_method"]
    if method != "NoCutoff":
        raise _fail(file, "forcefield.nonbonded_method", "must be NoCutoff with a prmtop")
    system = prmtop.createSystem(
        nonbondedMethod=app.NoCutoff,
        implicitSolvent=None if implicit == "None" else getattr(app, implicit),
        constraints=constraints,
    )
    return system, prmtop.topology


def available_platforms() -> list[str]:
    """The names of the OpenMM platforms this machine has (``Reference`` always)."""
    import openmm

    return [
        openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())
    ]


def measure_platforms(
    system: MolecularSystem, candidates: list[str] | None = None, steps: int = 2000
) -> dict[str, float]:
    """MD steps per second of each platform on ``system`` (one process), measured now.

    For a 22-atom molecule the single-threaded ``Reference`` platform usually beats ``CPU``,
    whose threading costs more than it saves: measure rather than assume.
    """
    import openmm

    names = candidates or [
        p for p in ("Reference", "CPU", "CUDA", "OpenCL") if p in available_platforms()
    ]
    rates = {}
    for name in names:
        try:
            platform = openmm.Platform.getPlatformByName(name)
            context = openmm.Context(system.openmm_system, system.make_integrator(), platform)
        except Exception:  # a platform that is listed but cannot start here
            continue
        context.setPositions(system.positions)
        context.setVelocitiesToTemperature(system.temperature, 1)
        context.getIntegrator().step(100)  # warm-up (kernel compilation on GPU platforms)
        start = time.perf_counter()
        context.getIntegrator().step(steps)
        context.getState(getEnergy=True)  # waits for the steps to finish on asynchronous platforms
        rates[name] = steps / (time.perf_counter() - start)
        del context
    if not rates:
        raise RuntimeError(f"none of the OpenMM platforms {names} could run {system.name}")
    return rates
