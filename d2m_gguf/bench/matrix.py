"""`make bench`: the quantization x variant x KV-cache matrix and its Pareto fronts at three context depths
(matrix.csv, matrix.md, pareto-d<depth>.png under bench/results/<stamp>/).

Rows are (variant, weight type, KV-cache type) triples a user could run: dense, layer-pruned baselines, LF-UC
variants (optionally plain sparse upcycling, a hand-written plan, depth-aware plans at the depth they target),
each at f16, llama-quantize types and the device recipes of quant/; the `kv_quants` weight types also with a
quantized KV cache (`-ctk/-ctv`, the stock alternative that shrinks what attention reads at depth). Every
number is measured by the patched llama.cpp (flash attention on, as its default picks on a CPU) or read off
the written GGUF:

- quality: `llama-perplexity` on WikiText-2 test against the f16 dense model's saved logits at the same ctx
  (`--kl-divergence-base` once per ctx, then `--kl-divergence` per row): perplexity, mean KLD and top-1
  agreement at ctx 512 (every row) and at the long ctx (the `deep_quants` rows), each a stated number of chunks;
- speed: `llama-bench` decode at depth 0 (every row, with prompt speed) and at the deeper depths (the
  `deep_quants` rows), one process per KV-cache type in each file order (llamabench.llama_bench), so ratios
  within a column hold; the dense rows again with the stock build, for the runtime's efficiency;
- the planner against the measurement: per depth, predicted speedup (roofline on this machine's probed
  bandwidth) beside the measured one (both against dense at the same weight type with an f16 KV cache), and
  the efficiency bytes read per token x tok/s / probed bandwidth;
- the Pareto front per depth (bench/pareto.py): `front_d<depth>` column, a headline sentence, a picture;
- arm64: for the rows picked (Q4_0 / phone recipe rows; emulation is slow) the static arm64 build's perplexity
  under qemu on a short slice, compared with the host build's on the same slice (within 2%).

A row that fails (a build, a quantization, a tool) is recorded with status `failed` and its error; the rest of
the matrix still completes. Nothing here asserts a timing.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..costmodel import Device, gguf_cost, host_device, load_devices
from ..errors import D2MError
from ..ggufout import OutType
from ..llamacpp import QEMU, REPO, LlamaCpp
from ..heal import HealSettings
from ..options import setting
from ..quantize import quantize_file, recipe_names
from ..reader import field as gguf_field, open_gguf
from .llamabench import bench_args, llama_bench, parse_llama_bench, runtime_args, speed_rows
from .pareto import front_rows, headline, measured, num as _num, plot_front, row_label
from .provenance import provenance
from .tables import markdown_table, publish as publish_files, read_provenance_lines, write_table
from .variants import Variant, build_plan_variant, build_variant, cached_build, heal_key, results_setting

log = logging.getLogger("d2m")

PLAIN_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_NL")
RECIPES = ("host", "phone-i8mm", "phone-dotprod", "rpi5")
KNOWN_QUANTS = set(PLAIN_QUANTS) | {"F32", "BF16", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                                    "Q4_K_S", "Q5_K_S", "IQ4_XS", "Q4_K", "Q5_K", "Q3_K"}
# The full matrix's weight types: the f16 reference, the 8-bit and 4-bit k-quant points, the phone types (Q4_0 is
# what the ARM repack path serves; the recipes of quant/); the other types on request (--quants), to keep the
# three depths affordable on 2 cores.
FULL_QUANTS = ("F16", "Q8_0", "Q4_K_M", "Q4_0", "IQ4_NL", "phone-i8mm", "phone-dotprod")
PHONES = ("phone-i8mm", "phone-i8mm-g2", "phone-dotprod", "rpi5")
MATRIX_HEAL_TOKENS = 320_000   # half the job's default: each variant heals in a few minutes
DEPTHS = (0, 1024, 4096)       # decode timing depths (llama-bench -d)
LONG_CTX = 4096                # the long-context quality ctx


@dataclass(frozen=True)
class MatrixVariant:
    """A row group: a pipeline variant (method + size, optionally planned depth-aware) or a hand-written plan."""

    method: str                 # dense | lfuc | prune | attn-prune | upcycle
    fuse: int = 0
    plan: Path | None = None    # a hand-written plan (examples/plans) instead of the planner
    label: str = ""
    depth_aware: int | None = None   # planned depth-aware for this context depth: measured on the deep rows only

    @property
    def variant(self) -> Variant:
        return Variant(self.method, self.fuse, self.depth_aware)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.plan is not None:
            return f"{self.method}-{Path(self.plan).stem}"
        return self.variant.name

    @property
    def series(self) -> str:
        """The method as the plots and headlines name it (depth-aware plans apart from the others)."""
        return self.variant.label + (f"@{self.depth_aware}" if self.depth_aware is not None else "")


# The arm64-vs-host perplexity check (here and in tests/test_arm64.py): 4 x 128 tokens of WikiText. On
# 2 x 128 the two builds' Q4_0 rounding alone moved a SmolLM2 hybrid's ppl by 2.4% (AVX2 host); on 4 x 128 by 0.1%.
ARM64_CHECK_CTX, ARM64_CHECK_CHUNKS, ARM64_CHECK_CHARS = 128, 4, 12_000
ARM64_CHECK_TOLERANCE = 0.02


@dataclass(frozen=True)
class Arm64Check:
    """One model's perplexity from the arm64 build under qemu and from the host build, on the same text."""

    arm64: float
    host: float

    @property
    def agrees(self) -> bool:
        return abs(self.arm64 / self.host - 1) <= ARM64_CHECK_TOLERANCE

    def __str__(self) -> str:
        return f"{'yes' if self.agrees else 'NO'} (arm64 {self.arm64:.3f} / host {self.host:.3f})"


