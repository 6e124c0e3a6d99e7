"""The force field of an OpenMM ``System`` as batched torch code: its parameters read into
constant tables, and the energy of a batch with its gradient written out by hand.

Every parameter (force constants, charges, Lennard-Jones parameters, exceptions, Born radii and
scale factors, dielectrics, the surface energy, even Coulomb's constant) is read from the
``System`` or measured with an OpenMM Context, so a new molecule needs no new code as long as it
uses the supported forces: ``HarmonicBondForce``, ``HarmonicAngleForce``,
``PeriodicTorsionForce``, ``NonbondedForce`` (``NoCutoff``, with exceptions and their 1–4
scaling), ``GBSAOBCForce`` (``NoCutoff``; OBC-II Born radii, solute and solvent dielectrics, the
ACE surface-area term), the ``CustomGBForce`` forms of OBC-I and OBC-II that OpenMM's Amber
tools write (``openmm.app.internal.customgbforces.GBSAOBC1Force`` / ``GBSAOBC2Force``: what
``AmberPrmtopFile.createSystem(implicitSolvent=OBC1)`` and ``implicit/obc1.xml`` make; no
cutoff, no salt) and ``CMMotionRemover`` (no energy). Anything else is refused by name with
:class:`UnsupportedForceError`. The OBC expressions are those of OpenMM's reference platform
(``ReferenceObc.cpp``), including the case of an atom inside another's scaled sphere; the
custom forms differ from it in three ways, each carried as a parameter: their own α, β, γ (OBC-I:
0.8, 0, 2.909125), no correction for an atom inside another's scaled sphere, and the surface
term for every atom (``ReferenceObc`` skips atoms with a negative Born radius). A CustomGBForce
is recognised by regenerating OpenMM's own expressions for its dielectrics and comparing them
string for string, so that any other custom GB model is refused rather than misread.

Positions are [batch, 3·n_atoms] nm; energies kJ/mol; gradients kJ/mol/nm.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_FORCES",
    "UnsupportedForceError",
    "build_tables",
    "coulomb_constant",
    "evaluate_terms",
    "read_system",
]

# OBC-II (Onufriev, Bashford & Case 2004), as OpenMM's GBSAOBCForce uses them
_OBC2 = (1.0, 0.8, 4.85)  # α, β, γ of tanh(α ψ − β ψ² + γ ψ³)
_DIELECTRIC_OFFSET = 0.009  # nm
_PROBE_RADIUS = 0.14  # nm
SUPPORTED_FORCES = (
    "HarmonicBondForce",
    "HarmonicAngleForce",
    "PeriodicTorsionForce",
    "NonbondedForce",
    "GBSAOBCForce",
    "CustomGBForce",
    "CMMotionRemover",
)


class UnsupportedForceError(ValueError):
    """The System holds a force (or a force setting) that TorchEnergy does not implement."""


def coulomb_constant() -> float:
    """1/(4π ε0) in kJ nm / (mol e²), as the installed OpenMM uses it: measured on two unit
    charges 1 nm apart, so that torch and OpenMM energies agree to the last digit."""
    import openmm

    system = openmm.System()
    force = openmm.NonbondedForce()
    for _ in range(2):
        system.addParticle(1.0)
        force.addParticle(1.0, 1.0, 0.0)
    system.addForce(force)
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    return float(context.getState(getEnergy=True).getPotentialEnergy()._value)


def _refuse(name: str, why: str) -> UnsupportedForceError:
    return UnsupportedForceError(
        f"TorchEnergy: {name} {why}; TorchEnergy implements {', '.join(SUPPORTED_FORCES)} "
        "(NoCutoff only). Use the OpenMM worker bridge for this system: --energy openmm"
    )


def _particle_table(force: Any, n: int) -> np.ndarray:
    """The per-particle parameters of a force, shape (n, k), in OpenMM's units."""
    rows = [[getattr(a, "_value", a) for a in force.getParticleParameters(i)] for i in range(n)]
    return np.array(rows, dtype=np.float64).reshape(n, -1)


