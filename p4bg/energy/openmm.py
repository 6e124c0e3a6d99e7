"""The OpenMM bridge: OpenMM energies and forces for batches of torch tensors, with autograd.

``OpenMMEnergy(system)(x)`` returns reduced energies ``u = U/kT`` of positions ``x``
(shape [batch, 3·n_atoms], nm) as a differentiable tensor: a ``torch.autograd.Function`` whose
backward multiplies the incoming gradient by ``−F/kT``, the forces OpenMM computed together with
the energy (no finite differences, no second evaluation).

Batches are split over persistent worker processes (:mod:`p4bg.energy.worker`), each with its
own OpenMM Context created inside the worker. A worker that dies or does not answer within
``timeout`` seconds is killed, replaced and its share re-evaluated. Frames that cannot be
evaluated (non-finite positions, an OpenMM error, a non-finite energy or force) are never
returned as 0: their energy is ``+inf``, their gradient 0 (a capped or masked loss ignores
them), and they are counted in :attr:`OpenMMEnergy.stats` and flagged in
:attr:`OpenMMEnergy.last_failed`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch
from torch import Tensor

from p4bg.energy.base import Energy, EnergyFunction, EnergyStats, resolve_target
from p4bg.energy.worker import evaluate_frames, make_context
from p4bg.systems import MolecularSystem, available_platforms

__all__ = ["OpenMMEnergy"]


_PLATFORM_CACHE: dict[str, str] = {}


def _fastest_platform(system_xml: str, positions: np.ndarray) -> str:
    """The OpenMM platform with the most energy+force evaluations per second, measured once
    per system and process. For small molecules the single-threaded Reference platform wins."""
    key = hashlib.sha1(system_xml.encode()).hexdigest()
    if key in _PLATFORM_CACHE:
        return _PLATFORM_CACHE[key]
    names = available_platforms()
    rates = {}
    for name in ("Reference", "CPU", "CUDA", "OpenCL"):
        if name not in names:
            continue
        try:
            context = make_context(system_xml, name)
        except Exception:  # listed but unusable here
            continue
        frames = np.repeat(positions[None], 20, axis=0)
        evaluate_frames(context, frames[:2], True)  # warm-up
        start = time.perf_counter()
        evaluate_frames(context, frames, True)
        rates[name] = len(frames) / (time.perf_counter() - start)
        del context
    _PLATFORM_CACHE[key] = max(rates, key=rates.get)
    return _PLATFORM_CACHE[key]


class _Worker:
    """One worker process (``python -m p4bg.energy.worker``) and its connection."""

    def __init__(self, system_xml: str, platform: str, timeout: float) -> None:
        parent, child = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "p4bg.energy.worker", str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the parent, which stops us
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send((system_xml, platform))
        if not self.conn.poll(timeout):
            self.kill()
            raise RuntimeError(f"energy worker did not start within {timeout} s")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.kill()
            raise RuntimeError(
                "energy worker exited during start-up (see its output above)"
            ) from None
        if kind != "ready":
            self.kill()
            raise RuntimeError(f"energy worker failed to create its OpenMM Context: {payload}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.conn.close()


_LIVE: weakref.WeakSet[OpenMMEnergy] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # nothing may hang at interpreter exit
    for bridge in list(_LIVE):
        bridge.close()


class OpenMMEnergy(Energy):
    """Reduced target energy ``u(x) = U(x)/kT`` of a molecular system, differentiable in ``x``.

    Args:
        system: a :class:`p4bg.systems.MolecularSystem`, or an ``openmm.System`` (then
            ``temperature`` is required).
        n_workers: worker processes (default: one per core); 0 evaluates in this process.
        platform: ``"auto"`` (measured once), or an OpenMM platform name.
        temperature: K, overrides the system's (kT = R·T).
        timeout: seconds a worker may take for its share of a batch before it is replaced.
        max_retries: re-evaluations of a share after worker failures before giving up.

    Call it on ``x`` of shape [batch, 3·n_atoms] (nm; any float dtype; CPU or CUDA): returns
    ``u`` of shape [batch], same dtype and device. Use as a context manager, or call
    :meth:`close`; worker processes are also shut down at interpreter exit.
    """

    def __init__(
        self,
        system: Any,
        n_workers: int | None = None,
        platform: str = "auto",
        temperature: float | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
    ) -> None:
        import openmm

        omm_system, temperature = resolve_target("OpenMMEnergy", system, temperature)
        n = omm_system.getNumParticles()
        if isinstance(system, MolecularSystem):
            positions = system.positions
        else:  # a grid 0.3 nm apart: where the platforms are measured
            positions = 0.3 * np.stack(np.unravel_index(np.arange(n), (n, n, n)), axis=1).astype(
                float
            )
        if n_workers is None:
            n_workers = os.cpu_count() or 1
        if n_workers < 0 or timeout <= 0 or max_retries < 0:
            raise ValueError("OpenMMEnergy: need n_workers >= 0, timeout > 0, max_retries >= 0")
        super().__init__(n, temperature)
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.stats = EnergyStats()
        self.last_failed = np.zeros(0, dtype=bool)
        self._xml = openmm.XmlSerializer.serialize(omm_system)
        self.platform = _fastest_platform(self._xml, positions) if platform == "auto" else platform
        self._closed = False
        self._context = None
        self._workers: list[_Worker] = []
        if n_workers == 0:
            self._context = make_context(self._xml, self.platform)
        else:
            try:
                self._workers = [self._start_worker() for _ in range(n_workers)]
            except BaseException:
                self.close()
                raise
        _LIVE.add(self)

    @property
    def n_workers(self) -> int:
        return len(self._workers)

    def _start_worker(self) -> _Worker:
        return _Worker(self._xml, self.platform, max(self.timeout, 60.0))

    def __repr__(self) -> str:
        return (
            f"OpenMMEnergy(n_atoms={self.n_atoms}, T={self.temperature} K, "
            f"platform={self.platform!r}, n_workers={self.n_workers})"
        )

    # ------------------------------------------------------------------------------- torch
    def __call__(self, x: Tensor) -> Tensor:
        """Reduced energies of ``x`` [batch, 3·n_atoms] nm: shape [batch], differentiable."""
        self.check_positions(x)
        return _OpenMMEnergyFunction.apply(x, self)

    # ------------------------------------------------------------------------------- numpy
    def evaluate(
        self, xyz: np.ndarray, forces: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(u, ∂u/∂x)`` in kT and kT/nm for positions ``xyz`` [batch, 3·n_atoms] nm (float64).

        ``∂u/∂x = −F/kT``; failed frames have ``u = +inf`` and gradient 0.
        """
        xyz = np.ascontiguousarray(xyz, dtype=np.float64).reshape(len(xyz), self.n_atoms, 3)
        energies, frc, failed = self._evaluate_kj(xyz, forces)
        self.stats.evaluations += len(xyz)
        self.stats.failures += int(failed.sum())
        self.last_failed = failed
        u = energies / self.kT
        grad = None if frc is None else (-frc / self.kT).reshape(len(xyz), self.dim)
        return u, grad

    def _evaluate_kj(
        self, xyz: np.ndarray, forces: bool
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        if self._closed:
            raise RuntimeError("OpenMMEnergy: used after close()")
        if self._context is not None or len(xyz) == 0:
            context = self._context or make_context(self._xml, self.platform)
            return evaluate_frames(context, xyz, forces)
        parts = [p for p in np.array_split(np.arange(len(xyz)), self.n_workers) if len(p)]
        results: dict[int, tuple] = {}
        attempts = dict.fromkeys(range(len(parts)), 0)
        todo = list(range(len(parts)))
        while todo:
            # Assign each pending part to a worker (part i to worker i: one part per worker).
            sent: dict[int, tuple[_Worker, float]] = {}
            for job in todo:
                worker = self._workers[job]
                try:
                    worker.conn.send((job, xyz[parts[job]], forces))
                    sent[job] = (worker, time.monotonic())
                except (OSError, ValueError):  # the worker is gone: replace, then resend
                    self._retry(job, attempts)
            todo = [job for job in todo if job not in sent]
            while sent:
                conns = {w.conn: job for job, (w, _) in sent.items()}
                oldest = min(t for _, t in sent.values())
                remaining = self.timeout - (time.monotonic() - oldest)
                ready = wait(list(conns), timeout=max(remaining, 0.0))
                if not ready:  # timed out: kill the slow workers, resend their parts
                    for job in list(sent):
                        if time.monotonic() - sent[job][1] >= self.timeout:
                            sent.pop(job)
                            self._retry(job, attempts)
                            todo.append(job)
                    continue
                for conn in ready:
                    job = conns[conn]
                    try:
                        reply = conn.recv()
                    except (EOFError, OSError):  # died mid-batch
                        sent.pop(job)
                        self._retry(job, attempts)
                        todo.append(job)
                        continue
                    sent.pop(job)
                    results[job] = reply[1:]
        energies = np.concatenate([results[j][0] for j in range(len(parts))])
        frc = np.concatenate([results[j][1] for j in range(len(parts))]) if forces else None
        failed = np.concatenate([results[j][2] for j in range(len(parts))])
        return energies, frc, failed

    def _retry(self, job: int, attempts: dict[int, int]) -> None:
        """Replace the worker of share ``job`` (dead or too slow), or give up after
        ``max_retries`` replacements of that share."""
        attempts[job] += 1
        if attempts[job] > self.max_retries:
            raise RuntimeError(
                f"OpenMMEnergy: a batch share failed {attempts[job]} times (worker died or "
                f"exceeded timeout={self.timeout} s); the system or the input may crash OpenMM"
            )
        self._workers[job].kill()
        self._workers[job] = self._start_worker()
        self.stats.worker_restarts += 1

    # ---------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.stop()
        self._workers = []
        self._context = None
        _LIVE.discard(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # nothing sensible to do during garbage collection
            self.close()


class _OpenMMEnergyFunction(EnergyFunction):
    """u = U(x)/kT with backward grad_u · (−F/kT), from the same OpenMM evaluation."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bridge: OpenMMEnergy) -> Tensor:
        need_grad = bool(ctx.needs_input_grad[0])
        xyz = x.detach().to(device="cpu", dtype=torch.float64).numpy()
        u, grad = bridge.evaluate(xyz, forces=need_grad)
        if need_grad:
            ctx.save_for_backward(torch.from_numpy(grad).to(device=x.device, dtype=x.dtype))
        return torch.from_numpy(u).to(device=x.device, dtype=x.dtype)
