"""Mutation fuzzing of the patched llama.cpp loader with dense2moe GGUFs.

A valid file is parsed down to the byte offsets of every field (header counts, each
key/value with its type, string and array lengths, each tensor's dims, type and
data offset), then one mutation, chosen and parametrised by a seed, is applied:

  kv-value      a metadata value set to an edge value (0, 2^30, 2^32-1, NaN, ...)
  array-elem    one element of a metadata array likewise (per-layer expert counts, ...)
  array-len     an array's length changed (shorter, longer, absurd)
  string-len    a key's or a string value's length changed
  kv-type       a value's type tag changed (to another or an invalid type)
  header-count  the tensor or key/value count changed
  tensor-dim    one dimension of a tensor changed
  tensor-ndims  a tensor's number of dimensions changed
  tensor-type   a tensor's ggml type changed (to another or an invalid type)
  tensor-offset a tensor's data offset moved (unaligned, overlapping, past the end)
  truncate      the file cut short (in the header or in the data)
  byte-flips    a few random bytes of the header region flipped

Each mutant runs through a tool of the sanitizer build (`make llama-asan`). The
contract: a clean refusal (exit status 1 and an error message) or a correct load
(exit 0 and the expected output); never a sanitizer report, a signal (abort,
GGML_ASSERT, segfault), a hang or an attempt to allocate without bound.

    python -m d2m_gguf.bench.fuzz BASE.gguf [BASE2.gguf ...] --bin build/llama.cpp-asan/bin --cases 500
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
           U64: "<Q", I64: "<q", F64: "<d"}

_INT_EDGES = [0, 1, 2, 3, 7, 255, 256, 511, 512, 513, 1023, 1024, 1025, 65535, 65536, 1 << 24, 1 << 30,
              (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, (1 << 62), (1 << 63) - 1, 1 << 63,
              (1 << 64) - 1]
_FLOAT_EDGES = [0.0, -0.0, -1.0, 1e-30, 1e30, float("inf"), float("-inf"), float("nan"), 3.4e38]


@dataclass
class Site:
    """A field of the file: its kind, byte offset and width, and what it belongs to."""

    kind: str          # count | key-len | type | value | str-len | arr-type | arr-len | elem | t-name-len | ...
    offset: int
    width: int
    vtype: int = -1    # the value type for value/elem sites
    owner: str = ""    # the key or tensor name


@dataclass
class GGUFLayout:
    sites: list[Site] = field(default_factory=list)
    header_end: int = 0   # end of the tensor infos (before alignment padding)
    data_start: int = 0
    size: int = 0

    def of(self, *kinds: str) -> list[Site]:
        return [s for s in self.sites if s.kind in kinds]


def parse_layout(raw: bytes) -> GGUFLayout:
    """Byte offsets of every field of a (valid) GGUF v3 file."""
    lay = GGUFLayout(size=len(raw))
    pos = 0

    def take(fmt: str) -> tuple[int, int]:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, raw, pos)
        start = pos
        pos += struct.calcsize(fmt)
        return value, start

    def string(kind: str, owner: str = "") -> str:
        nonlocal pos
        n, at = take("<Q")
        lay.sites.append(Site(kind, at, 8, owner=owner))
        text = raw[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return text

    magic, _ = take("<I")
    if magic != 0x46554747:
        raise ValueError("not a GGUF file")
    take("<I")  # version
    n_tensors, at = take("<Q")
    lay.sites.append(Site("count", at, 8, owner="n_tensors"))
    n_kv, at = take("<Q")
    lay.sites.append(Site("count", at, 8, owner="n_kv"))
    alignment = 32
    for _ in range(n_kv):
        key = string("key-len")
        vtype, at = take("<I")
        lay.sites.append(Site("type", at, 4, owner=key))
        if vtype == STRING:
            string("str-len", key)
        elif vtype == ARRAY:
            atype, at = take("<I")
            lay.sites.append(Site("arr-type", at, 4, owner=key))
            n, at = take("<Q")
            lay.sites.append(Site("arr-len", at, 8, atype, owner=key))
            for _ in range(n):
                if atype == STRING:
                    string("str-len", key)
                else:
                    _, at = take(_SCALAR[atype])
                    lay.sites.append(Site("elem", at, struct.calcsize(_SCALAR[atype]), atype, owner=key))
        else:
            value, at = take(_SCALAR[vtype])
            lay.sites.append(Site("value", at, struct.calcsize(_SCALAR[vtype]), vtype, owner=key))
            if key == "general.alignment":
                alignment = value
    for _ in range(n_tensors):
        name = string("t-name-len")
        n_dims, at = take("<I")
        lay.sites.append(Site("t-ndims", at, 4, owner=name))
        for _ in range(n_dims):
            _, at = take("<Q")
            lay.sites.append(Site("t-dim", at, 8, owner=name))
        _, at = take("<I")
        lay.sites.append(Site("t-type", at, 4, owner=name))
        _, at = take("<Q")
        lay.sites.append(Site("t-offset", at, 8, owner=name))
    lay.header_end = pos
    lay.data_start = pos + (-pos % alignment)
    return lay


# -- mutations -------------------------------------------------------------------------------------

def _edge_int(rng: random.Random, old: int) -> int:
    return rng.choice(_INT_EDGES + [old + 1, max(old - 1, 0), old * 2, old * 1000, rng.getrandbits(32)])


def _pack(vtype: int, value) -> bytes:
    fmt = _SCALAR[vtype]
    if vtype in (F32, F64):
        return struct.pack(fmt, value)
    bits = struct.calcsize(fmt) * 8
    value = int(value) % (1 << bits)
    if fmt[-1].islower() and value >= 1 << (bits - 1):  # signed
        value -= 1 << bits
    return struct.pack(fmt, value)


def _set_value(raw: bytearray, site: Site, rng: random.Random) -> str:
    if site.vtype in (F32, F64):
        value = rng.choice(_FLOAT_EDGES)
    else:
        (old,) = struct.unpack_from(_SCALAR[site.vtype], raw, site.offset)
        value = _edge_int(rng, int(old))
    raw[site.offset:site.offset + site.width] = _pack(site.vtype, value)
    return f"{site.owner} = {value}"


def _set_u(raw: bytearray, site: Site, value: int) -> None:
    raw[site.offset:site.offset + site.width] = _pack(U32 if site.width == 4 else U64, value)


def _pick(rng: random.Random, sites: list[Site], prefer: str = "dense2moe.") -> Site:
    """A site, usually one of the model's own keys rather than the vocabulary."""
    own = [s for s in sites if not s.owner.startswith("tokenizer.")]
    preferred = [s for s in own if s.owner.startswith(prefer)]
    pool = preferred if preferred and rng.random() < 0.6 else own if own and rng.random() < 0.9 else sites
    return rng.choice(pool)