def arm64_check_text(wikitext: Path, out: Path) -> Path:
    """The text the check reads: the start of WikiText, enough for its chunks and cheap to tokenize under qemu."""
    out.write_text(Path(wikitext).read_text(encoding="utf-8")[:ARM64_CHECK_CHARS], encoding="utf-8")
    return out


def arm64_check(host: LlamaCpp, arm64: LlamaCpp, model: Path, text: Path, logs: Path | None = None,
                ctx: int = ARM64_CHECK_CTX, chunks: int = ARM64_CHECK_CHUNKS) -> Arm64Check:
    """Same model, same text, both builds: the arm64 kernels (repack, dotprod, i8mm) must read what the host reads."""
    h, hlog = host.perplexity(model, text, ctx=ctx, chunks=chunks)
    a, alog = arm64.perplexity(model, text, ctx=ctx, chunks=chunks)
    if logs is not None:
        (logs / f"arm64-{model.stem}.log").write_text(alog)
        (logs / f"arm64-host-{model.stem}.log").write_text(hlog)
    return Arm64Check(arm64=a, host=h)


@dataclass
class MatrixRequest:
    hf_dir: Path
    variants: tuple[MatrixVariant, ...]
    quants: tuple[str, ...] = setting(FULL_QUANTS, "Quant types and device recipes (quant/).",
                                      default_text=f"{','.join(FULL_QUANTS)}; QUICK F16,Q4_0,phone-i8mm")
    kv_types: tuple[str, ...] = setting(("q8_0", "q4_0"), "Quantized KV-cache types (-ctk/-ctv) measured as "
                                        "alternatives, beside f16, on the --kv-quants rows.")
    kv_quants: tuple[str, ...] = setting(("Q4_0",), "Weight types also measured with each quantized KV cache.")
    deep_quants: tuple[str, ...] = setting(("F16", "Q4_0"), "Weight types timed at every depth and scored at the "
                                           "long ctx (the others: depth 0, ctx 512).")
    depths: tuple[int, ...] = setting(DEPTHS, "Context depths of the decode timing (llama-bench -d).",
                                      default_text="0,1024,4096; QUICK 0,1024")
    wikitext: Path | None = None
    calibration: Path | None = None
    ctx: int = 512
    chunks: int = setting(8, "WikiText-2 test chunks of 512 tokens per row.", default_text="8; QUICK 3")
    long_ctx: int = LONG_CTX
    long_chunks: int = setting(2, "WikiText-2 test chunks at the long ctx per deep row.", default_text="2; QUICK 1")
    heal: HealSettings = field(default_factory=lambda: HealSettings(tokens=MATRIX_HEAL_TOKENS))
    n_prompt: int = 128
    n_gen: int = 64
    repetitions: int = 3
    deep_repetitions: int = 2
    flash_attn: str = "on"                # what llama.cpp's `auto` picks on a CPU; a quantized V cache needs it
    imatrix_chunks: int = 32              # calibration chunks (ctx 256) for llama-imatrix, one run per variant
    qemu_quants: tuple[str, ...] = ("phone-i8mm", "Q4_0")   # quant types that get the arm64/qemu column
    qemu_max_rows: int = 3                # picked across methods first (dense, lfuc, prune, ...)
    qemu_ctx: int = ARM64_CHECK_CTX
    qemu_chunks: int = ARM64_CHECK_CHUNKS
    arm64_bin: Path | None = None
    stock_bin: Path | None = None         # the unpatched build (dense rows again, for the runtime's efficiency)
    results: Path = results_setting()
    publish: Path | None = setting(None, "Also copy matrix.md/.csv, the pictures and settings.json here "
                                   "(e.g. docs/matrix).")
    llama: LlamaCpp | None = None
    progress: bool = False
    title: str = "d2m quantization matrix"

    def row_types(self, v: MatrixVariant) -> list[tuple[str, str]]:
        """The (weight type, KV-cache type) rows of a variant: every quant type with an f16 cache, the
        `kv_quants` also with each quantized cache; a depth-aware variant only its deep rows."""
        kvs = ("f16", *self.kv_types)
        pairs = [(q, kv) for q in self.quants for kv in (kvs if q in self.kv_quants else ("f16",))]
        if v.depth_aware is not None:
            pairs = [(q, kv) for q, kv in pairs if q in self.deep_quants]
        return pairs

    def quality_of(self, depth: int) -> tuple[str, str]:
        """The quality column a depth's front uses, and its name: ctx 512 at depth 0, the long ctx deeper."""
        if depth == 0:
            return "ppl", f"WikiText-2 ppl, ctx {self.ctx}"
        return f"ppl_c{self.long_ctx}", f"WikiText-2 ppl, ctx {self.long_ctx}"