def read_system(system: Any) -> dict[str, Any]:
    """Parameters of every supported force, as float64 numpy arrays (OpenMM units: nm,
    radians, kJ/mol, e)."""
    import openmm

    n = system.getNumParticles()
    for i in range(n):
        if system.isVirtualSite(i):
            raise _refuse(f"particle {i}", "is a virtual site")
    p: dict[str, Any] = {"n_atoms": n}
    seen: set[str] = set()
    for force in system.getForces():
        name = type(force).__name__
        if name not in SUPPORTED_FORCES:
            raise _refuse(name, "is not supported")
        if name in seen and name != "CMMotionRemover":
            raise _refuse(name, "appears twice in the System")
        seen.add(name)
        if name != "CMMotionRemover" and force.usesPeriodicBoundaryConditions():
            raise _refuse(name, "uses periodic boundary conditions")
        if isinstance(force, openmm.HarmonicBondForce):
            rows = [force.getBondParameters(k) for k in range(force.getNumBonds())]
            p["bond_idx"] = np.array([[r[0], r[1]] for r in rows], dtype=np.int64).reshape(-1, 2)
            p["bond_r0"] = np.array([r[2]._value for r in rows], dtype=np.float64)
            p["bond_k"] = np.array([r[3]._value for r in rows], dtype=np.float64)
        elif isinstance(force, openmm.HarmonicAngleForce):
            rows = [force.getAngleParameters(k) for k in range(force.getNumAngles())]
            p["angle_idx"] = np.array([r[:3] for r in rows], dtype=np.int64).reshape(-1, 3)
            p["angle_theta0"] = np.array([r[3]._value for r in rows], dtype=np.float64)
            p["angle_k"] = np.array([r[4]._value for r in rows], dtype=np.float64)
        elif isinstance(force, openmm.PeriodicTorsionForce):
            rows = [force.getTorsionParameters(k) for k in range(force.getNumTorsions())]
            p["torsion_idx"] = np.array([r[:4] for r in rows], dtype=np.int64).reshape(-1, 4)
            p["torsion_n"] = np.array([r[4] for r in rows], dtype=np.float64)
            p["torsion_phase"] = np.array([r[5]._value for r in rows], dtype=np.float64)
            p["torsion_k"] = np.array([r[6]._value for r in rows], dtype=np.float64)
        elif isinstance(force, openmm.NonbondedForce):
            if force.getNonbondedMethod() != openmm.NonbondedForce.NoCutoff:
                raise _refuse(name, f"uses nonbonded method {force.getNonbondedMethod()}")
            if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
                raise _refuse(name, "has parameter offsets")
            q, sig, eps = _particle_table(force, n).T
            qq = q[:, None] * q[None, :]
            sigma = 0.5 * (sig[:, None] + sig[None, :])  # Lorentz-Berthelot
            epsilon = np.sqrt(eps[:, None] * eps[None, :])
            for k in range(force.getNumExceptions()):
                i, j, cp, s, e = force.getExceptionParameters(k)
                for a, b in ((i, j), (j, i)):
                    qq[a, b], sigma[a, b], epsilon[a, b] = cp._value, s._value, e._value
            np.fill_diagonal(qq, 0.0)
            np.fill_diagonal(epsilon, 0.0)
            np.fill_diagonal(sigma, 1.0)
            p["nb_qq"], p["nb_sigma"], p["nb_epsilon"] = qq, sigma, epsilon
        elif isinstance(force, openmm.GBSAOBCForce):
            if force.getNonbondedMethod() != openmm.GBSAOBCForce.NoCutoff:
                raise _refuse(name, f"uses nonbonded method {force.getNonbondedMethod()}")
            q, radius, scale = _particle_table(force, n).T
            offset = radius - _DIELECTRIC_OFFSET
            p.update(_gb_common(q, offset, offset * scale, force.getSoluteDielectric(),
                                force.getSolventDielectric()))  # fmt: skip
            p["gb_surface"] = 4.0 * math.pi * force.getSurfaceAreaEnergy()._value
            p["gb_obc"] = _OBC2
            p["gb_coulomb"] = None  # OpenMM's own constant, measured (coulomb_constant)
            p["gb_reference_form"] = True
        elif isinstance(force, openmm.CustomGBForce):
            p.update(_read_custom_obc(force, n))
    return p


def _gb_common(q: Any, offset: Any, scaled: Any, solute: float, solvent: float) -> dict:
    return {
        "gb_charge": q,
        "gb_offset": offset,  # nm: the atom's radius less the dielectric offset
        "gb_scaled": scaled,  # nm: its offset radius times its screening (HCT scale) factor
        "gb_dielectric_factor": (1.0 / solute - 1.0 / solvent) if solute and solvent else 0.0,
    }