def mutate(raw: bytes, seed: int) -> tuple[bytes, str]:
    """One mutant of `raw` (deterministic in `seed`) and what was done; never `raw` itself (a mutation that
    happens to write the value already there is drawn again)."""
    rng = random.Random(seed)
    lay = parse_layout(raw)
    for _ in range(100):
        out, what = _mutate_once(raw, lay, rng)
        if out != raw:
            return out, what
    raise AssertionError(f"seed {seed}: no mutation changed the file")


def _mutate_once(raw: bytes, lay: GGUFLayout, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(raw)
    kind = rng.choice(["kv-value", "kv-value", "array-elem", "array-elem", "array-len", "string-len", "kv-type",
                       "header-count", "tensor-dim", "tensor-dim", "tensor-ndims", "tensor-type", "tensor-offset",
                       "tensor-offset", "truncate", "byte-flips", "byte-flips"])
    if kind == "kv-value":
        what = _set_value(out, _pick(rng, lay.of("value")), rng)
    elif kind == "array-elem":
        site = _pick(rng, lay.of("elem"))
        what = f"{_set_value(out, site, rng)} (one element)"
    elif kind == "array-len":
        site = _pick(rng, lay.of("arr-len"))
        (old,) = struct.unpack_from("<Q", raw, site.offset)
        value = rng.choice([0, 1, max(old - 1, 0), old + 1, old * 2, 1 << 31, 1 << 40, (1 << 62), (1 << 64) - 1])
        _set_u(out, site, value)
        what = f"len({site.owner}) = {value}"
    elif kind == "string-len":
        site = _pick(rng, lay.of("key-len", "str-len", "t-name-len"))
        (old,) = struct.unpack_from("<Q", raw, site.offset)
        value = rng.choice([0, old - 1 if old else 0, old + 1, old + 7, 1 << 20, 1 << 32, (1 << 63) - 1, (1 << 64) - 1])
        _set_u(out, site, value)
        what = f"{site.kind} of {site.owner or 'a key'} = {value}"
    elif kind == "kv-type":
        site = _pick(rng, lay.of("type", "arr-type"))
        value = rng.choice([U8, I8, U16, I32, F32, BOOL, STRING, ARRAY, U64, F64, 13, 99, (1 << 32) - 1])
        _set_u(out, site, value)
        what = f"{site.kind} of {site.owner} = {value}"
    elif kind == "header-count":
        site = rng.choice(lay.of("count"))
        (old,) = struct.unpack_from("<Q", raw, site.offset)
        value = rng.choice([0, old - 1, old + 1, old * 2, 1 << 32, (1 << 63) - 1, (1 << 64) - 1])
        _set_u(out, site, value)
        what = f"{site.owner} = {value}"
    elif kind == "tensor-dim":
        site = _pick(rng, lay.of("t-dim"), prefer="blk.")
        (old,) = struct.unpack_from("<Q", raw, site.offset)
        value = _edge_int(rng, old)
        _set_u(out, site, value)
        what = f"a dim of {site.owner} = {value}"
    elif kind == "tensor-ndims":
        site = _pick(rng, lay.of("t-ndims"), prefer="blk.")
        value = rng.choice([0, 1, 2, 3, 4, 5, 255, (1 << 32) - 1])
        _set_u(out, site, value)
        what = f"n_dims of {site.owner} = {value}"
    elif kind == "tensor-type":
        site = _pick(rng, lay.of("t-type"), prefer="blk.")
        value = rng.choice(list(range(0, 42)) + [99, (1 << 31), (1 << 32) - 1])
        _set_u(out, site, value)
        what = f"type of {site.owner} = {value}"
    elif kind == "tensor-offset":
        site = _pick(rng, lay.of("t-offset"), prefer="blk.")
        (old,) = struct.unpack_from("<Q", raw, site.offset)
        data_size = len(raw) - lay.data_start
        value = rng.choice([0, old + 1, old + 32, max(old - 32, 0), data_size, data_size - 32, data_size + 4096,
                            1 << 40, (1 << 64) - 32, (1 << 64) - 1])
        _set_u(out, site, value)
        what = f"data offset of {site.owner} = {value}"
    elif kind == "truncate":
        cut = rng.choice([rng.randrange(0, lay.header_end), rng.randrange(lay.data_start, len(raw)),
                          lay.data_start, len(raw) - 1])
        del out[cut:]
        what = f"truncated to {cut} of {len(raw)} bytes"
    else:
        # flip bytes inside the fields that are not the vocabulary (which dominates the header)
        fields = [s for s in lay.sites if not s.owner.startswith("tokenizer.")]
        flips = []
        for _ in range(rng.randint(1, 8)):
            s = rng.choice(fields) if rng.random() < 0.8 else None
            at = s.offset + rng.randrange(s.width) if s else rng.randrange(lay.header_end)
            out[at] ^= 1 << rng.randrange(8)
            flips.append(at)
        what = f"bits flipped at {sorted(flips)}"
    return bytes(out), f"{kind}: {what}"


# -- running and judging -----------------------------------------------------------------------------

SANITIZER_ENV = {
    # abort on the first report so that it is a signal too; huge allocations return NULL (then bad_alloc)
    # instead of being reported, and a file that makes the loader use more than 4 GiB is a failure
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:hard_rss_limit_mb=4096:"
                    "handle_abort=1:symbolize=1",
    "UBSAN_OPTIONS": "halt_on_error=1:abort_on_error=1:print_stacktrace=1",
}
_REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "AddressSanitizer:DEADLYSIGNAL",
            "hard rss limit exhausted", "UndefinedBehaviorSanitizer")