def quick_request(hf_dir: Path, **kw) -> MatrixRequest:
    """`make bench QUICK=1`: dense + the hand-written LF-UC plan (unhealed), three quant types, one quantized KV
    cache, depths 0 and 1024 (long ctx 1024), few chunks."""
    plan = REPO / "examples" / "plans" / "smollm2-all-kinds.json"
    base = dict(variants=(MatrixVariant("dense"), MatrixVariant("lfuc", plan=plan, label="lfuc-plan")),
                quants=("F16", "Q4_0", "phone-i8mm"), kv_types=("q8_0",), depths=(0, 1024), chunks=3,
                long_ctx=1024, long_chunks=1, heal=HealSettings(tokens=0), n_prompt=64, n_gen=32, repetitions=2,
                deep_repetitions=2, imatrix_chunks=8, qemu_max_rows=1, qemu_quants=("phone-i8mm",),
                title="d2m quantization matrix (QUICK)")
    base.update(kw)
    return MatrixRequest(hf_dir=hf_dir, **base)


def full_request(hf_dir: Path, **kw) -> MatrixRequest:
    """The default matrix: dense, the pruning baseline and LF-UC at 8 (320k healing tokens each), and both planned
    depth-aware for the deepest depth (same bytes at that depth, same healing), at FULL_QUANTS and the quantized
    KV caches. Other sizes and methods: `d2m bench lfuc` / `curve`."""
    deepest = max(kw.get("depths", DEPTHS))
    variants = (MatrixVariant("dense"), MatrixVariant("prune", 8), MatrixVariant("lfuc", 8),
                MatrixVariant("prune", 8, depth_aware=deepest), MatrixVariant("lfuc", 8, depth_aware=deepest))
    base = dict(variants=variants)
    base.update(kw)
    return MatrixRequest(hf_dir=hf_dir, **base)


# ---- llama-perplexity with KL divergence ------------------------------------------------------------

_MEAN_PPL = re.compile(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)")
_FINAL_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")
_KLD = re.compile(r"Mean\s+KLD:\s*([0-9.eE+-]+)\s*±\s*([0-9.eE+-]+)")
_BASE_PPL = re.compile(f"{_FINAL_PPL.pattern}|{_MEAN_PPL.pattern}")
_TOP1 = re.compile(r"Same top p:\s*([0-9.]+)\s*±\s*([0-9.]+)")


def kld_base(llama: LlamaCpp, model: Path, text: Path, base: Path, ctx: int, chunks: int, log_file: Path,
             extra: list[str] = ()) -> float:
    """Perplexity of the reference (f16 dense) and its saved logits for `--kl-divergence`."""
    proc = llama.run_to_the_end("llama-perplexity", ["-m", model, "-f", text, "-c", ctx, "--chunks", chunks,
                                                     "-t", llama.threads, "--kl-divergence-base", base, *extra],
                                end=_BASE_PPL)
    out = proc.stdout + proc.stderr
    log_file.write_text(out, encoding="utf-8")
    m = _BASE_PPL.search(out)
    if not m or not base.is_file():
        raise D2MError("llama-perplexity --kl-divergence-base printed no estimate")
    return float(m.group(1) or m.group(2))


def kld_row(llama: LlamaCpp, model: Path, base: Path, ctx: int, chunks: int, log_file: Path,
            extra: list[str] = ()) -> dict:
    """Perplexity, mean KLD and top-1 agreement of `model` against the saved reference logits (`extra`: the
    row's runtime settings, e.g. its KV-cache type)."""
    proc = llama.run_to_the_end("llama-perplexity", ["-m", model, "-c", ctx, "--chunks", chunks,
                                                     "-t", llama.threads, "--kl-divergence-base", base,
                                                     "--kl-divergence", *extra], end=_TOP1)
    out = proc.stdout + proc.stderr
    log_file.write_text(out, encoding="utf-8")
    ppl, kld, top1 = _MEAN_PPL.search(out), _KLD.search(out), _TOP1.search(out)
    if not (ppl and kld and top1):
        raise D2MError(f"llama-perplexity --kl-divergence: no statistics in {log_file}")
    return {"ppl": float(ppl.group(1)), "kld_mean": float(kld.group(1)), "kld_err": float(kld.group(2)),
            "top1_pct": float(top1.group(1))}


# ---- building the files -------------------------------------------------------------------------------

def build_f16(v: MatrixVariant, req: MatrixRequest, work: Path) -> Path:
    """The row group's f16 GGUF, from the build cache shared with `bench lfuc` / `bench curve`."""
    if v.plan is None:
        return build_variant(v.variant, req.hf_dir, work, OutType.F16, req.heal, None, req.progress)
    return build_plan_variant(v.name, Path(v.plan), req.hf_dir, work, OutType.F16, req.heal, req.progress)


def build_quant(f16: Path, quant: str, req: MatrixRequest, work: Path, imatrix: dict) -> Path:
    """The row's GGUF: the f16 file itself, or quantized with the variant's importance matrix (cached)."""
    if quant.upper() == "F16":
        return f16
    is_recipe = quant in recipe_names()
    if not is_recipe and quant.upper() not in KNOWN_QUANTS:
        raise D2MError(f"unknown quantization type {quant!r} (types: {', '.join(sorted(KNOWN_QUANTS))}; "
                       f"recipes: {', '.join(recipe_names())})")
    out = work / f"{f16.stem.removesuffix('-f16')}-{quant.lower() if not is_recipe else quant}.gguf"
    st = f16.stat()
    recipe_text = (REPO / "quant" / f"{quant}.json").read_text() if is_recipe else ""
    settings = json.dumps({"src": f16.name, "src_size": st.st_size, "src_mtime": st.st_mtime, "quant": quant,
                           "recipe": recipe_text, "imatrix_chunks": req.imatrix_chunks}, sort_keys=True)

    def build() -> None:
        qwork = work / f"{f16.stem}.quant"
        rep = quantize_file(f16, out, quant, llama=req.llama, text=req.calibration, chunks=req.imatrix_chunks,
                            imatrix=imatrix.get(f16), work_dir=qwork)
        if rep.imatrix is not None:
            imatrix[f16] = rep.imatrix
            if rep.coverage:
                (qwork / "expert-tokens.txt").write_text("\n".join(c.line() for c in rep.coverage) + "\n")

    return cached_build(out, settings, build)


