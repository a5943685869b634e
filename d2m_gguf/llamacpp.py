"""Driving the (patched) llama.cpp tools and reading what they print.

Binaries are looked up in $D2M_LLAMA_BIN, then in build/llama.cpp/bin of this
checkout (where `make llama` puts them). `wrapper` runs them through an emulator
(qemu for the arm64 build).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import D2MError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO / "build" / "llama.cpp" / "bin"
QEMU = ("qemu-aarch64-static", "-cpu", "max")   # runs the arm64 build here (NEON, dotprod, i8mm)


@dataclass(frozen=True)
class LlamaCpp:
    """A directory of llama.cpp tools, optionally run under a wrapper (e.g. qemu-aarch64-static)."""

    bin_dir: Path
    wrapper: tuple[str, ...] = ()
    threads: int = 2

    @classmethod
    def default(cls) -> "LlamaCpp":
        return cls(Path(os.environ.get("D2M_LLAMA_BIN", DEFAULT_BIN)))

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise D2MError(f"{path}: not built (run `make llama`)")
        return path

    def run(self, name: str, args: Sequence[str], timeout: float = 3600, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        cmd = [*self.wrapper, str(self.tool(name)), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, errors="replace")
        if check and proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise D2MError(f"{name} failed (exit {proc.returncode}): {tail}")
        return proc

    def run_to_the_end(self, name: str, args: Sequence[str], end: re.Pattern, attempts: int = 3
                       ) -> subprocess.CompletedProcess:
        """`run` for a tool whose log is read, with OpenMP threads that sleep when idle, again if the log lost
        its tail. The pinned llama.cpp logs from a thread that the exit does not wait for (common/log.cpp leaks
        the logger on purpose), and OpenMP's spinning workers can keep that thread off the CPU until the exit:
        measured on 2 loaded cores, llama-perplexity of a tiny model lost its last line in 11 of 30 runs (once
        every chunk's estimate but the first), with OMP_WAIT_POLICY=passive in none of 30. The log is a queue:
        when the last line that matters (`end`) is there, everything before it is too."""
        for _ in range(attempts):
            proc = self.run(name, args, env={"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")})
            if end.search(proc.stdout + proc.stderr):
                return proc
        raise D2MError(f"{name}: the log lost its last lines in {attempts} runs (llama.cpp's logger is not "
                       "flushed at exit)")

    # -- tools ------------------------------------------------------------------------------

    def logits(self, model: Path, tokens: Sequence[int], mode: str = "batch", ctx: int | None = None,
               prefill: int = 0) -> tuple[np.ndarray, str]:
        """Logits [n_tokens, n_vocab] from `llama-d2m-logits` (batch prefill or token-by-token decode, the decode
        after a one-batch prefill of the first `prefill` tokens), and its log."""
        with tempfile.TemporaryDirectory() as tmp:
            tok_file, out_file = Path(tmp) / "tokens.bin", Path(tmp) / "logits.bin"
            np.asarray(tokens, dtype="<i4").tofile(tok_file)
            args = ["-m", model, "--tokens", tok_file, "--out", out_file, "--mode", mode, "-t", self.threads]
            if ctx:
                args += ["-c", ctx]
            if prefill:
                args += ["--prefill", prefill]
            proc = self.run("llama-d2m-logits", args)
            data = np.fromfile(out_file, dtype="<f4")
        return data.reshape(len(tokens), -1), proc.stderr

    def perplexity(self, model: Path, text_file: Path, ctx: int = 512, chunks: int | None = None,
                   batch: int | None = None, extra: Sequence[str] = ()) -> tuple[float, str]:
        """WikiText-style perplexity from `llama-perplexity` (its final estimate) and its log (the running
        per-chunk estimates, then the loader's messages: `chunk_nlls` reads the first)."""
        args = ["-m", model, "-f", text_file, "-c", ctx, "-t", self.threads, *extra]
        if chunks:
            args += ["--chunks", chunks]
        if batch:
            args += ["-b", batch, "-ub", batch]
        proc = self.run_to_the_end("llama-perplexity", args, end=_PPL)
        log = proc.stdout + proc.stderr
        return parse_perplexity(log), log

    def complete(self, model: Path, prompt: str, n: int = 24, extra: Sequence[str] = ()) -> tuple[str, str]:
        """Greedy completion text from `llama-completion`, and its log."""
        proc = self.run_to_the_end("llama-completion", ["-m", model, "-p", prompt, "-n", n, "--temp", 0, "-no-cnv",
                                             "-t", self.threads, "-c", 512, *extra], end=_PERF_END)
        return proc.stdout, proc.stderr

    def quantize(self, src: Path, dst: Path, qtype: str, extra: Sequence[str] = ()) -> str:
        proc = self.run("llama-quantize", [*extra, src, dst, qtype, self.threads])
        return proc.stdout + proc.stderr


_PERF_END = re.compile(r"common_perf_print:\s+sampling time")   # the first line after the text
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")
_KV = re.compile(r"llama_kv_cache: size =\s*([0-9.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers")


def parse_perplexity(log: str) -> float:
    m = _PPL.search(log)
    if not m:
        raise D2MError("llama-perplexity printed no final estimate")
    return float(m.group(1))


_RUNNING_PPL = re.compile(r"\[(\d+)\]([0-9.]+),")


def chunk_nlls(log: str) -> list[float]:
    """Mean NLL of each chunk, recovered from llama-perplexity's running estimates `[i]ppl_i`, where
    ln ppl_i is the mean NLL of chunks 1..i: nll_i = i ln ppl_i - (i - 1) ln ppl_(i-1). Two models scored on
    the same chunks can then be compared chunk by chunk (`paired_log_ratio`)."""
    running = [(int(i), math.log(float(v))) for i, v in _RUNNING_PPL.findall(log)]
    if not running or [i for i, _ in running] != list(range(1, len(running) + 1)):
        raise D2MError("llama-perplexity printed no running per-chunk estimates")
    return [i * m - (i - 1) * prev for (i, m), prev in zip(running, [0.0] + [m for _, m in running[:-1]])]


def paired_log_ratio(a: list[float], b: list[float]) -> tuple[float, float]:
    """ln(ppl_a / ppl_b) over the chunks both scored, and its standard error from the chunk-to-chunk spread of
    the differences: much tighter than either perplexity's own ± (the text's difficulty varies per chunk and
    cancels in the difference)."""
    if len(a) != len(b) or len(a) < 2:
        raise D2MError(f"paired comparison needs the same chunks (>= 2), got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


@dataclass(frozen=True)
class KvCacheInfo:
    mib: float
    cells: int
    layers: int


def parse_kv_cache(log: str) -> KvCacheInfo:
    """llama.cpp's `llama_kv_cache: size = X MiB (N cells, L layers, ...)` line of the first context the log
    creates (tools that fit parameters to memory create one more); a sliding-window model's context has two
    caches (the full layers', the windowed layers'): their sizes and layers add up, cells are the larger."""
    found = list(_KV.finditer(log))
    if not found:
        raise D2MError("no llama_kv_cache size line in the log")
    found = found[:2] if "llama_kv_cache_iswa: creating" in log else found[:1]
    return KvCacheInfo(sum(float(m.group(1)) for m in found), max(int(m.group(2)) for m in found),
                       sum(int(m.group(3)) for m in found))