_ABORTS = ("GGML_ASSERT", ": fatal error", "terminate called")


@dataclass
class Outcome:
    seed: int
    mutation: str
    verdict: str        # "loaded", "refused" (both fine) or "sanitizer", "abort", "crash", "hang", "bad-exit", "bad-output"
    returncode: int | None
    message: str        # the error line, or the report's first lines

    @property
    def ok(self) -> bool:
        return self.verdict in ("loaded", "refused")


def classify(returncode: int | None, stderr: str, output_ok: bool) -> tuple[str, str]:
    """(verdict, message) for one run of the tool."""
    lines = stderr.splitlines()
    report = next((i for i, l in enumerate(lines) if any(r in l for r in _REPORTS)), None)
    if returncode is None:
        return "hang", "\n".join(lines[-5:])
    if report is not None:
        return "sanitizer", "\n".join(lines[report:report + 12])
    abort = next((i for i, l in enumerate(lines) if any(a in l for a in _ABORTS)), None)
    if abort is not None:
        return "abort", "\n".join(lines[abort:abort + 6])
    if returncode < 0 or returncode > 128:
        return "crash", f"signal/exit {returncode}: " + "\n".join(lines[-8:])
    if returncode == 0:
        return ("loaded", "") if output_ok else ("bad-output", "exit 0 but the logits file is wrong")
    errors = [l for l in lines if "error" in l.lower() or "failed" in l.lower()]
    if returncode == 1 and errors:
        return "refused", errors[0].strip()
    return "bad-exit", f"exit {returncode} without an error message: " + "\n".join(lines[-5:])


