"""Writing files so that a killed process never leaves half of one, and silencing C libraries.

Every file p4bg writes that another step reads back (datasets' chunks and metadata, run
folders' config, checkpoints and metrics, sample sets, reports) goes through :func:`write_atomic`:
the content is written to a temporary name beside the target, flushed to disk, and moved over
the target with ``os.replace``. A reader then sees the old file or the new one, never a mix.
The temporary name keeps the suffix (``chunk_00001.tmp.npz``), because some writers
(``numpy.savez``, mdtraj's DCD) choose the format by it; leftovers match ``*.tmp.*``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["quiet_c_stdio", "temporary_name", "write_atomic", "write_json"]


def temporary_name(path: Path) -> Path:
    """The name :func:`write_atomic` writes to before the move: ``name.tmp.suffix``."""
    return path.with_name(f"{path.stem}.tmp{path.suffix}")


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Replace ``path`` by ``content`` atomically and return ``path``.

    content: text (UTF-8), bytes, or a function that writes the file at the path it is given
    (``lambda tmp: np.savez(tmp, ...)``, ``lambda tmp: torch.save(state, tmp)``).
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        if callable(content):
            content(tmp)
        else:
            data = content.encode() if isinstance(content, str) else content
            with tmp.open("wb") as f:
                f.write(data)
        with tmp.open("rb+") as f:  # on disk before it replaces the old file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def quiet_c_stdio() -> Iterator[None]:
    """Silence what C code prints to the process's stdout/stderr (mdtraj's DCD plugin announces
    every file it opens); Python's own streams are flushed first and restored after."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
