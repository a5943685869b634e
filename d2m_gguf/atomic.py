"""Atomic output files: a result appears complete or not at all.

A conversion that dies halfway must never leave a file that looks valid, so every
output is written to a temporary file beside the target, fsynced, then renamed
over it (rename is atomic within one directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import D2MError


def check_output_path(path: Path, need_bytes: int = 0) -> None:
    """Fail early, before hours of work, if `path` cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise D2MError(f"{path}: output directory {parent} does not exist")
    if not parent.is_dir():
        raise D2MError(f"{path}: {parent} is not a directory")
    if path.is_dir():
        raise D2MError(f"{path}: is a directory, expected a file path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise D2MError(f"{path}: output directory {parent} is not writable")
    # os.access answers for permission bits only (root passes it everywhere, pseudo file systems
    # accept nothing): creating a file is the only honest test
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise D2MError(f"{path}: output directory {parent} is not writable ({e.strerror})") from e
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise D2MError(
                f"{path}: not enough disk space: need {need_bytes / 2**20:.0f} MiB, "
                f"{free / 2**20:.0f} MiB free in {parent}"
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    On any exception (or a kill: the temp name is never the target) the target is
    untouched and the temporary file is removed.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as e:
        raise D2MError(f"{path}: cannot create a file in {path.parent}: {e.strerror}") from e
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make outputs private
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
