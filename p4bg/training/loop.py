"""The training loop: one optimizer step, and the loop that steps, reports, validates and saves.

Everything the loop works with comes from :func:`p4bg.training.build.build_run`; what a step
does with time (phase, learning rate, energy weight, annealing temperature) from
:mod:`p4bg.training.schedules`. A step never waits for the device: a non-finite loss or gradient
is found there and the fused optimizer skips the update there; values reach the host only when
they are logged. Under torchrun every rank runs the same loop on its part of the global batch;
rank 0 validates and writes, and the ranks agree after every step whether to stop.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from p4bg import distributed
from p4bg.config import TrainConfig, to_toml
from p4bg.distributed import SINGLE, World, all_sum
from p4bg.training import checkpoints, schedules
from p4bg.training.build import RunParts, build_run
from p4bg.training.objective import AnnealBuffer, annealing_log_weights, resample
from p4bg.training.plan import describe, energy_plan
from p4bg.training.reporting import RunReporter
from p4bg.training.validation import validate, validation_line

__all__ = ["ANNEAL_CHUNK", "EVALUATION_PHASES", "StopSignals", "Trainer", "host_row"]

#: Where target-energy evaluations are spent, each counted as frames evaluated (the energy's
#: own ``stats.evaluations``): the mixed phase's KL term, the annealing draws, validation.
EVALUATION_PHASES = ("mixed", "anneal", "validation")
#: Annealing draws are generated and evaluated in chunks of this many frames per process, so
#: that a large buffer never holds more than one chunk's activations.
ANNEAL_CHUNK = 4096


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's polite kill) ask the loop to stop at the end
    of the step, after a checkpoint; a second signal stops at once (``escalate``). Handlers
    are installed only in the main thread and restored on exit."""

    HANDLED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, escalate: bool = True) -> None:
        self.requested = False
        self.escalate = escalate
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and self.escalate:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.HANDLED:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def host_row(row: dict[str, Any]) -> dict[str, Any]:
    """A step's row with its tensors as Python floats (one synchronisation for them all)."""
    keys = [k for k, v in row.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(row)
    values = torch.stack([row[k].detach().double().reshape(()) for k in keys]).tolist()
    return {**row, **dict(zip(keys, values, strict=True))}


class Trainer:
    """One run: its parts (:func:`build_run`), its progress (step, counters, best validation,
    seconds) and the loop (:meth:`run`).

    ``world``: the processes of a torchrun launch (``config.batch_size`` is then each process's
    batch); ``device``: this process's (default ``config.device``); ``energy``: a target energy
    to use instead of the configuration's (u(x) [batch] kT, for tests)."""

    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        progress: bool = True,
        world: World = SINGLE,
        device: str | None = None,
        energy: Any = None,
    ) -> None:
        self.parts: RunParts = build_run(config, world, device, energy)
        self.config, self.world, self.out = config, world, Path(config.out)
        self.progress = progress and world.main
        self.step = 0
        self.counters = {"skipped_steps": 0, "energy_failures": 0}
        # the same counts for the steps since the last report, kept on the device so that a
        # training step never waits for it (added to `counters` at logging and checkpoints)
        self._pending = {name: torch.zeros((), dtype=torch.int64, device=self.device)
                         for name in self.counters}  # fmt: skip
        # target-energy evaluations by phase (EVALUATION_PHASES), all processes together as of
        # the last flush; this process's since then are added by flush_counters
        self.evaluations = dict.fromkeys(EVALUATION_PHASES, 0)
        self._pending_evaluations = dict.fromkeys(EVALUATION_PHASES, 0)
        # the step the counts start from: 0, or the resume step of a checkpoint from before
        # they existed (metrics.csv then leaves them empty rather than print a part as all)
        self.evaluations_from = 0
        self.anneal_buffer: AnnealBuffer | None = None  # the annealing draws in use
        self.best = {"val_nll": float("inf"), "step": 0}
        self.seconds = 0.0
        self.stop_requested = False  # set (by a signal or a caller) to stop after this step
        self.notes: list[str] = []  # said in train.log when the run starts
        self.reporter: RunReporter | None = None  # opened by run()
        self.parts.target.on_start = self._energy_started
        if config.energy == "torch":  # a System TorchEnergy cannot evaluate fails now
            energy_plan(config, self.system, self.device)
        if resume:
            checkpoints.resume(self, self.out / "checkpoint.pt")
        elif config.init:
            checkpoints.init_from(self.parts, Path(config.init))

    # the parts the tests and benchmarks reach for
    device = property(lambda self: self.parts.device)
    system = property(lambda self: self.parts.system)
    flow = property(lambda self: self.parts.flow)
    bg = property(lambda self: self.parts.bg)
    coordinates = property(lambda self: self.parts.coordinates)
    optimizer = property(lambda self: self.parts.optimizer)
    flat = property(lambda self: self.parts.flat)
    merger = property(lambda self: self.parts.merger)
    objective = property(lambda self: self.parts.objective)
    model = property(lambda self: self.parts.model)
    n_train = property(lambda self: len(self.parts.train_x))
    n_val = property(lambda self: len(self.parts.val.x))

    @property
    def target(self) -> Any:
        """The target energy once started (None before)."""
        return self.parts.target.energy

    def energy(self) -> Any:
        """The target energy, started on first use."""
        return self.parts.target.get()

    def _energy_started(self, energy: Any) -> None:
        if self.reporter is not None:
            self.reporter.info("target energy: %r", energy)

    def phase(self, step: int) -> str:
        return schedules.phase(self.config, step)

    def describe(self) -> str:
        return describe(self.parts, self.n_train, self.n_val)

    def flush_counters(self) -> dict[str, int]:
        """Add the device-side counts of the steps since the last call to :attr:`counters`, and
        this process's energy evaluations to :attr:`evaluations` (one synchronisation; summed
        over ranks); return the counters' totals."""
        n = len(self._pending)
        counts = torch.stack([*self._pending.values(), *(
            torch.tensor(v, dtype=torch.int64, device=self.device)
            for v in self._pending_evaluations.values())])  # fmt: skip
        totals = all_sum(counts, self.world).tolist()
        for (name, t), value in zip(self._pending.items(), totals[:n], strict=True):
            self.counters[name] += int(value)
            t.zero_()
        for name, value in zip(EVALUATION_PHASES, totals[n:], strict=True):
            self.evaluations[name] += int(value)
            self._pending_evaluations[name] = 0
        return dict(self.counters)

    def _evaluated(self) -> int:
        """Frames this process's target energy has evaluated since it started (0 before)."""
        energy = self.parts.target.energy
        if energy is None:
            return 0
        # Energy.evaluations never waits for the device; an energy without it has stats
        count = getattr(energy, "evaluations", None)
        return int(energy.stats.evaluations if count is None else count)

    def validate(self) -> dict[str, float]:
        """Validation NLL by basin and, from fresh samples, reverse ESS, log Z, mean energy."""
        p = self.parts
        energy = self.energy()
        before = self._evaluated()
        row, failures = validate(p.bg, p.val, energy, p.streams, self.config,
                                 p.temperatures)  # fmt: skip
        self.counters["energy_failures"] += failures
        self._pending_evaluations["validation"] += self._evaluated() - before
        return row

    # -------------------------------------------------------------------- steps
    def _prior(self, n: int, stream: str) -> torch.Tensor:
        p = self.parts
        return p.streams.prior(n, p.coordinates.dim, stream, p.bg.prior_scale, p.train_x.dtype,
                               p.device)  # fmt: skip

    @torch.no_grad()
    def fill_anneal_buffer(self, temperature: float) -> AnnealBuffer:
        """Draw ``anneal_samples`` (per process) from the model (τ = 1) with their energies and
        log q, for the stage at ``temperature`` K. Across processes each rank draws its part of
        the global draws and the parts are gathered, so every rank holds the same buffer."""
        cfg, world = self.config, self.world
        n = cfg.anneal_samples * world.size
        z = self._prior(n, "kl")[world.shard(n)]
        xs, us, log_qs = [], [], []
        for chunk in z.split(ANNEAL_CHUNK):
            x, log_q = self.bg.generate(chunk)
            xs.append(x)
            us.append(self.energy()(x))
            log_qs.append(log_q)
        x, u, log_q = (torch.cat(t) for t in (xs, us, log_qs))
        self._pending["energy_failures"] += (~torch.isfinite(u)).sum()
        gathered = (distributed.all_gather_rows(t, world) for t in (x, u, log_q))
        self.anneal_buffer = AnnealBuffer(*gathered, temperature=temperature, step=self.step)
        return self.anneal_buffer

    @torch.no_grad()
    def anneal_batch(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch for the annealing phase: the model's draws (:attr:`anneal_buffer`, drawn
        afresh every ``anneal_refill_every`` steps and at every new stage) weighted to the
        Boltzmann density at ``temperature`` K and resampled to ``batch_size`` frames; their NLL
        is then a self-normalised estimate of the forward KL from that density (TA-BG).
        Returns (x [batch, 3·atoms] nm, the weights' ESS as a fraction, 0-dim). Failed
        energies get weight 0; a batch whose weights are all 0 or not finite comes out NaN, so
        the step is skipped and counted. Every rank resamples the global batch alike and takes
        its part."""
        cfg, world = self.config, self.world
        b = self.anneal_buffer
        if (b is None or b.temperature != temperature
                or self.step - b.step >= cfg.anneal_refill_every):  # fmt: skip
            before = self._evaluated()
            b = self.fill_anneal_buffer(temperature)
            self._pending_evaluations["anneal"] += self._evaluated() - before
        log_w = annealing_log_weights(b.u, b.log_q, self.parts.temperatures.target, temperature)
        n = cfg.batch_size * world.size
        idx, ess, ok = resample(log_w, n, self.parts.streams["kl"])
        batch = b.x[idx[world.shard(n)]]
        return torch.where(ok, batch, torch.nan), ess

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its losses, as 0-dim tensors on the device (non-finite
        steps are skipped and counted, on the device; :func:`host_row` converts)."""
        cfg, p = self.config, self.parts
        phase = schedules.phase(cfg, self.step)
        lr = schedules.learning_rate(cfg, self.step)
        w_e = schedules.energy_weight(cfg, self.step)
        for group in p.optimizer.param_groups:
            group["lr"] = lr
        if cfg.mixed_fresh_optimizer and self.step == cfg.nll_steps > 0 and phase == "mixed":
            p.optimizer.state.clear()  # Adam starts its moments afresh at the next step
        if phase == "anneal" and self.step == cfg.nll_steps + cfg.mixed_steps:
            # the self-sampled batches' gradients are not the data's: fresh moments
            p.optimizer.state.clear()
        # every rank draws the global batch from the shared stream and takes its part
        world, n = self.world, cfg.batch_size * self.world.size
        idx = torch.randint(len(p.train_x), (n,), generator=p.streams["batches"],
                            device=p.device)[world.shard(n)]  # fmt: skip
        p.flat.zero_grad()
        extra: dict[str, Any] = {}
        if phase == "anneal":
            temperature = schedules.anneal_temperature(cfg, p.temperatures, self.step)
            x, ess = self.anneal_batch(temperature)
            loss, nll, kl, _ = p.model(x)
            extra = {"anneal_temperature": temperature, "anneal_ess": ess}
        elif phase == "mixed":
            n_kl = (cfg.kl_batch_size or cfg.batch_size) * world.size
            z = self._prior(n_kl, "kl")[world.shard(n_kl)]
            self.energy()
            before = self._evaluated()
            loss, nll, kl, u = p.model(p.train_x[idx], z, w_e)
            self._pending["energy_failures"] += (~torch.isfinite(u)).sum()
            self._pending_evaluations["mixed"] += self._evaluated() - before
        else:
            loss, nll, kl, _ = p.model(p.train_x[idx])
        loss.backward()  # across processes DDP averages the gradients here
        if world.distributed:  # the global batch's losses, alike on every rank
            losses = all_sum(torch.stack([loss.detach(), nll.detach(), kl.detach()]), world)
            loss, nll, kl = (losses / world.size).unbind()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(p.flat.tensors(), max_norm, foreach=True)
        skip = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        self._pending["skipped_steps"] += skip
        if p.optimizer.defaults.get("fused"):
            p.optimizer.found_inf = skip.to(torch.float32)
            p.optimizer.step()
        elif not bool(skip):
            p.optimizer.step()
        row = {"phase": phase, "loss": loss.detach(), "nll": nll.detach(), "kl": kl.detach(),
               "lr": lr, "w_e": w_e, "grad_norm": grad_norm.detach(), **extra}  # fmt: skip
        self.step += 1
        stats = p.merger.step()
        if stats is not None:
            row.update(merges_accepted=stats.accepted, merges_skipped=stats.skipped + stats.refused,
                       merges_forced=stats.forced, merge_resets=stats.nonfinite_resets,
                       max_residual=stats.max_residual)  # fmt: skip
        return row

    # --------------------------------------------------------------------- loop
    def run(self) -> dict[str, float]:
        """Train to ``total_steps`` (or to a stop signal), reporting and checkpointing on
        schedule; returns the last reported row."""
        cfg, world = self.config, self.world
        out = self.reporter = RunReporter(self.out, to_toml(cfg), self.step, cfg.total_steps,
                                          active=world.main, progress=self.progress)  # fmt: skip
        out.info("start at step %d of %d; device %s; %d process(es), global batch %d; %d train "
                 "/ %d val frames", self.step, cfg.total_steps, self.device, world.size,
                 cfg.batch_size * world.size, self.n_train, self.n_val)  # fmt: skip
        m = distributed.machine(self.device)
        out.info("machine: %s (%s CPUs), torch %s with %d threads, device %s", m["cpu"],
                 m["cpu_count"], m["torch"], m["torch_threads"], m["device"])  # fmt: skip
        for note in self.notes:
            out.warning(note)
        if cfg.compile:
            out.info("compile: the first step of each phase compiles the flow (minutes)")
        last: dict[str, Any] = {}
        stopped = distributed.any_rank(self.stop_requested, world)
        try:
            # torchrun passes a signal on to every process, and again before it kills them:
            # there a second signal must not cut the checkpoint short
            with out, StopSignals(escalate=not world.distributed) as signals:
                start = time.perf_counter() - self.seconds
                while self.step < cfg.total_steps and not stopped:
                    row = self.train_step()
                    self.seconds = time.perf_counter() - start
                    at_end = self.step == cfg.total_steps
                    validating = self.step % cfg.val_every == 0 or at_end
                    if (self.step % cfg.log_every == 0 or validating
                            or "merges_accepted" in row):  # fmt: skip
                        row = last = self._report(host_row(row), validating and world.main)
                    if self.step % cfg.checkpoint_every == 0 or at_end:
                        checkpoints.save(self)
                    out.advance()
                    # after every step, the ranks agree whether to stop (on the CPU)
                    stopped = distributed.any_rank(signals.requested or self.stop_requested,
                                                   world)  # fmt: skip
                if stopped and self.step < cfg.total_steps:
                    checkpoints.save(self)
                    out.info("interrupted at step %d; checkpoint saved, continue with "
                             "--resume %s", self.step, self.out)  # fmt: skip
        finally:
            self.parts.target.close()
        return {"step": self.step, **host_row(last)}

    def _report(self, row: dict[str, Any], validating: bool) -> dict[str, Any]:
        """Validate (rank 0, on schedule) and write the metrics row; returns the row."""
        out = self.reporter
        assert out is not None
        if validating:
            row.update(self.validate())
            # the data's NLL ranks models of the data's temperature: annealed ones are judged
            # by their samples (val_ess), so best.pt stays the last model before annealing
            if row["val_nll"] < self.best["val_nll"] and row["phase"] != "anneal":
                self.best = {"val_nll": row["val_nll"], "step": self.step}
                checkpoints.save_best(self)
            row["best_val_nll"] = self.best["val_nll"]
            out.info(validation_line(row, self.step, self.best, self.config,
                                     self.parts.temperatures))  # fmt: skip
        # clamps of degenerate geometry or torsion tails since the start (or the resume)
        clamped = int(all_sum(self.coordinates.n_clamped.clone(), self.world))
        counters = self.flush_counters()
        evaluations = ({f"evaluations_{k}": v for k, v in self.evaluations.items()}
                       if self.evaluations_from == 0 else {})  # fmt: skip
        out.row({**row, **counters, **evaluations, "step": self.step,
                 "clamped_coordinates": clamped, "seconds": round(self.seconds, 3)})  # fmt: skip
        return row
