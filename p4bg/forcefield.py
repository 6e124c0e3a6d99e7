"""The target energy as batched torch code, parameterised from the OpenMM ``System``.

:class:`TorchEnergy` evaluates the force field of an ``openmm.System`` for a whole batch of
configurations in one vectorised call, on the device the batch lives on, with forces from
autograd. OpenMM stays the single source of truth: every parameter (force constants, charges,
Lennard-Jones parameters, exceptions, Born radii and scale factors, dielectrics, the surface
energy, even Coulomb's constant) is read from the ``System`` or measured with an OpenMM Context,
so a new molecule needs no new code as long as it uses the supported forces.

Why our own: the field's tools go the other way or loop. openmm-torch puts a torch model inside
OpenMM; bgflow's ``OpenMMBridge`` and fab-torch evaluate one configuration per Context call on
the host; torchmd implements bonded terms, Lennard-Jones and Coulomb in torch but not the OBC
generalised Born model, and espaloma's OBC function serves one molecule's distance matrix at a
time. None evaluates an OpenMM ``System`` with implicit solvent batched on a GPU.

Supported forces (anything else is refused by name): ``HarmonicBondForce``,
``HarmonicAngleForce``, ``PeriodicTorsionForce``, ``NonbondedForce`` (``NoCutoff``, with
exceptions and their 1–4 scaling), ``GBSAOBCForce`` (``NoCutoff``; OBC-II Born radii, solute and
solvent dielectrics, the ACE surface-area term) and ``CMMotionRemover`` (no energy). The OBC
expressions are those of OpenMM's reference platform (``ReferenceObc.cpp``), including the case
of an atom inside another's scaled sphere.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["TorchEnergy", "UnsupportedForceError"]

# OBC-II (Onufriev, Bashford & Case 2004), as OpenMM's GBSAOBCForce uses them
_OBC_ALPHA, _OBC_BETA, _OBC_GAMMA = 1.0, 0.8, 4.85
_DIELECTRIC_OFFSET = 0.009  # nm
_PROBE_RADIUS = 0.14  # nm
_SUPPORTED = (
    "HarmonicBondForce",
    "HarmonicAngleForce",
    "PeriodicTorsionForce",
    "NonbondedForce",
    "GBSAOBCForce",
    "CMMotionRemover",
)


class UnsupportedForceError(ValueError):
    """The System holds a force (or a force setting) that TorchEnergy does not implement."""


def _coulomb_constant() -> float:
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
        f"TorchEnergy: {name} {why}; TorchEnergy implements {', '.join(_SUPPORTED)} "
        "(NoCutoff only). Use the OpenMM worker bridge for this system: --energy openmm"
    )


def _particle_table(force: Any, n: int) -> np.ndarray:
    """The per-particle parameters of a force, shape (n, k), in OpenMM's units."""
    rows = [[getattr(a, "_value", a) for a in force.getParticleParameters(i)] for i in range(n)]
    return np.array(rows, dtype=np.float64).reshape(n, -1)


def _read_system(system: Any) -> dict[str, Any]:
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
        if name not in _SUPPORTED:
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
            solute, solvent = force.getSoluteDielectric(), force.getSolventDielectric()
            p["gb_charge"], p["gb_radius"], p["gb_scale"] = q, radius, scale
            p["gb_dielectric_factor"] = (
                (1.0 / solute - 1.0 / solvent) if solute != 0 and solvent != 0 else 0.0
            )
            p["gb_surface"] = 4.0 * math.pi * force.getSurfaceAreaEnergy()._value
    return p


