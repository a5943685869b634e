"""Where a table came from: the date, the checkout's commit, the machine and the command that reproduces it.

`provenance()` is taken once when a bench command starts; every table it writes (matrix.md, lfuc.md,
curve.md) opens with it (`tables.provenance_lines`) and its settings.json carries it as its first key.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..llamacpp import REPO   # the checkout (or the folder above an installed package)

CPUINFO = Path("/proc/cpuinfo")


def provenance(argv: list[str] | None = None) -> dict[str, str]:
    """date (UTC), commit, machine, command: one short line each, in that order."""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "commit": git_commit(),
            "machine": machine(),
            "command": command(sys.argv if argv is None else argv)}


def git_commit(repo: Path = REPO) -> str:
    """The checkout's short commit, with "+ uncommitted changes" when a tracked file differs from it;
    "unknown" when the package does not sit in a git checkout of its own (an installed copy, no git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != repo.resolve():
            return "unknown"      # some other repository around an installed copy
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def machine(cpuinfo: Path = CPUINFO) -> str:
    """CPU model, core count and the SIMD it has (AVX-512, AVX2, bf16, NEON) as its flags say."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or fields.get("hardware") or platform.processor() or platform.machine() \
        or "unknown CPU"
    flags = set((fields.get("flags") or fields.get("features") or "").split())    # x86: flags, Arm: Features
    if flags:
        has = {"AVX-512": "avx512f" in flags, "AVX2": "avx2" in flags,
               "bf16": bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}), "NEON": bool(flags & {"asimd", "neon"})}
        simd = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in has.items())
    else:
        simd = "SIMD flags unknown"
    return f"{model} ({platform.machine()}), {os.cpu_count() or '?'} cores; {simd}"


def memory() -> str:
    """The machine's total RAM ("23.4 GiB RAM"), for tables whose numbers depend on it (`d2m bench scale`)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "unknown RAM"
    return f"{total / 2**30:.1f} GiB RAM"


def command(argv: list[str]) -> str:
    """The command line as run; `python -m pkg` for a package's __main__ (whose argv[0] is its file)."""
    argv = [str(a) for a in argv]
    if argv and Path(argv[0]).name == "__main__.py":
        argv[:1] = ["python", "-m", Path(argv[0]).parent.name]
    return shlex.join(argv)


__all__ = ["provenance", "git_commit", "machine", "memory", "command"]
