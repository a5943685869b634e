"""`make bench`: the quantization x variant matrix (matrix.csv, matrix.md, pareto.png under bench/results/<stamp>/).

Rows are (variant, quant type) pairs: dense, layer-pruned baselines, LF-UC variants (optionally plain sparse
upcycling, optionally a hand-written plan), each at f16, the plain llama-quantize types and the device recipes of
quant/. Every number is measured by the patched llama.cpp or read off the written GGUF:

- quality: one `llama-perplexity` pass per row on WikiText-2 test (ctx 512, a stated number of chunks) against
  the f16 dense model's saved logits (`--kl-divergence-base` once, then `--kl-divergence` per row): perplexity,
  mean KLD and top-1 agreement ("Same top p");
- speed: `llama-bench` over every row at depth 0 (prompt and decode, with the repetitions' spread) and over
  every row at the deep context (decode only), each in both file orders (llamabench.llama_bench), so ratios within
  a column hold;
- cost model: active bytes per token and predicted tok/s on each device profile (d2m_gguf/data/devices.json);
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

from ..costmodel import gguf_cost, load_devices
from ..errors import D2MError
from ..ggufout import OutType
from ..llamacpp import QEMU, REPO, LlamaCpp
from ..heal import HealSettings
from ..options import setting
from ..quantize import quantize_file, recipe_names
from ..reader import field as gguf_field, open_gguf
from .llamabench import bench_args, llama_bench, parse_llama_bench, speed_rows
from .provenance import provenance
from .tables import read_provenance_lines, write_table
from .variants import Variant, build_plan_variant, build_variant, cached_build, heal_key, results_setting

log = logging.getLogger("d2m")

PLAIN_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_NL")
RECIPES = ("host", "phone-i8mm", "phone-dotprod", "rpi5")
KNOWN_QUANTS = set(PLAIN_QUANTS) | {"F32", "BF16", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                                    "Q4_K_S", "Q5_K_S", "IQ4_XS", "Q4_K", "Q5_K", "Q3_K"}
PHONES = ("phone-i8mm", "phone-i8mm-g2", "phone-dotprod", "rpi5")
MATRIX_HEAL_TOKENS = 320_000   # half the job's default: each variant heals in a few minutes


@dataclass(frozen=True)
class MatrixVariant:
    """A row group: a pipeline variant (method + size) or a hand-written plan."""

    method: str                 # dense | lfuc | prune | attn-prune | upcycle
    fuse: int = 0
    plan: Path | None = None    # a hand-written plan (examples/plans) instead of the planner
    label: str = ""

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.plan is not None:
            return f"{self.method}-{Path(self.plan).stem}"
        return Variant(self.method, self.fuse).name


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
    quants: tuple[str, ...] = setting(PLAIN_QUANTS + RECIPES, "Quant types and device recipes (quant/).",
                                      default_text="all; QUICK F16,Q4_0,phone-i8mm")
    wikitext: Path | None = None
    calibration: Path | None = None
    ctx: int = 512
    chunks: int = setting(8, "WikiText-2 test chunks of 512 tokens per row.", default_text="8; QUICK 3")
    heal: HealSettings = field(default_factory=lambda: HealSettings(tokens=MATRIX_HEAL_TOKENS))
    deep_depth: int = 2048                # the second decode timing's context depth
    n_prompt: int = 128
    n_gen: int = 64
    repetitions: int = 3
    deep_repetitions: int = 2
    imatrix_chunks: int = 32              # calibration chunks (ctx 256) for llama-imatrix, one run per variant
    qemu_quants: tuple[str, ...] = ("phone-i8mm", "Q4_0")   # quant types that get the arm64/qemu column
    qemu_max_rows: int = 3                # picked across methods first (dense, lfuc, prune, ...)
    qemu_ctx: int = ARM64_CHECK_CTX
    qemu_chunks: int = ARM64_CHECK_CHUNKS
    arm64_bin: Path | None = None
    results: Path = results_setting()
    llama: LlamaCpp | None = None
    progress: bool = False
    title: str = "d2m quantization matrix"


def quick_request(hf_dir: Path, **kw) -> MatrixRequest:
    """`make bench QUICK=1`: dense + the hand-written LF-UC plan (unhealed), three quant types, few chunks."""
    plan = REPO / "examples" / "plans" / "smollm2-all-kinds.json"
    base = dict(variants=(MatrixVariant("dense"), MatrixVariant("lfuc", plan=plan, label="lfuc-plan")),
                quants=("F16", "Q4_0", "phone-i8mm"), chunks=3, heal=HealSettings(tokens=0), deep_depth=512,
                n_prompt=64, n_gen=32, repetitions=2, deep_repetitions=2, imatrix_chunks=8, qemu_max_rows=1,
                qemu_quants=("phone-i8mm",), title="d2m quantization matrix (QUICK)")
    base.update(kw)
    return MatrixRequest(hf_dir=hf_dir, **base)


def full_request(hf_dir: Path, **kw) -> MatrixRequest:
    """The default matrix: dense, the pruning baseline and LF-UC at 8 (320k healing tokens each), every quant type.

    Sized to stay under 45 minutes on 2 cores; other sizes and methods: `d2m bench lfuc` / `curve`."""
    variants = (MatrixVariant("dense"), MatrixVariant("prune", 8), MatrixVariant("lfuc", 8))
    base = dict(variants=variants)
    base.update(kw)
    return MatrixRequest(hf_dir=hf_dir, **base)


# ---- llama-perplexity with KL divergence ------------------------------------------------------------

_MEAN_PPL = re.compile(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)")
_FINAL_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")
_KLD = re.compile(r"Mean\s+KLD:\s*([0-9.eE+-]+)\s*±\s*([0-9.eE+-]+)")
_BASE_PPL = re.compile(f"{_FINAL_PPL.pattern}|{_MEAN_PPL.pattern}")
_TOP1 = re.compile(r"Same top p:\s*([0-9.]+)\s*±\s*([0-9.]+)")


def kld_base(llama: LlamaCpp, model: Path, text: Path, base: Path, ctx: int, chunks: int, log_file: Path) -> float:
    """Perplexity of the reference (f16 dense) and its saved logits for `--kl-divergence`."""
    proc = llama.run_to_the_end("llama-perplexity", ["-m", model, "-f", text, "-c", ctx, "--chunks", chunks,
                                                     "-t", llama.threads, "--kl-divergence-base", base],
                                end=_BASE_PPL)
    out = proc.stdout + proc.stderr
    log_file.write_text(out, encoding="utf-8")
    m = _BASE_PPL.search(out)
    if not m or not base.is_file():
        raise D2MError("llama-perplexity --kl-divergence-base printed no estimate")
    return float(m.group(1) or m.group(2))


def kld_row(llama: LlamaCpp, model: Path, base: Path, ctx: int, chunks: int, log_file: Path) -> dict:
    """Perplexity, mean KLD and top-1 agreement of `model` against the saved reference logits."""
    proc = llama.run_to_the_end("llama-perplexity", ["-m", model, "-c", ctx, "--chunks", chunks,
                                                     "-t", llama.threads, "--kl-divergence-base", base,
                                                     "--kl-divergence"], end=_TOP1)
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
        return build_variant(Variant(v.method, v.fuse), req.hf_dir, work, OutType.F16, req.heal, None, req.progress)
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
    """Build, quantize and measure every row; write matrix.csv, matrix.md, pareto.png and the tool logs."""
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
    total = len(req.variants) * len(req.quants)
    devices = load_devices()
    f16_of: dict[MatrixVariant, Path | Exception] = {}
    imatrix: dict[Path, Path] = {}
    base_kld = work / f"kld-base-{_slug(req.wikitext)}-c{req.ctx}-n{req.chunks}.bin"
    base_ppl: float | None = None
    base_error: str | None = None

    def say(msg: str) -> None:
        el = time.monotonic() - t0
        print(f"[{el / 60:5.1f} min] {msg}", flush=True)

    # 1. the reference: f16 dense logits on the WikiText slice
    dense = MatrixVariant("dense")
    try:
        f16_of[dense] = build_f16(dense, req, work)
        base_ppl = kld_base(llama, f16_of[dense], req.wikitext, base_kld, req.ctx, req.chunks,
                            logs / "ppl-kld-base-dense-f16.log")
        say(f"reference: dense f16 ppl {base_ppl:.3f} (ctx {req.ctx}, {req.chunks} chunks)")
    except Exception as e:  # noqa: BLE001 - recorded, the rows say why
        base_error = _fmt_err(e)
        say(f"reference failed: {base_error}")
        if dense not in f16_of:
            f16_of[dense] = e

    # 2. quality rows
    i = 0
    for v in req.variants:
        if v not in f16_of:
            try:
                say(f"building {v.name} (f16)")
                f16_of[v] = build_f16(v, req, work)
            except Exception as e:  # noqa: BLE001
                f16_of[v] = e
        for q in req.quants:
            i += 1
            row = {"variant": v.name, "method": v.method, "quant": q, "status": "ok", "error": ""}
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
                if v == dense and q.upper() == "F16" and base_ppl is not None:
                    row.update(ppl=round(base_ppl, 4), kld_mean=0.0, top1_pct=100.0)
                    row["note"] = "KLD reference"
                else:
                    if base_error is not None:
                        raise D2MError(f"no f16 dense reference: {base_error}")
                    m = kld_row(llama, f, base_kld, req.ctx, req.chunks, logs / f"ppl-kld-{f.stem}.log")
                    row.update(ppl=round(m["ppl"], 4), kld_mean=round(m["kld_mean"], 5), top1_pct=round(m["top1_pct"], 2))
                for d in PHONES:
                    row[f"pred_tps_{d}"] = round(cost.tokens_per_s(devices[d]), 1)
                files[len(rows)] = f
                say(f"row {i}/{total} {v.name} {q}: ok, {row['file_mb']} MB, ppl {row['ppl']}, "
                    f"KLD {row['kld_mean']}, top-1 {row['top1_pct']}%")
            except Exception as e:  # noqa: BLE001
                row["status"], row["error"] = "failed", _fmt_err(e)
                say(f"row {i}/{total} {v.name} {q}: FAILED {row['error']}")
                (logs / f"failed-{v.name}-{q}.txt").write_text(traceback.format_exc())
            rows.append(row)

    # 3. speed: llama-bench per depth over every good row (in both file orders)
    ok = {k: f for k, f in files.items() if rows[k]["status"] == "ok"}
    depths = [(0, req.n_prompt, req.repetitions), (req.deep_depth, 0, req.deep_repetitions)]
    for depth, n_prompt, reps in depths:
        say(f"llama-bench: {len(ok)} models at depth {depth} ({reps} repetitions)")
        speed = bench_all(llama, ok, rows, depth, n_prompt, req.n_gen, reps, logs / f"llama-bench-d{depth}")
        for k, f in ok.items():
            s = speed.get(f.name)
            if s is None:
                continue
            if depth == 0:
                rows[k]["prompt_ts"] = round(s.prompt_ts, 2) if s.prompt_ts else ""
            rows[k][f"decode_ts_d{depth}"] = round(s.decode_ts, 2)
            rows[k][f"decode_std_d{depth}"] = round(s.decode_std, 2)

    # 4. decode speed vs dense at the same quant type
    dense_speed = {r["quant"]: r.get("decode_ts_d0") for r in rows if r["variant"] == "dense" and r["status"] == "ok"}
    for r in rows:
        d, s = dense_speed.get(r["quant"]), r.get("decode_ts_d0")
        r["decode_vs_dense"] = round(s / d, 3) if d and s else ""

    # 5. arm64 under qemu on a short slice, for the rows where it is affordable
    arm64_column(req, rows, files, logs, say)

    # 6. tables and plot
    keys = ["variant", "method", "quant", "arch", "status", "file_mb", "active_mb_per_token", "ppl", "kld_mean", "top1_pct",
            "prompt_ts", "decode_ts_d0", "decode_std_d0", f"decode_ts_d{req.deep_depth}",
            f"decode_std_d{req.deep_depth}", "decode_vs_dense", *[f"pred_tps_{d}" for d in PHONES],
            "arm64_ppl_agree", "error", "file"]
    table = [{k: r.get(k, "") for k in keys} for r in rows]
    title = (f"{req.title}: WikiText-2 test ctx {req.ctx} x {req.chunks} chunks, KLD vs f16 dense; "
             f"llama-bench {llama.threads} threads, decode {req.n_gen} tokens at depth 0 and {req.deep_depth} "
             f"(mean, std over {req.repetitions}/{req.deep_repetitions} repetitions)")
    write_table(table, out_dir / "matrix", title=title, provenance=prov)
    settings = {"provenance": prov}
    settings.update((k, str(v) if isinstance(v, Path) else v) for k, v in req.__dict__.items()
                    if k not in ("llama", "variants", "heal"))
    settings["variants"] = [v.name for v in req.variants]
    settings["heal"] = heal_key(req.heal)
    settings["wall_s"] = round(time.monotonic() - t0, 1)
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=1, default=str) + "\n")
    plot_pareto(table, out_dir / "pareto.png")
    n_failed = sum(r["status"] != "ok" for r in rows)
    say(f"wrote {out_dir}/matrix.csv, matrix.md, pareto.png ({len(rows)} rows, {n_failed} failed)")
    return out_dir


def _slug(p: Path) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(p).stem)[:40]


def bench_all(llama: LlamaCpp, ok: dict[int, Path], rows: list[dict], depth: int, n_prompt: int, n_gen: int,
               reps: int, log_dir: Path) -> dict:
    """llama-bench for all files in one process; if that process fails, each file alone (failures recorded)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    uniq = list(dict.fromkeys(ok.values()))
    if not uniq:
        return {}
    try:
        res = llama_bench(llama, uniq, depths=(depth,), n_gen=n_gen, n_prompt=n_prompt, repetitions=reps,
                          log_dir=log_dir)
        return {r.model: r for r in res}
    except Exception as e:  # noqa: BLE001 - fall back to one process per file
        log.warning("llama-bench over all rows failed (%s); timing each file alone", _fmt_err(e))
    out = {}
    for f in uniq:
        try:
            sub = log_dir / f.stem
            sub.mkdir(exist_ok=True)
            for r in llama_bench(llama, [f], depths=(depth,), n_gen=n_gen, n_prompt=n_prompt, repetitions=reps,
                                 log_dir=sub):
                out[r.model] = r
        except Exception as e:  # noqa: BLE001
            for k, g in ok.items():
                if g == f:
                    rows[k]["status"] = "failed"
                    rows[k]["error"] = f"llama-bench (depth {depth}): {_fmt_err(e)}"
    return out


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