class TorchEnergy:
    """Reduced energy ``u(x) = U(x)/kT`` of an OpenMM System's force field, batched in torch.

    Args:
        system: a :class:`p4bg.systems.MolecularSystem`, or an ``openmm.System`` (then
            ``temperature`` is required).
        temperature: K, overrides the system's (kT = R·T).
        chunk: configurations per internal pass: bounds memory for large batches, and keeps
            the pair tensors in cache (512 was fastest here for alanine dipeptide).

    Call it on ``x`` of shape [batch, 3·n_atoms] (nm; float32 or float64; CPU or CUDA): returns
    ``u`` of shape [batch] in kT, same dtype and device, differentiable (forces by autograd,
    computed with the energy: ``∂u/∂x = −F/kT``). The contract is :class:`p4bg.energy.
    OpenMMEnergy`'s: a configuration whose energy or forces are not finite (non-finite
    positions, overlapping atoms) gets ``u = +inf`` and gradient 0, is flagged in
    :attr:`last_failed` and counted in :attr:`stats`. Parameters are float64 buffers; the
    computation runs in the dtype of ``x``. Raises :class:`UnsupportedForceError`, naming the
    force, for a System that uses anything else than the forces listed in the module docstring.

    Not an ``nn.Module`` on purpose: like OpenMMEnergy it is the target a model is trained
    against, not part of the model, so it never enters a model's ``state_dict`` or
    ``parameters()``; :meth:`to` moves it to a device.
    """

    def __init__(self, system: Any, temperature: float | None = None, chunk: int = 512) -> None:
        import openmm

        from p4bg.energy import EnergyStats
        from p4bg.systems import MOLAR_GAS_CONSTANT, MolecularSystem

        if isinstance(system, MolecularSystem):
            temperature = system.temperature if temperature is None else temperature
            system = system.openmm_system
        elif not isinstance(system, openmm.System):
            raise TypeError(
                "TorchEnergy: system must be a MolecularSystem or an openmm.System, "
                f"got {type(system).__name__}"
            )
        if temperature is None:
            raise ValueError("TorchEnergy: an openmm.System needs temperature= (K)")
        if not temperature > 0:
            raise ValueError(f"TorchEnergy: temperature must be > 0 K, got {temperature}")
        if chunk < 1:
            raise ValueError(f"TorchEnergy: chunk must be >= 1, got {chunk}")
        params = _read_system(system)
        self.n_atoms = int(params.pop("n_atoms"))
        self.dim = 3 * self.n_atoms
        self.temperature = float(temperature)
        self.kT = MOLAR_GAS_CONSTANT * self.temperature  # kJ/mol
        self.chunk = int(chunk)
        self.platform = "torch"
        self.terms = sorted({k.split("_")[0] for k in params})
        self.coulomb = _coulomb_constant() if ("nb_qq" in params or "gb_charge" in params) else 0.0
        tables = _tables({"n_atoms": self.n_atoms, **params}, self.coulomb)
        self.buffers = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                        for k, v in tables.items()}  # fmt: skip
        self._cast: dict[tuple, dict[str, Tensor]] = {}
        self._stats = EnergyStats()
        self._failures = torch.zeros((), dtype=torch.int64)
        self._last_failed = torch.zeros(0, dtype=torch.bool)

    def __repr__(self) -> str:
        return (f"TorchEnergy(n_atoms={self.n_atoms}, T={self.temperature} K, "
                f"terms={self.terms})")  # fmt: skip

    # ------------------------------------------------------------------------------ contract
    @property
    def stats(self) -> Any:
        """Counters since creation (:class:`p4bg.energy.EnergyStats`); reading it synchronises
        with the device once."""
        self._stats.failures = int(self._failures)
        return self._stats

    @property
    def last_failed(self) -> np.ndarray:
        """Flags of the last call's configurations that came back as ``+inf`` (numpy bool)."""
        return self._last_failed.cpu().numpy()

    def to(self, device: str | torch.device) -> TorchEnergy:
        """Move the parameters to ``device`` (they stay float64); returns self."""
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        self._cast = {}
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """Reduced energies of ``x`` [batch, 3·n_atoms] nm: shape [batch] kT, differentiable."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"TorchEnergy: expected positions of shape [batch, {self.dim}] (nm), "
                f"got {list(x.shape)}"
            )
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"TorchEnergy: positions must be float32 or float64, got {x.dtype}")
        return _TorchEnergyFunction.apply(x, self)

    def evaluate(self, xyz: np.ndarray, forces: bool = True) -> tuple[np.ndarray, Any]:
        """``(u, ∂u/∂x)`` in kT and kT/nm for ``xyz`` [batch, 3·n_atoms] nm, as numpy float64
        (OpenMMEnergy's numpy interface); failed configurations have ``u = +inf``, gradient 0."""
        x = torch.as_tensor(np.asarray(xyz, dtype=np.float64).reshape(len(xyz), self.dim))
        x = x.to(self._buffer_device()).requires_grad_(forces)
        u = self(x)
        if not forces:
            return u.detach().cpu().numpy(), None
        (grad,) = torch.autograd.grad(u.sum(), x)
        return u.detach().cpu().numpy(), grad.cpu().numpy()

    def close(self) -> None:
        """Nothing to release (OpenMMEnergy's interface)."""

    def __enter__(self) -> TorchEnergy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ energy
    def _buffer_device(self) -> torch.device:
        return next(iter(self.buffers.values())).device if self.buffers else torch.device("cpu")

    def _params(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """The buffers in the computation's dtype and device, converted once and cached."""
        key = (dtype, device, self._buffer_device())
        if key not in self._cast:
            self._cast = {key: {
                name: b.to(device) if b.dtype == torch.int64 else b.to(device, dtype)
                for name, b in self.buffers.items()
            }}  # fmt: skip
        return self._cast[key]

    def energy_kj(self, x: Tensor) -> Tensor:
        """Potential energy (kJ/mol) of ``x`` [batch, 3·n_atoms] nm, shape [batch]; plain
        autograd, no failure handling (the differentiable core of :meth:`__call__`).

        Written for eager speed on the CPU: x, y and z are kept apart, every difference vector
        comes from a matmul with a constant ±1 matrix (so its backward is a matmul, not a
        scatter into zeros), and pair terms run over the n(n−1)/2 pairs once."""
        p = self._params(x.dtype, x.device)
        xyz = x[:, 0::3], x[:, 1::3], x[:, 2::3]

        def vectors(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return xyz[0] @ g, xyz[1] @ g, xyz[2] @ g

        energy = x.new_zeros(len(x))
        if "bond_g" in p:
            b = vectors(p["bond_g"])
            r = _dot(b, b).sqrt()
            energy = energy + (0.5 * p["bond_k"] * (r - p["bond_r0"]) ** 2).sum(1)
        if "angle_ga" in p:
            a, c = vectors(p["angle_ga"]), vectors(p["angle_gc"])
            ac = _cross(a, c)
            theta = torch.atan2(_dot(ac, ac).sqrt(), _dot(a, c))
            energy = energy + (0.5 * p["angle_k"] * (theta - p["angle_theta0"]) ** 2).sum(1)
        if "torsion_g1" in p:
            b1, b2, b3 = (vectors(p[f"torsion_g{k}"]) for k in (1, 2, 3))
            n1, n2 = _cross(b1, b2), _cross(b2, b3)
            phi = torch.atan2(_dot(b2, b2).sqrt() * _dot(b1, n2), _dot(n1, n2))
            term = p["torsion_k"] * (1 + torch.cos(p["torsion_n"] * phi - p["torsion_phase"]))
            energy = energy + term.sum(1)
        if "pair_g" in p:
            d = vectors(p["pair_g"])
            r2 = _dot(d, d)
            inv_r = torch.rsqrt(r2)
            if "nb_cqq" in p:
                s6 = (p["nb_sig2"] * inv_r * inv_r) ** 3
                pair = p["nb_cqq"] * inv_r + p["nb_4eps"] * (s6 * s6 - s6)
                energy = energy + pair.sum(1)
            if "gb_qq" in p:
                energy = energy + self._obc(p, r2, inv_r)
        return energy

    @staticmethod
    def _obc(p: dict[str, Tensor], r2: Tensor, inv_r: Tensor) -> Tensor:
        """OBC-II generalised Born energy plus the ACE surface term, kJ/mol, shape [batch].
        r2, inv_r: [batch, pairs] squared and inverse distances of the pairs i < j (nm)."""
        # HCT integrals of the source atom's scaled sphere seen from the receiving atom, for
        # both directions of every pair (ReferenceObc::computeBornRadii)
        r = torch.cat([r2 * inv_r, r2 * inv_r], 1)
        inv = torch.cat([inv_r, inv_r], 1)
        offset, scaled = p["gb_offset_recv"], p["gb_scaled_src"]
        r_plus = r + scaled
        l_inv = 1.0 / torch.maximum(offset, (r - scaled).abs())
        u_inv = 1.0 / r_plus
        l2, u2 = l_inv * l_inv, u_inv * u_inv
        term = (l_inv - u_inv + 0.25 * r * (u2 - l2) + 0.5 * inv * torch.log(u_inv / l_inv)
                + 0.25 * p["gb_scaled2_src"] * inv * (l2 - u2))  # fmt: skip
        # the receiving atom entirely inside the source's scaled sphere (Tinker's correction)
        term = torch.where(offset < scaled - r, term + p["gb_inside"] - 2.0 * l_inv, term)
        term = torch.where(offset < r_plus, term, 0.0)
        psi = term @ p["gb_scatter"]  # [batch, atoms]: (offset radius / 2) · Σ_j term
        tanh = torch.tanh(psi * (_OBC_ALPHA + psi * (_OBC_GAMMA * psi - _OBC_BETA)))
        inv_born = p["gb_offset_inv"] - tanh * p["gb_radius_inv"]
        # ACE non-polar term, for atoms with a positive Born radius (OpenMM skips the others)
        inv_born3 = inv_born * inv_born * inv_born
        energy = torch.where(inv_born > 0, p["gb_surface6"] * inv_born3 * inv_born3, 0.0).sum(1)
        # polar term over the pairs i < j and the self terms (ReferenceObc's first main loop)
        born = 1.0 / inv_born
        born2 = (born @ p["gb_first"]) * (born @ p["gb_second"])
        f2 = r2 + born2 * torch.exp(-0.25 * r2 / born2)
        return energy + (p["gb_qq"] * torch.rsqrt(f2)).sum(1) + (p["gb_self"] * inv_born).sum(1)


def _dot(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> Tensor:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _tables(p: dict[str, Any], coulomb: float) -> dict[str, np.ndarray]:
    """The evaluation's constant tensors (float64) from the System's parameters: ±1 matrices
    that turn positions into difference vectors, per-pair and per-atom constants."""
    n = p["n_atoms"]

    def differences(pairs: Any) -> np.ndarray:  # [atoms, k]: column k = e_j − e_i for (i, j)
        g = np.zeros((n, len(pairs)))
        for k, (i, j) in enumerate(pairs):
            g[j, k] += 1.0
            g[i, k] -= 1.0
        return g

    t: dict[str, np.ndarray] = {}
    if "bond_idx" in p and len(p["bond_idx"]):
        t["bond_g"] = differences(p["bond_idx"])
        t["bond_k"], t["bond_r0"] = p["bond_k"], p["bond_r0"]
    if "angle_idx" in p and len(p["angle_idx"]):
        t["angle_ga"] = differences([(j, i) for i, j, _ in p["angle_idx"]])
        t["angle_gc"] = differences([(j, k) for _, j, k in p["angle_idx"]])
        t["angle_k"], t["angle_theta0"] = p["angle_k"], p["angle_theta0"]
    if "torsion_idx" in p and len(p["torsion_idx"]):
        quads = p["torsion_idx"]
        for k, (a, b) in enumerate(((0, 1), (1, 2), (2, 3)), start=1):
            t[f"torsion_g{k}"] = differences(quads[:, [a, b]])
        t["torsion_k"], t["torsion_n"] = p["torsion_k"], p["torsion_n"]
        t["torsion_phase"] = p["torsion_phase"]
    first, second = np.triu_indices(n, 1)
    if ("nb_qq" in p or "gb_charge" in p) and len(first):
        t["pair_g"] = differences(np.stack([first, second], 1))
    else:
        return t
    if "nb_qq" in p:
        t["nb_cqq"] = coulomb * p["nb_qq"][first, second]
        t["nb_sig2"] = p["nb_sigma"][first, second] ** 2
        t["nb_4eps"] = 4.0 * p["nb_epsilon"][first, second]
    if "gb_charge" in p:
        radius, q = p["gb_radius"], p["gb_charge"]
        offset = radius - _DIELECTRIC_OFFSET
        scaled = offset * p["gb_scale"]
        receiver = np.concatenate([first, second])
        source = np.concatenate([second, first])
        t["gb_offset_recv"], t["gb_scaled_src"] = offset[receiver], scaled[source]
        t["gb_scaled2_src"], t["gb_inside"] = scaled[source] ** 2, 2.0 / offset[receiver]
        scatter = np.zeros((len(receiver), n))
        scatter[np.arange(len(receiver)), receiver] = 0.5 * offset[receiver]
        t["gb_scatter"] = scatter
        t["gb_offset_inv"], t["gb_radius_inv"] = 1.0 / offset, 1.0 / radius
        t["gb_first"] = np.eye(n)[:, first]
        t["gb_second"] = np.eye(n)[:, second]
        pre = -coulomb * p["gb_dielectric_factor"]
        t["gb_qq"] = pre * q[first] * q[second]
        t["gb_self"] = 0.5 * pre * q**2
        t["gb_surface6"] = p["gb_surface"] * (radius + _PROBE_RADIUS) ** 2 * radius**6
    return t


class _TorchEnergyFunction(torch.autograd.Function):
    """u = U(x)/kT with backward grad_u · (−F/kT), the forces taken by autograd together with
    the energy, so that failed configurations get gradient 0 (not NaN) like OpenMMEnergy's."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, energy: TorchEnergy) -> Tensor:
        need_grad = bool(ctx.needs_input_grad[0])
        us, grads = [], []
        with torch.enable_grad():
            for part in x.detach().split(energy.chunk):
                part = part.requires_grad_(need_grad)
                u_kj = energy.energy_kj(part)
                if need_grad:
                    (g,) = torch.autograd.grad(u_kj.sum(), part)
                    grads.append(g.detach())
                us.append(u_kj.detach())
        u = (torch.cat(us) if us else x.new_zeros(0)) / energy.kT
        failed = ~torch.isfinite(u)
        if need_grad:
            grad = (torch.cat(grads) if grads else torch.zeros_like(x)) / energy.kT
            failed = failed | ~torch.isfinite(grad).all(1)
            ctx.save_for_backward(torch.where(failed[:, None], torch.zeros_like(grad), grad))
        energy._stats.evaluations += len(x)
        energy._failures = energy._failures.to(x.device) + failed.sum()
        energy._last_failed = failed
        return torch.where(failed, torch.full_like(u, math.inf), u)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_u: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad_u.unsqueeze(1) * grad, None
