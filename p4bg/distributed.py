"""Several processes, one run: ``torchrun`` launches them, :mod:`torch.distributed` joins them.

    torchrun --standalone --nproc_per_node=2 -m p4bg.train --preset smoke --out runs/ddp
    torchrun --standalone --nproc_per_node=2 -m p4bg.sample runs/ddp --n-samples 100000

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in each
process's environment; :func:`setup` reads them and joins the process group (gloo on the CPU,
NCCL on CUDA, one GPU per local rank). Without them (``python -m p4bg.train``) nothing is
initialised and :data:`SINGLE` describes the one process.

PyTorch's own engine is used as it is (DistributedDataParallel for the gradients, collectives
for the rest); what this module adds is the few collectives p4bg needs outside DDP's hooks,
written once: the broadcast of P4Inv's state after merges (:func:`broadcast_`), the sum of
counters and losses (:func:`all_sum`), agreement on stopping (:func:`any_rank`) and the
gathering of per-rank random states for checkpoints (:func:`gather_objects`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as torch_dist
from torch import Tensor

from p4bg.config import ConfigError

__all__ = [
    "SINGLE",
    "World",
    "all_sum",
    "any_rank",
    "barrier",
    "broadcast_",
    "broadcaster",
    "exit_process",
    "gather_objects",
    "launched",
    "machine",
    "pick_device",
    "run_process",
    "setup",
    "shard_sizes",
    "share",
]

# The process group of host-side control messages (None: the default group, gloo already).
_CONTROL: Any = None
# Rank 0 validates and writes checkpoints while the others wait in the next step's all-reduce:
# a validation of 10,000 samples with energies must not trip the collective timeout.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` of the
    ``local_size`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's part of a global batch of ``n`` = per-rank × size items."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


SINGLE = World()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> tuple[World, str]:
    """Join the process group torchrun describes in the environment; returns the world and
    the device this rank should use (``cuda:LOCAL_RANK`` for ``auto``/``cuda`` on a GPU
    node, else ``device`` unchanged). A single process returns (:data:`SINGLE`, ``device``)."""
    if not launched():
        return SINGLE, device
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device}: torch sees no CUDA device on this node")
        if device not in ("auto", "cuda"):
            raise ConfigError(f"device={device}: under torchrun each process takes the GPU of "
                              "its local rank; give device=cuda or auto (and choose the node's "
                              "GPUs with CUDA_VISIBLE_DEVICES)")  # fmt: skip
        device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
    global _CONTROL
    if not torch_dist.is_initialized():
        options: dict[str, Any] = {"backend": "nccl" if cuda else "gloo", "timeout": TIMEOUT}
        if cuda and "device_id" in inspect.signature(torch_dist.init_process_group).parameters:
            options["device_id"] = torch.device(device)
        torch_dist.init_process_group(**options)
        # small host-side decisions (stop or not) travel by gloo on the CPU, so that asking
        # never waits for the GPU's queue
        _CONTROL = torch_dist.new_group(backend="gloo") if cuda else None
    return World(rank, size, local, local_size), device


def shutdown() -> None:
    """Leave the process group (each rank, at the end: no hang, no warning at exit)."""
    global _CONTROL
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _CONTROL = None


def run_process(main: Callable[[], Any]) -> None:
    """Run ``main``, the whole life of a command; under torchrun, end the process with
    :func:`exit_process` and the exit code ``main`` gave (SystemExit) or 1 for an error.

    Why: DistributedDataParallel keeps a reference to the gloo process group that outlives
    both the wrapper and ``destroy_process_group`` (torch 2.13: constructing DDP is enough),
    so gloo's worker threads run on into the interpreter's teardown. If one of them is still
    freeing a finished all-reduce's tensors then, it waits for the GIL, is unwound by the
    exiting interpreter and aborts the process (SIGABRT, "terminate called without an
    active exception") after a run that finished well: in about 1 of 25 two-process smoke
    runs here, and more often on other machines. Skipping the teardown removes the race."""
    if not launched():
        main()
        return
    code = 0
    try:
        main()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # SystemExit("message"), as Python prints it
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException as error:  # printed as Python would; 130 for Ctrl-C, as a shell says
        traceback.print_exc()
        code = 130 if isinstance(error, KeyboardInterrupt) else 1
    exit_process(code)


def exit_process(code: int = 0) -> NoReturn:
    """End this process as Python's exit would (exit handlers run, output flushed), but
    without the interpreter's teardown, which threads of a leaked process group can abort
    (:func:`run_process`). Leave the process group (:func:`shutdown`) first."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe
            stream.flush()
    os._exit(code)


def ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel: parameters and buffers from rank 0 once, here;
    buffers not again on every forward pass (P4Inv's change only at merges, which broadcast
    them: :class:`p4bg.nn.P4Merger`)."""
    parallel = torch.nn.parallel.DistributedDataParallel
    keys = inspect.signature(parallel).parameters
    # torch >= 2.13 names it forward_sync_buffers; broadcast_buffers before (deprecated since)
    sync = "forward_sync_buffers" if "forward_sync_buffers" in keys else "broadcast_buffers"
    ids = [device] if device.type == "cuda" else None
    return parallel(module, device_ids=ids, **{sync: False})


def all_sum(t: Tensor, world: World) -> Tensor:
    """``t`` summed over ranks, in place (unchanged in a single process)."""
    if world.distributed:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, world: World) -> bool:
    """Whether ``flag`` is set on any rank (a collective on the CPU: every rank must call it;
    it does not wait for a GPU)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)])
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=_CONTROL)
    return bool(t.item())


def broadcast_(tensors: Sequence[Tensor], world: World, src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values, bit for bit: one
    collective for them all (packed as float64, exact for float32 and for integers < 2⁵³)."""
    if not world.distributed or not tensors:
        return
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    torch_dist.broadcast(flat, src=src)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a collective)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    torch_dist.all_gather_object(out, obj)
    return out


def all_gather_rows(t: Tensor, world: World) -> Tensor:
    """Every rank's ``t`` (same shape on all) concatenated along dim 0, in rank order."""
    if not world.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(world.size)]
    torch_dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def shard_sizes(n: int, shards: int) -> list[int]:
    """``n`` items split over ``shards`` as evenly as possible, the larger parts first."""
    return [n // shards + (k < n % shards) for k in range(shards)]


def share(n: int, world: World) -> int:
    """This process's part of ``n`` per-node resources (e.g. energy worker processes): the
    processes on a node share its cores. At least 1 (0 stays 0: no workers, in-process)."""
    return n if n == 0 else max(1, n // world.local_size)


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA where torch sees it, else the CPU; ``cuda[:N]`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: torch sees no CUDA device here; use device=cpu or auto")
    return torch.device(name)


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a timing was measured on: CPU model and cores, torch and its threads, and the
    device (a GPU's name and memory), for the records that quote wall times."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)  # fmt: skip
    except OSError:
        pass
    out: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(),
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "python": platform.python_version()}  # fmt: skip
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out["device"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    elif dev is not None:
        out["device"] = str(dev)
    return out


def barrier(world: World) -> None:
    """Wait until every rank gets here (nothing in a single process)."""
    if world.distributed:
        torch_dist.barrier()


def broadcaster(world: World) -> Callable[[list[Tensor]], None] | None:
    """The ``broadcast`` of :class:`p4bg.nn.P4Merger` for ``world``: rank 0's values to every
    rank (None for a single process, where there is nothing to synchronise)."""
    if not world.distributed:
        return None
    return lambda tensors: broadcast_(tensors, world)