# ---- the matrix -------------------------------------------------------------------------------------------

def _fmt_err(e: BaseException) -> str:
    msg = str(e).strip().replace("\n", " ").replace("|", "/")
    return f"{type(e).__name__}: {msg}"[:300]


def run_matrix(req: MatrixRequest) -> Path:
    """Build, quantize and measure every row; write matrix.csv, matrix.md, pareto-d<depth>.png and the tool logs."""
    from ..data import DEFAULT_CALIBRATION, DEFAULT_EVAL

    prov = provenance()
    t0 = time.monotonic()
    llama = req.llama = req.llama or LlamaCpp.default()
    req.wikitext = Path(req.wikitext or DEFAULT_EVAL)
    req.calibration = Path(req.calibration or DEFAULT_CALIBRATION)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(req.results) / stamp
    n = 1
    while out_dir.exists():
        out_dir = Path(req.results) / f"{stamp}-{n}"
        n += 1
    logs = out_dir / "logs"
    work = Path(req.results) / "work"
    for d in (logs, work):
        d.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    files: dict[int, Path] = {}
    total = sum(len(req.row_types(v)) for v in req.variants)
    devices = load_devices()
    f16_of: dict[MatrixVariant, Path | Exception] = {}
    imatrix: dict[Path, Path] = {}
    # the f16 dense reference at both ctx: (ctx, chunks) -> its saved logits, perplexity or error
    refs = {(req.ctx, req.chunks): None, (req.long_ctx, req.long_chunks): None}

    def say(msg: str) -> None:
        el = time.monotonic() - t0
        print(f"[{el / 60:5.1f} min] {msg}", flush=True)

    def runtime(kv: str) -> list[str]:
        return runtime_args(kv, req.flash_attn)

    # 1. the reference: f16 dense logits on the WikiText slice, at ctx 512 and at the long ctx
    dense = MatrixVariant("dense")
    for ctx, chunks in refs:
        base = work / f"kld-base-{_slug(req.wikitext)}-c{ctx}-n{chunks}-fa{req.flash_attn}.bin"
        try:
            if dense not in f16_of:
                f16_of[dense] = build_f16(dense, req, work)
            ppl = kld_base(llama, f16_of[dense], req.wikitext, base, ctx, chunks,
                           logs / f"ppl-kld-base-dense-f16-c{ctx}.log", runtime("f16"))
            refs[ctx, chunks] = (base, ppl)
            say(f"reference: dense f16 ppl {ppl:.3f} (ctx {ctx}, {chunks} chunks)")
        except Exception as e:  # noqa: BLE001 - recorded, the rows say why
            refs[ctx, chunks] = e
            say(f"reference at ctx {ctx} failed: {_fmt_err(e)}")
            if dense not in f16_of:
                f16_of[dense] = e

    def quality(row: dict, f: Path, ctx: int, chunks: int, suffix: str) -> None:
        ref = refs[ctx, chunks]
        if isinstance(ref, Exception):
            raise D2MError(f"no f16 dense reference at ctx {ctx}: {_fmt_err(ref)}")
        if row["variant"] == "dense" and row["quant"].upper() == "F16" and row["kv"] == "f16":
            row.update({f"ppl{suffix}": round(ref[1], 4), f"kld{suffix}": 0.0, f"top1{suffix}": 100.0})
            return
        m = kld_row(llama, f, ref[0], ctx, chunks, logs / f"ppl-kld-{f.stem}-kv{row['kv']}-c{ctx}.log",
                    runtime(row["kv"]))
        row.update({f"ppl{suffix}": round(m["ppl"], 4), f"kld{suffix}": round(m["kld_mean"], 5),
                    f"top1{suffix}": round(m["top1_pct"], 2)})

    # 2. quality rows
    long = f"_c{req.long_ctx}"
    i = 0
    for v in req.variants:
        if v not in f16_of:
            try:
                say(f"building {v.name} (f16)")
                f16_of[v] = build_f16(v, req, work)
            except Exception as e:  # noqa: BLE001
                f16_of[v] = e
        for q, kv in req.row_types(v):
            i += 1
            row = {"variant": v.name, "method": v.method, "series": v.series, "quant": q, "kv": kv,
                   "deep": q in req.deep_quants, "status": "ok", "error": ""}
            try:
                src = f16_of[v]
                if isinstance(src, Exception):
                    raise D2MError(f"building {v.name} failed: {_fmt_err(src)}")
                f = build_quant(src, q, req, work, imatrix)
                row["file"] = str(f)
                row["arch"] = gguf_field(open_gguf(f), "general.architecture")  # stock llama.cpp runs all but dense2moe
                row["file_mb"] = round(f.stat().st_size / 1e6, 2)
                cost = gguf_cost(f, depth=0)
                row["active_mb_per_token"] = round(cost.total_bytes / 1e6, 2)
                quality(row, f, req.ctx, req.chunks, "")
                if row["deep"]:
                    quality(row, f, req.long_ctx, req.long_chunks, long)
                for d in PHONES:
                    row[f"pred_tps_{d}"] = round(cost.tokens_per_s(devices[d]), 1)
                files[len(rows)] = f
                say(f"row {i}/{total} {v.name} {q} KV {kv}: ok, {row['file_mb']} MB, ppl {row['ppl']}"
                    + (f" (ctx {req.long_ctx}: {row['ppl' + long]})" if row["deep"] else "")
                    + f", KLD {row['kld']}, top-1 {row['top1']}%")
            except Exception as e:  # noqa: BLE001
                row["status"], row["error"] = "failed", _fmt_err(e)
                say(f"row {i}/{total} {v.name} {q} KV {kv}: FAILED {row['error']}")
                (logs / f"failed-{v.name}-{q}-{kv}.txt").write_text(traceback.format_exc())
            rows.append(row)

    # 3. speed: llama-bench, one process per KV-cache type and depth set, in both file orders
    host = host_device(llama.threads)
    say(f"host bandwidth probe: {host.dram_gbs} GB/s")
    deep = tuple(d for d in req.depths if d > 0)
    for kv in ("f16", *req.kv_types):
        group = {k: f for k, f in files.items() if rows[k]["status"] == "ok" and rows[k]["kv"] == kv}
        plans = [((0,), req.n_prompt, req.repetitions, group)] if 0 in req.depths else []
        if deep:
            plans.append((deep, 0, req.deep_repetitions, {k: f for k, f in group.items() if rows[k]["deep"]}))
        for depths, n_prompt, reps, sub in plans:
            if not sub:
                continue
            say(f"llama-bench: {len(sub)} models, KV {kv}, depth {','.join(map(str, depths))} ({reps} repetitions)")
            speed = bench_all(llama, sub, rows, depths, n_prompt, req.n_gen, reps,
                              logs / f"llama-bench-kv{kv}-d{'-'.join(map(str, depths))}", runtime(kv))
            for k, f in sub.items():
                for s in (speed.get((f.name, d)) for d in depths):
                    if s is None:
                        continue
                    if s.prompt_ts:
                        rows[k]["prompt_ts"] = round(s.prompt_ts, 2)
                    rows[k][f"decode_ts_d{s.depth}"] = round(s.decode_ts, 2)
                    rows[k][f"decode_std_d{s.depth}"] = round(s.decode_std, 2)
    stock_column(req, rows, files, logs, say, runtime("f16"))

    # 4. the planner against the measurement, and the runtime's efficiency, per depth
    roofline_columns(rows, files, req.depths, host, [devices[d] for d in PHONES])

    # 5. arm64 under qemu on a short slice, for the rows where it is affordable
    arm64_column(req, rows, files, logs, say)

    # 6. the fronts, the tables and the pictures
    headlines, summaries = [], []
    for d in req.depths:
        h, lines = depth_front(rows, d, *req.quality_of(d), out_dir / f"pareto-d{d}.png")
        headlines.append(h)
        summaries += lines
    keys = ["variant", "method", "series", "quant", "kv", "arch", "status", "file_mb", "active_mb_per_token",
            "ppl", "kld", "top1", f"ppl{long}", f"kld{long}", f"top1{long}", "prompt_ts"]
    for d in req.depths:
        keys += [f"decode_ts_d{d}", f"decode_std_d{d}", f"mb_per_token_d{d}", f"pred_speedup_d{d}",
                 f"speedup_d{d}", f"efficiency_d{d}", f"front_d{d}"]
    keys += [f"decode_ts_stock_d{d}" for d in req.depths] + [f"efficiency_stock_d{d}" for d in req.depths]
    keys += [*[f"pred_tps_{d}" for d in PHONES], *[f"pred_tps_{d}_d{max(req.depths)}" for d in PHONES],
             "arm64_ppl_agree", "error", "file"]
    table = [{k: r.get(k, "") for k in keys} for r in rows]
    title = (f"{req.title}: WikiText-2 test ctx {req.ctx} x {req.chunks} chunks and ctx {req.long_ctx} x "
             f"{req.long_chunks} chunks (the {', '.join(req.deep_quants)} rows), KLD / top-1 vs f16 dense at the same "
             f"ctx; llama-bench {llama.threads} threads, flash attention {req.flash_attn}, decode {req.n_gen} tokens "
             f"at depths {', '.join(map(str, req.depths))} (mean, std over {req.repetitions} repetitions at depth 0, "
             f"{req.deep_repetitions} deeper); roofline on the probed {host.dram_gbs} GB/s")
    off = prediction_misses(rows, req.depths)
    before = ["### Headline", "", *[f"- {h}" for h in headlines], *summaries, "",
              f"### Predictions off by more than {PREDICTION_TOLERANCE:.0%} (predicted / measured speedup - 1)", "",
              *([f"- {line}" for line in off] or ["- none"])]
    write_table(table, out_dir / "matrix", title=title, provenance=prov, before=before)
    settings = {"provenance": prov}
    settings.update((k, str(v) if isinstance(v, Path) else v) for k, v in req.__dict__.items()
                    if k not in ("llama", "variants", "heal"))
    settings["variants"] = [v.name for v in req.variants]
    settings["heal"] = heal_key(req.heal)
    settings["host_bandwidth_gbs"] = host.dram_gbs
    settings["headline"] = headlines
    settings["wall_s"] = round(time.monotonic() - t0, 1)
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=1, default=str) + "\n")
    if req.publish is not None:
        publish(out_dir, Path(req.publish))
    n_failed = sum(r["status"] != "ok" for r in rows)
    for h in headlines:
        say(h)
    say(f"wrote {out_dir}/matrix.csv, matrix.md, pareto-d*.png ({len(rows)} rows, {n_failed} failed)")
    return out_dir