# ---- plot -------------------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both speed (x, higher) and quality (y, lower)."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _num(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def plot_pareto(rows: list[dict], path: Path, phone: str = "phone-i8mm") -> None:
    """ppl against measured decode tok/s (one series per method, frontier highlighted), and against the
    predicted phone tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    panels = [("decode_ts_d0", "measured decode tok/s (host, depth 0)"),
              (f"pred_tps_{phone}", f"predicted decode tok/s ({phone}, cost model)")]
    for ax, (xkey, xlabel) in zip(axes, panels):
        good = [r for r in rows if r.get("status") == "ok" and _num(r.get(xkey)) and _num(r.get("ppl"))]
        for method in dict.fromkeys(r["method"] for r in good):
            pts = [r for r in good if r["method"] == method]
            ax.scatter([_num(r[xkey]) for r in pts], [_num(r["ppl"]) for r in pts], label=method, s=30, alpha=0.8)
            for r in pts:
                ax.annotate(r["quant"], (_num(r[xkey]), _num(r["ppl"])), fontsize=6, alpha=0.7,
                            xytext=(3, 2), textcoords="offset points")
        if good:
            pts = [(_num(r[xkey]), _num(r["ppl"])) for r in good]
            front = sorted(pareto_front(pts), key=lambda i: pts[i][0])
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto frontier")
            ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=90, facecolors="none",
                       edgecolors="k", lw=1.2)
            if max(p[1] for p in pts) / max(1e-9, min(p[1] for p in pts)) > 20:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no successful rows", ha="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("WikiText-2 perplexity (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("quality vs measured speed")
    axes[1].set_title("quality vs predicted phone speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
                   kld_mean=r.get("kld_mean", ""), top1_pct=r.get("top1_pct", ""), file=r["file"])
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


__all__ = ["MatrixRequest", "MatrixVariant", "run_matrix", "quick_request", "full_request", "plot_pareto",
           "pareto_front", "adb_bench", "kld_row", "kld_base", "build_f16", "build_quant", "bench_all",
           "Arm64Check", "arm64_check", "arm64_check_text", "arm64_column", "ARM64_CHECK_TOLERANCE"]