_CUSTOM_OBC = {"GBSAOBC1Force": (0.8, 0.0, 2.909125), "GBSAOBC2Force": _OBC2}


def _custom_gb_terms(force: Any) -> list[tuple[str, str, int]]:
    """Every expression of a CustomGBForce with its kind, in order, for comparison."""
    out = []
    for i in range(force.getNumComputedValues()):
        value, expr, kind = force.getComputedValueParameters(i)
        out.append((f"value {value}", expr, int(kind)))
    for i in range(force.getNumEnergyTerms()):
        expr, kind = force.getEnergyTermParameters(i)
        out.append(("energy", expr, int(kind)))
    return out


def _read_custom_obc(force: Any, n: int) -> dict[str, Any]:
    """The parameters of a CustomGBForce that is one of OpenMM's OBC forms (see the module
    docstring), or :class:`UnsupportedForceError` saying what differs."""
    import re

    import openmm
    from openmm.app.internal import customgbforces

    name = "CustomGBForce"
    if force.getNonbondedMethod() != openmm.CustomGBForce.NoCutoff:
        raise _refuse(name, f"uses nonbonded method {force.getNonbondedMethod()}")
    count = force.getNumPerParticleParameters()
    names = [force.getPerParticleParameterName(i) for i in range(count)]
    if (names != ["charge", "or", "sr"] or force.getNumGlobalParameters()
            or force.getNumTabulatedFunctions() or force.getNumExclusions()):  # fmt: skip
        raise _refuse(name, f"with per-particle parameters {names} is not one of OpenMM's OBC "
                      "forms (openmm.app.internal.customgbforces)")  # fmt: skip
    terms = _custom_gb_terms(force)
    energies = [expr for what, expr, _ in terms if what == "energy"]
    found = re.search(r"solventDielectric=([^;]+); soluteDielectric=([^;]+); kappa=([^;]+)",
                      energies[0] if energies else "")  # fmt: skip
    if found is None:
        raise _refuse(name, "has no GB energy term with solvent and solute dielectrics")
    solvent, solute, kappa = (float(v) for v in found.groups())
    if kappa != 0.0:
        raise _refuse(name, f"screens with salt (kappa = {kappa:g}/nm)")
    surface = "ACE" if len(energies) == 3 else None
    for model in _CUSTOM_OBC:
        expected = getattr(customgbforces, model)(solvent, solute, surface, None, 0.0)
        if _custom_gb_terms(expected) == terms:
            break
    else:
        raise _refuse(name, "is not one of OpenMM's OBC forms (GBSAOBC1Force, GBSAOBC2Force of "
                      "openmm.app.internal.customgbforces, without cutoff or salt)")  # fmt: skip
    q, offset, scaled = _particle_table(force, n).T
    p = _gb_common(q, offset, scaled, solute, solvent)
    # the constants as the expressions write them: Coulomb's and 4π times the surface energy
    p["gb_coulomb"] = float(re.match(r"-0\.5\*([0-9.]+)\*", energies[0]).group(1))
    p["gb_surface"] = float(energies[1].split("*")[0]) if surface else 0.0
    p["gb_obc"] = _CUSTOM_OBC[model]
    p["gb_reference_form"] = False
    return p