def depth_front(rows: list[dict], depth: int, qcol: str, qname: str, picture: Path) -> tuple[str, list[str]]:
    """One depth's front: the `front_d<depth>` column set on every row, the picture drawn; its headline sentence
    and its summary table (the rows timed at that depth, fastest first) returned."""
    speed = f"decode_ts_d{depth}"
    front = set(front_rows(rows, speed, qcol))
    timed = set(measured(rows, speed, qcol))
    for k, r in enumerate(rows):
        r[f"front_d{depth}"] = "yes" if k in front else "no" if k in timed else ""
    plot_front(rows, picture, depth, speed, qcol, qname)
    summary = [{"row": row_label(rows[k]), qname: rows[k][qcol], f"decode tok/s d{depth}": rows[k][speed],
                "predicted speedup": rows[k].get(f"pred_speedup_d{depth}", ""),
                "measured speedup": rows[k].get(f"speedup_d{depth}", ""),
                "efficiency": rows[k].get(f"efficiency_d{depth}", ""), "on front": rows[k][f"front_d{depth}"]}
               for k in sorted(timed, key=lambda k: -float(rows[k][speed]))]
    lines = ["", *markdown_table(summary, f"Depth {depth}: {qname} vs decode tok/s, fastest first (speedups "
                                          f"against dense at the same weight type, f16 KV)")] if summary else []
    return headline(rows, depth, speed, qcol, qname), lines