def run_case(tool: Path, model: Path, work: Path, n_tokens: int = 4, timeout: float = 120) -> tuple[int | None, str, bool]:
    """Run llama-d2m-logits on `model`: (returncode or None on timeout, stderr, whether the output is right)."""
    tokens, out = work / "tokens.bin", work / "logits.bin"
    np.arange(1, n_tokens + 1, dtype="<i4").tofile(tokens)
    out.unlink(missing_ok=True)
    env = {**os.environ, **SANITIZER_ENV}
    cmd = [str(tool), "-m", str(model), "--tokens", str(tokens), "--out", str(out), "-t", "1", "-c", "32"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, err, False
    output_ok = False
    if proc.returncode == 0 and out.is_file():
        size = out.stat().st_size
        output_ok = size > 0 and size % (4 * n_tokens) == 0
    return proc.returncode, proc.stderr, output_ok


def fuzz(bases: list[Path], tool: Path, seeds: range, work: Path | None = None, timeout: float = 120,
         progress: bool = False) -> list[Outcome]:
    """Run one mutant per seed (of base seed % len(bases)) through `tool`."""
    raws = [Path(b).read_bytes() for b in bases]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="d2m-fuzz-", dir=work) as tmp:
        tmp = Path(tmp)
        model = tmp / "mutant.gguf"
        for seed in seeds:
            data, what = mutate(raws[seed % len(raws)], seed)
            model.write_bytes(data)
            rc, stderr, output_ok = run_case(tool, model, tmp, timeout=timeout)
            verdict, message = classify(rc, stderr, output_ok)
            outcome = Outcome(seed, f"{Path(bases[seed % len(bases)]).name}: {what}", verdict, rc, message)
            outcomes.append(outcome)
            if progress:
                print(f"{seed:5d} {verdict:10s} {outcome.mutation} | {message.splitlines()[0] if message else ''}",
                      file=sys.stderr, flush=True)
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.verdict] = counts.get(o.verdict, 0) + 1
    lines = [", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    for o in outcomes:
        if not o.ok:
            lines.append(f"seed {o.seed}: {o.verdict}: {o.mutation}\n    " + o.message.replace("\n", "\n    "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m d2m_gguf.bench.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("bases", nargs="+", type=Path, help="valid dense2moe GGUFs to mutate")
    ap.add_argument("--bin", type=Path, default=Path(os.environ.get("D2M_LLAMA_ASAN_BIN", "build/llama.cpp-asan/bin")))
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args(argv)
    outcomes = fuzz(args.bases, args.bin / "llama-d2m-logits", range(args.first_seed, args.first_seed + args.cases),
                    timeout=args.timeout, progress=True)
    print(summary(outcomes))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