def _dot(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> Tensor:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _scale(c: Tensor, v: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
    return c * v[0], c * v[1], c * v[2]


def _axpy(a: Tensor, v: tuple[Tensor, ...], b: Tensor, w: tuple[Tensor, ...]) -> tuple:
    return a * v[0] + b * w[0], a * v[1] + b * w[1], a * v[2] + b * w[2]


def evaluate_terms(
    p: dict[str, Tensor], groups: tuple[tuple[str, int], ...], x: Tensor, gradient: bool
) -> tuple[Tensor, Tensor | None]:
    """Energy (kJ/mol, [batch]) of ``x`` [batch, 3·n_atoms] nm and, when ``gradient``, its
    gradient (kJ/mol/nm, [batch, 3·n_atoms]).

    x, y and z are kept apart; every difference vector of every term (bonds, the two arms of
    each angle, the three bonds of each torsion, all pairs i < j) comes from one matmul per
    coordinate with a constant ±1 matrix ``g`` [atoms, vectors], so the gradient is ∂U/∂(vectors)
    times gᵀ: two matmuls per coordinate for the whole force field, no scatter."""
    comps = [x[:, k::3] @ p["g"] for k in range(3)]
    sizes = [size for _, size in groups]
    split = [c.split(sizes, 1) for c in comps]
    vec = {name: (split[0][i], split[1][i], split[2][i]) for i, (name, _) in enumerate(groups)}
    grad: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    energy = x.new_zeros(len(x))
    if "bond" in vec:
        b = vec["bond"]
        r = _dot(b, b).sqrt()
        stretch = r - p["bond_r0"]
        energy = energy + (0.5 * p["bond_k"] * stretch * stretch).sum(1)
        if gradient:
            grad["bond"] = _scale(p["bond_k"] * stretch / r, b)
    if "angle_a" in vec:
        a, c = vec["angle_a"], vec["angle_c"]
        ac = _cross(a, c)
        sin_ac, cos_ac = _dot(ac, ac).sqrt(), _dot(a, c)  # |a||c| sin θ, |a||c| cos θ
        bend = torch.atan2(sin_ac, cos_ac) - p["angle_theta0"]
        energy = energy + (0.5 * p["angle_k"] * bend * bend).sum(1)
        if gradient:  # ∂θ/∂a = (a·c a − |a|² c) / (|a|² |a×c|), and a ↔ c
            aa, cc = _dot(a, a), _dot(c, c)
            fa = p["angle_k"] * bend / (aa * sin_ac)
            fc = p["angle_k"] * bend / (cc * sin_ac)
            grad["angle_a"] = _axpy(fa * cos_ac, a, -fa * aa, c)
            grad["angle_c"] = _axpy(fc * cos_ac, c, -fc * cc, a)
    if "torsion_1" in vec:
        b1, b2, b3 = vec["torsion_1"], vec["torsion_2"], vec["torsion_3"]
        n1, n2 = _cross(b1, b2), _cross(b2, b3)
        b2_norm = _dot(b2, b2).sqrt()
        phi = torch.atan2(b2_norm * _dot(b1, n2), _dot(n1, n2))
        arg = p["torsion_n"] * phi - p["torsion_phase"]
        energy = energy + (p["torsion_k"] * (1 + torch.cos(arg))).sum(1)
        if gradient:  # Blondel & Karplus (1996), written for the bond vectors b1, b2, b3
            d_phi = -p["torsion_k"] * p["torsion_n"] * torch.sin(arg)
            c1 = d_phi / _dot(n1, n1)
            c3 = d_phi / _dot(n2, n2)
            grad["torsion_1"] = _scale(c1 * b2_norm, n1)
            grad["torsion_3"] = _scale(c3 * b2_norm, n2)
            grad["torsion_2"] = _axpy(
                -c1 * _dot(b1, b2) / b2_norm, n1, -c3 * _dot(b2, b3) / b2_norm, n2
            )
    if "pair" in vec:
        d = vec["pair"]
        r2 = _dot(d, d)
        inv_r = torch.rsqrt(r2)
        d_r2 = torch.zeros_like(r2) if gradient else None  # ∂U/∂(r²) of each pair
        if "nb_cqq" in p:
            inv_r2 = inv_r * inv_r
            s6 = (p["nb_sig2"] * inv_r2) ** 3
            coulomb = p["nb_cqq"] * inv_r
            energy = energy + (coulomb + p["nb_4eps"] * (s6 * s6 - s6)).sum(1)
            if gradient:
                d_r2 = -(0.5 * coulomb + 3.0 * p["nb_4eps"] * (2.0 * s6 - 1.0) * s6) * inv_r2
        if "gb_qq" in p:
            gb_energy, gb_d_r2 = _obc(p, r2, inv_r, gradient)
            energy = energy + gb_energy
            if gradient:
                d_r2 = d_r2 + gb_d_r2
        if gradient:
            grad["pair"] = _scale(2.0 * d_r2, d)
    if not gradient:
        return energy, None
    g_t = p["g_t"]
    out = [torch.cat([grad[name][k] for name, _ in groups], 1) @ g_t for k in range(3)]
    return energy, torch.stack(out, 2).reshape(x.shape)


def _obc(
    p: dict[str, Tensor], r2: Tensor, inv_r: Tensor, gradient: bool
) -> tuple[Tensor, Tensor | None]:
    """OBC-II generalised Born energy plus the ACE surface term (kJ/mol, [batch]) and, when
    ``gradient``, its derivative with respect to the squared pair distances ([batch, pairs]).
    r2, inv_r: [batch, pairs] squared and inverse distances of the pairs i < j (nm)."""
    # HCT integrals of the source atom's scaled sphere seen from the receiving atom, for
    # both directions of every pair (ReferenceObc::computeBornRadii)
    n_pairs = r2.shape[1]
    r = torch.cat([r2 * inv_r, r2 * inv_r], 1)
    inv = torch.cat([inv_r, inv_r], 1)
    offset, scaled, scaled2 = p["gb_offset_recv"], p["gb_scaled_src"], p["gb_scaled2_src"]
    r_minus = r - scaled
    outer = r_minus.abs() > offset  # the lower limit is |r − s|, not the atom's own radius
    l_inv = 1.0 / torch.where(outer, r_minus.abs(), offset)
    u_inv = 1.0 / (r + scaled)
    l2, u2 = l_inv * l_inv, u_inv * u_inv
    log_ul = torch.log(u_inv / l_inv)
    term = (l_inv - u_inv + 0.25 * r * (u2 - l2) + 0.5 * inv * log_ul
            + 0.25 * scaled2 * inv * (l2 - u2))  # fmt: skip
    # the receiving atom entirely inside the source's scaled sphere (Tinker's correction)
    inside = p["gb_inside_recv"] < scaled - r  # +inf in the custom forms: no correction
    active = offset < r + scaled
    term = torch.where(active, torch.where(inside, term + p["gb_inside"] - 2.0 * l_inv, term), 0.0)
    psi = term @ p["gb_scatter"]  # [batch, atoms]: (offset radius / 2) · Σ_j term
    alpha, beta, gamma = p["gb_alpha"], p["gb_beta"], p["gb_gamma"]
    tanh = torch.tanh(psi * (alpha + psi * (gamma * psi - beta)))
    inv_born = p["gb_offset_inv"] - tanh * p["gb_radius_inv"]
    # ACE non-polar term: for atoms with a positive Born radius in GBSAOBCForce (OpenMM skips
    # the others), for every atom in the custom forms (floor −inf)
    positive = inv_born > p["gb_ace_floor"]
    inv_born2 = inv_born * inv_born
    inv_born4 = inv_born2 * inv_born2
    energy = torch.where(positive, p["gb_surface6"] * inv_born4 * inv_born2, 0.0).sum(1)
    # polar term over the pairs i < j and the self terms (ReferenceObc's first main loop)
    born = 1.0 / inv_born
    born_first, born_second = born @ p["gb_first"], born @ p["gb_second"]
    born2 = born_first * born_second
    exp = torch.exp(-0.25 * r2 / born2)
    inv_f = torch.rsqrt(r2 + born2 * exp)
    pair = p["gb_qq"] * inv_f
    energy = energy + pair.sum(1) + (p["gb_self"] * inv_born).sum(1)
    if not gradient:
        return energy, None
    # backwards: pair polar → Born radii → ψ → HCT integrals → distances
    d_f = -0.5 * pair * inv_f * inv_f
    d_r2 = d_f * (1.0 - 0.25 * exp)
    d_born2 = d_f * exp * (1.0 + 0.25 * r2 / born2)
    d_born = (d_born2 * born_second) @ p["gb_first_t"] + (d_born2 * born_first) @ p["gb_second_t"]
    d_inv_born = (torch.where(positive, 6.0 * p["gb_surface6"] * inv_born4 * inv_born, 0.0)
                  + p["gb_self"] - d_born * born * born)  # fmt: skip
    d_arg = alpha + psi * (3.0 * gamma * psi - 2.0 * beta)
    d_psi = -d_inv_born * p["gb_radius_inv"] * (1.0 - tanh * tanh) * d_arg
    d_term = d_psi @ p["gb_scatter_t"]  # [batch, 2·pairs]
    dl = torch.where(outer, torch.sign(r_minus), 0.0)  # ∂l/∂r
    l3, u3 = l2 * l_inv, u2 * u_inv
    inv2 = inv * inv
    d_term_dr = (
        -l2 * dl + u2 + 0.25 * (u2 - l2) + 0.5 * r * (l3 * dl - u3)
        - 0.5 * inv2 * log_ul + 0.5 * inv * (l_inv * dl - u_inv)
        - 0.25 * scaled2 * inv2 * (l2 - u2) + 0.5 * scaled2 * inv * (u3 - l3 * dl)
    )  # fmt: skip
    d_term_dr = torch.where(active, torch.where(inside, d_term_dr + 2.0 * l2 * dl, d_term_dr), 0.0)
    d_r = d_term * d_term_dr
    d_r = d_r[:, :n_pairs] + d_r[:, n_pairs:]
    return energy, d_r2 + 0.5 * d_r * inv_r


def build_tables(p: dict[str, Any], coulomb: float) -> tuple[dict[str, np.ndarray], tuple]:
    """The evaluation's constant tensors (float64) from the System's parameters, and the
    groups of difference vectors ``((name, count), ...)`` in the column order of ``g``: one
    ±1 matrix [atoms, vectors] that turns positions into every term's difference vectors,
    per-term and per-atom constants."""
    n = p["n_atoms"]
    columns: list[tuple[int, int]] = []  # (i, j): the vector x_j − x_i
    groups: list[tuple[str, int]] = []

    def add(name: str, pairs: Any) -> None:
        pairs = [(int(i), int(j)) for i, j in pairs]
        columns.extend(pairs)
        groups.append((name, len(pairs)))

    t: dict[str, np.ndarray] = {}
    if "bond_idx" in p and len(p["bond_idx"]):
        add("bond", p["bond_idx"])
        t["bond_k"], t["bond_r0"] = p["bond_k"], p["bond_r0"]
    if "angle_idx" in p and len(p["angle_idx"]):
        add("angle_a", [(j, i) for i, j, _ in p["angle_idx"]])
        add("angle_c", [(j, k) for _, j, k in p["angle_idx"]])
        t["angle_k"], t["angle_theta0"] = p["angle_k"], p["angle_theta0"]
    if "torsion_idx" in p and len(p["torsion_idx"]):
        quads = p["torsion_idx"]
        for k, (a, b) in enumerate(((0, 1), (1, 2), (2, 3)), start=1):
            add(f"torsion_{k}", quads[:, [a, b]])
        t["torsion_k"], t["torsion_n"] = p["torsion_k"], p["torsion_n"]
        t["torsion_phase"] = p["torsion_phase"]
    first, second = np.triu_indices(n, 1)
    if ("nb_qq" in p or "gb_charge" in p) and len(first):
        add("pair", np.stack([first, second], 1))
        if "nb_qq" in p:
            t["nb_cqq"] = coulomb * p["nb_qq"][first, second]
            t["nb_sig2"] = p["nb_sigma"][first, second] ** 2
            t["nb_4eps"] = 4.0 * p["nb_epsilon"][first, second]
        if "gb_charge" in p:
            q, offset, scaled = p["gb_charge"], p["gb_offset"], p["gb_scaled"]
            radius = offset + _DIELECTRIC_OFFSET
            receiver = np.concatenate([first, second])
            source = np.concatenate([second, first])
            t["gb_offset_recv"], t["gb_scaled_src"] = offset[receiver], scaled[source]
            t["gb_scaled2_src"], t["gb_inside"] = scaled[source] ** 2, 2.0 / offset[receiver]
            reference = p["gb_reference_form"]
            t["gb_inside_recv"] = offset[receiver] if reference else np.full(len(receiver), np.inf)
            t["gb_ace_floor"] = np.array(0.0 if reference else -np.inf)
            t["gb_alpha"], t["gb_beta"], t["gb_gamma"] = (np.array(v) for v in p["gb_obc"])
            scatter = np.zeros((len(receiver), n))
            scatter[np.arange(len(receiver)), receiver] = 0.5 * offset[receiver]
            t["gb_scatter"], t["gb_scatter_t"] = scatter, scatter.T
            t["gb_offset_inv"], t["gb_radius_inv"] = 1.0 / offset, 1.0 / radius
            t["gb_first"], t["gb_second"] = np.eye(n)[:, first], np.eye(n)[:, second]
            t["gb_first_t"], t["gb_second_t"] = t["gb_first"].T, t["gb_second"].T
            pre = -(p["gb_coulomb"] or coulomb) * p["gb_dielectric_factor"]
            t["gb_qq"] = pre * q[first] * q[second]
            t["gb_self"] = 0.5 * pre * q**2
            t["gb_surface6"] = p["gb_surface"] * (radius + _PROBE_RADIUS) ** 2 * radius**6
    g = np.zeros((n, len(columns)))
    for k, (i, j) in enumerate(columns):
        g[j, k] += 1.0
        g[i, k] -= 1.0
    t["g"], t["g_t"] = g, g.T
    return t, tuple(groups)