def publish(out_dir: Path, dest: Path) -> None:
    """The run's tables, pictures and settings copied to `dest` (its former files of these kinds replaced)."""
    publish_files(out_dir, dest, ("matrix.md", "matrix.csv", "settings.json"), "pareto-d*.png")


def _slug(p: Path) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(p).stem)[:40]


def bench_all(llama: LlamaCpp, ok: dict[int, Path], rows: list[dict], depths: tuple[int, ...], n_prompt: int,
              n_gen: int, reps: int, log_dir: Path, extra: list[str] = ()) -> dict:
    """llama-bench for all files in one process (per file order), {(file name, depth): SpeedRow}; if that
    process fails, each file alone (failures recorded)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    uniq = list(dict.fromkeys(ok.values()))
    if not uniq:
        return {}

    def timed(models: list[Path], where: Path) -> dict:
        res = llama_bench(llama, models, depths=depths, n_gen=n_gen, n_prompt=n_prompt, repetitions=reps,
                          log_dir=where, extra=extra)
        return {(r.model, r.depth): r for r in res}

    try:
        return timed(uniq, log_dir)
    except Exception as e:  # noqa: BLE001 - fall back to one process per file
        log.warning("llama-bench over all rows failed (%s); timing each file alone", _fmt_err(e))
    out = {}
    for f in uniq:
        try:
            sub = log_dir / f.stem
            sub.mkdir(exist_ok=True)
            out.update(timed([f], sub))
        except Exception as e:  # noqa: BLE001
            for k, g in ok.items():
                if g == f:
                    rows[k]["status"] = "failed"
                    rows[k]["error"] = f"llama-bench (depths {depths}): {_fmt_err(e)}"
    return out


def stock_column(req: MatrixRequest, rows: list[dict], files: dict[int, Path], logs: Path, say,
                 extra: list[str]) -> None:
    """`decode_ts_stock_d<depth>`: the dense rows with an f16 KV cache timed again by the unpatched build (at
    every depth for the deep ones), so the patch's own cost shows in the efficiency columns."""
    bin_dir = Path(req.stock_bin or os.environ.get("D2M_LLAMA_STOCK_BIN",
                                                   REPO / "build" / "llama.cpp-stock" / "bin"))
    pick = {k: f for k, f in files.items() if rows[k]["status"] == "ok" and rows[k]["variant"] == "dense"
            and rows[k]["kv"] == "f16" and rows[k]["deep"]}
    if not pick:
        return
    if not (bin_dir / "llama-bench").is_file():
        say(f"no stock build in {bin_dir} (make llama-stock): the stock columns stay empty")
        return
    stock = LlamaCpp(bin_dir, threads=req.llama.threads)
    say(f"llama-bench (stock build): {len(pick)} dense models, depths {','.join(map(str, req.depths))}")
    # a failure here leaves the stock columns empty; it does not fail the rows (bench_all marks the copies)
    speed = bench_all(stock, pick, [dict(r) for r in rows], tuple(req.depths), 0, req.n_gen, req.deep_repetitions,
                      logs / "llama-bench-stock", extra)
    for k, f in pick.items():
        for d in req.depths:
            s = speed.get((f.name, d))
            if s is not None:
                rows[k][f"decode_ts_stock_d{d}"] = round(s.decode_ts, 2)


PREDICTION_TOLERANCE = 0.15


def prediction_misses(rows: list[dict], depths: tuple[int, ...]) -> list[str]:
    """Rows whose predicted speedup is off the measured one by more than PREDICTION_TOLERANCE at some depth."""
    out = []
    for r in rows:
        for d in depths:
            p, m = _num(r.get(f"pred_speedup_d{d}")), _num(r.get(f"speedup_d{d}"))
            if p and m and abs(p / m - 1) > PREDICTION_TOLERANCE:
                out.append(f"{row_label(r)} at depth {d}: predicted x{p:.2f}, measured x{m:.2f} ({p / m - 1:+.0%})")
    return out


def roofline_columns(rows: list[dict], files: dict[int, Path], depths: tuple[int, ...], host: Device,
                     phones: list[Device] = ()) -> None:
    """Per depth: bytes read per token (weights + KV cache of the row's type), the roofline's predicted speedup on
    this machine and the measured one (both against dense at the same weight type with an f16 cache), and the
    runtime's efficiency: bytes per token x measured tok/s / probed bandwidth (of the stock build too); at the
    deepest depth, the predicted tok/s of each phone profile for the rows timed there."""
    for d in depths:
        cost = {k: gguf_cost(f, depth=d, kv=rows[k]["kv"]) for k, f in files.items()}
        if d == max(depths):
            for k, c in cost.items():
                if rows[k].get(f"decode_ts_d{d}"):
                    rows[k].update({f"pred_tps_{p.key}_d{d}": round(c.tokens_per_s(p), 1) for p in phones})
        ref = {rows[k]["quant"]: k for k in files if rows[k]["variant"] == "dense" and rows[k]["kv"] == "f16"}
        for k, c in cost.items():
            r = rows[k]
            r[f"mb_per_token_d{d}"] = round(c.total_bytes / 1e6, 2)
            ts = _num(r.get(f"decode_ts_d{d}"))
            if ts:
                r[f"efficiency_d{d}"] = round(c.total_bytes * ts / (host.dram_gbs * 1e9), 3)
            stock = _num(r.get(f"decode_ts_stock_d{d}"))
            if stock:
                r[f"efficiency_stock_d{d}"] = round(c.total_bytes * stock / (host.dram_gbs * 1e9), 3)
            j = ref.get(r["quant"])
            if j is None:
                continue
            r[f"pred_speedup_d{d}"] = round(c.tokens_per_s(host) / cost[j].tokens_per_s(host), 3)
            base = _num(rows[j].get(f"decode_ts_d{d}"))
            if ts and base:
                r[f"speedup_d{d}"] = round(ts / base, 3)


def arm64_column(req: MatrixRequest, rows: list[dict], files: dict[int, Path], logs: Path, say) -> None:
    """The `arm64_ppl_agree` column: `arm64_check` under qemu for the rows picked (one per method first, then
    the rest, up to `qemu_max_rows` of the `qemu_quants` types); "not run" (and why) for the others."""
    for r in rows:
        r["arm64_ppl_agree"] = "not run"
    cand = [k for k, r in enumerate(rows) if r["status"] == "ok" and r["quant"] in req.qemu_quants and k in files]
    cand.sort(key=lambda k: req.qemu_quants.index(rows[k]["quant"]))
    picked, methods = [], set()
    for k in cand:                       # one row per method first, then the rest in order
        if rows[k]["method"] not in methods:
            picked.append(k)
            methods.add(rows[k]["method"])
    picked = (picked + [k for k in cand if k not in picked])[: req.qemu_max_rows]
    if not picked:
        return
    bin_dir = Path(req.arm64_bin or os.environ.get("D2M_LLAMA_ARM64_BIN", REPO / "build" / "llama.cpp-arm64" / "bin"))
    why = None
    if not (bin_dir / "llama-perplexity").is_file():
        why = f"not run: no arm64 build in {bin_dir} (make arm64)"
    elif not shutil.which(QEMU[0]):
        why = "not run: qemu-aarch64-static missing (make deps)"
    if why:
        for k in picked:
            rows[k]["arm64_ppl_agree"] = why
        return
    arm = LlamaCpp(bin_dir, wrapper=QEMU, threads=req.llama.threads)
    text = arm64_check_text(req.wikitext, logs.parent / "wikitext-slice.txt")
    for k in picked:
        f = files[k]
        try:
            say(f"arm64 under qemu: {f.name} (ctx {req.qemu_ctx} x {req.qemu_chunks} chunks)")
            rows[k]["arm64_ppl_agree"] = str(arm64_check(req.llama, arm, f, text, logs, req.qemu_ctx, req.qemu_chunks))
        except Exception as e:  # noqa: BLE001
            rows[k]["arm64_ppl_agree"] = f"failed: {_fmt_err(e)}"


# ---- phones over adb ------------------------------------------------------------------------------------

def _adb(args: list[str], timeout: float = 600, serial: str | None = None):
    import subprocess
    cmd = ["adb", *(["-s", serial] if serial else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def adb_devices() -> list[str]:
    proc = _adb(["devices"], timeout=30)
    if proc.returncode != 0:
        raise D2MError(f"adb devices failed: {proc.stderr.strip()}")
    return [l.split("\t")[0] for l in proc.stdout.splitlines()[1:] if l.strip().endswith("\tdevice")]


def latest_matrix(results: Path) -> Path | None:
    found = sorted(p.parent for p in Path(results).glob("*/matrix.csv"))
    return found[-1] if found else None


def adb_bench(results: Path = Path("bench/results"), matrix_dir: Path | None = None, quants: tuple[str, ...] = (
        "Q4_0", "phone-i8mm", "phone-dotprod"), threads: int = 4, repetitions: int = 3,
        remote: str = "/data/local/tmp/d2m", arm64_bin: Path | None = None, echo=print) -> int:
    """Run llama-bench on an attached Android device for the matrix rows of `quants` and append the
    measured phone rows to matrix.csv / matrix.md. Returns the number of rows appended (0: nothing done)."""
    if not shutil.which("adb"):
        echo("adb is not installed (Android platform-tools, e.g. `apt-get install adb`): no device, nothing done")
        return 0
    serials = adb_devices()
    if not serials:
        echo("no Android device attached (`adb devices` lists none): nothing done")
        return 0
    serial = serials[0]
    matrix_dir = Path(matrix_dir) if matrix_dir else latest_matrix(results)
    if matrix_dir is None or not (matrix_dir / "matrix.csv").is_file():
        raise D2MError(f"no matrix.csv under {results}: run `make bench` first")
    bin_dir = Path(arm64_bin or REPO / "build" / "llama.cpp-arm64" / "bin")
    bench_bin = bin_dir / "llama-bench"
    if not bench_bin.is_file():
        raise D2MError(f"{bench_bin}: not built (make arm64)")
    with open(matrix_dir / "matrix.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    picked = [r for r in rows if r.get("status") == "ok" and r.get("quant") in quants and r.get("file")
              and Path(r["file"]).is_file() and not r.get("device")]
    if not picked:
        echo(f"no rows of {', '.join(quants)} with a file in {matrix_dir}/matrix.csv: nothing done")
        return 0
    model = _adb(["shell", "getprop", "ro.product.model"], serial=serial).stdout.strip() or serial
    echo(f"device {serial} ({model}): pushing llama-bench and {len(picked)} GGUF files to {remote}")
    for cmd in (["shell", "mkdir", "-p", remote], ["push", str(bench_bin), f"{remote}/llama-bench"],
                ["shell", "chmod", "755", f"{remote}/llama-bench"]):
        p = _adb(cmd, serial=serial)
        if p.returncode != 0:
            raise D2MError(f"adb {' '.join(cmd)} failed: {p.stderr.strip()}")
    new = []
    for r in picked:
        f = Path(r["file"])
        _adb(["push", str(f), f"{remote}/{f.name}"], serial=serial, timeout=1800)
        args = bench_args([f.name], n_prompt=128, n_gen=64, repetitions=repetitions, threads=threads, depths=None)
        p = _adb(["shell", f"cd {remote} && ./llama-bench {' '.join(args)}"], serial=serial, timeout=3600)
        _adb(["shell", "rm", "-f", f"{remote}/{f.name}"], serial=serial)
        row = {k: "" for k in rows[0]}
        row.update(variant=r["variant"], method=r["method"], quant=r["quant"], file_mb=r.get("file_mb", ""),
                   active_mb_per_token=r.get("active_mb_per_token", ""), ppl=r.get("ppl", ""),
                   kld=r.get("kld", ""), top1=r.get("top1", ""), file=r["file"])
        row["device"] = f"adb:{model}"
        try:
            if p.returncode != 0:
                raise D2MError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}")
            samples = parse_llama_bench(p.stdout)
            for s in speed_rows(samples):
                if (s.model, s.depth, "decode") in samples:
                    row["decode_ts_d0"], row["decode_std_d0"] = round(s.decode_ts, 2), round(s.decode_std, 2)
                if s.prompt_ts is not None:
                    row["prompt_ts"] = round(s.prompt_ts, 2)
            row["status"] = "ok"
            echo(f"  {r['variant']} {r['quant']}: decode {row.get('decode_ts_d0')} tok/s on {model}")
        except Exception as e:  # noqa: BLE001
            row["status"], row["error"] = "failed", _fmt_err(e)
            echo(f"  {r['variant']} {r['quant']}: FAILED {row['error']}")
        new.append(row)
        (matrix_dir / "logs").mkdir(exist_ok=True)
        (matrix_dir / "logs" / f"adb-{f.stem}.json").write_text(p.stdout + "\n" + p.stderr)
    keys = list(rows[0]) + (["device"] if "device" not in rows[0] else [])
    all_rows = [{k: r.get(k, "") for k in keys} for r in rows + new]
    # the matrix keeps the provenance of the run that measured it, and gains this command's
    prior = read_provenance_lines(matrix_dir / "matrix.md")
    added = [f"- phone rows {key}: {value}" for key, value in provenance().items()]
    write_table(all_rows, matrix_dir / "matrix", title=f"d2m quantization matrix + phone rows ({model})",
                provenance=prior + added)
    echo(f"appended {len(new)} phone rows to {matrix_dir}/matrix.csv")
    return len(new)


__all__ = ["MatrixRequest", "MatrixVariant", "run_matrix", "quick_request", "full_request", "adb_bench", "kld_row", "kld_base", "build_f16", "build_quant", "bench_all", "stock_column", "roofline_columns",
           "Arm64Check", "arm64_check", "arm64_check_text", "arm64_column", "ARM64_CHECK_TOLERANCE"]
