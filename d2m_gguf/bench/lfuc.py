"""Benchmarks: build model variants, measure quality and speed with llama.cpp, write tables and plots.

Every measured number comes from the patched llama.cpp (llama-perplexity on
WikiText-2 test, llama-bench for speed); variants of one table are timed together
(llama_bench: one process in each file order) so their ratios hold. Nothing here
asserts: tests check the machinery, the numbers go into the results directory.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .costmodel import gguf_cost, get_device, load_devices
from .errors import D2MError
from .ggufout import OutType
from .llamacpp import LlamaCpp, chunk_nlls, paired_log_ratio
from .pipeline import ConvertRequest, HealSettings, run
from .planner import PlanRequest

log = logging.getLogger("d2m")


@dataclass(frozen=True)
class Variant:
    """One model of a table: the dense source, or a method at a size."""

    method: str          # dense | lfuc | prune | attn-prune | upcycle
    fuse: int = 0
    depth_aware: int | None = None   # planned depth-aware at this context depth (lfuc, prune)

    @property
    def name(self) -> str:
        return "dense" if self.method == "dense" else f"{self.label}-{self.fuse}"

    @property
    def label(self) -> str:
        """The method as `--methods` names it: `lfuc-da` is lfuc planned depth-aware."""
        return self.method + ("-da" if self.depth_aware is not None else "")

    @classmethod
    def of(cls, label: str, fuse: int, depth: int) -> "Variant":
        """The variant a `--methods` entry names; `-da` plans depth-aware at the depth the table times."""
        if label.endswith("-da"):
            if label not in ("lfuc-da", "prune-da"):
                raise D2MError(f"method {label!r}: only lfuc and prune plan depth-aware (lfuc-da, prune-da)")
            return cls(label.removesuffix("-da"), fuse, depth_aware=depth)
        return cls(label, fuse)

    def request(self) -> PlanRequest:
        if self.depth_aware is None:
            return PlanRequest(method=self.method, fuse=self.fuse)
        return PlanRequest(method=self.method, fuse=self.fuse, depth_aware=True, depth=self.depth_aware)


def build_variant(v: Variant, hf_dir: Path, work: Path, outtype: OutType, heal: HealSettings,
                  scores: Path | None, progress: bool = True) -> Path:
    """The variant's GGUF (reused when already built with the same settings)."""
    out = work / f"{v.name}-{outtype.value}.gguf"
    stamp = out.with_suffix(".settings.json")
    request = v.request()
    variant = {k: x for k, x in asdict(v).items() if x is not None}
    settings = json.dumps({"variant": variant, "plan": repr(request), "outtype": outtype.value,
                           "heal": _heal_key(heal, guests=v.method == "lfuc")}, sort_keys=True)
    if out.is_file() and stamp.is_file() and stamp.read_text() == settings:
        return out
    t = time.monotonic()
    if v.method == "dense":
        from .dense_export import export_dense
        export_dense(hf_dir, out, outtype, progress=progress)
    else:
        run(ConvertRequest(hf_dir=hf_dir, out=out, outtype=outtype, scores=scores, request=request, heal=heal,
                           work_dir=work / f"{v.name}.d2m", progress=progress))
    stamp.write_text(settings)
    log.info("built %s in %.1f min", out.name, (time.monotonic() - t) / 60)
    return out


def _heal_key(heal: HealSettings, guests: bool = True) -> dict:
    """The healing settings a built variant depends on; `guests=False` (a plan without guest experts, such as
    pruning) leaves out the guests' settings, so switching `--freeze-guests/--train-guests` or
    `--min-expert-share` or `--host-first` rebuilds LF-UC only."""
    key = {"minutes": heal.minutes, "tokens": heal.tokens, "block_local_fraction": heal.block_local_fraction,
           "ctx": heal.ctx, "max_chunks": heal.max_chunks, "precision": heal.e2e.precision}
    if guests:
        key["freeze_guests"] = heal.freeze_guests
        key["min_expert_share"] = heal.min_expert_share
        key["host_first"] = heal.host_first
    return key


@dataclass
class SpeedRow:
    model: str
    depth: int
    decode_ts: float
    decode_std: float
    prompt_ts: float | None = None


def llama_bench(llama: LlamaCpp, models: list[Path], depths: tuple[int, ...] = (0,), n_gen: int = 64,
                n_prompt: int = 128, repetitions: int = 3, log_dir: Path | None = None) -> list[SpeedRow]:
    """Decode (and prompt) tokens/s of every model: one llama-bench process in the given order, then one in
    the reverse order, half the repetitions each (rounded up); mean and std over the samples of both.

    Why two orders: on a shared machine the speed drifts over a run and the first file can pay a warm-up
    (measured: an f16 SmolLM2 read 36-43 tok/s decoding first in a process, 49 last), so within one order
    the file order leaks into the ratios; in both orders it falls on every file alike."""
    orders = [models, models[::-1]] if len(models) > 1 else [models]
    per_order = max(1, math.ceil(repetitions / len(orders)))
    samples: dict[tuple[str, int, str], list[float]] = {}
    for i, order in enumerate(orders):
        args = []
        for m in order:
            args += ["-m", m]
        args += ["-p", n_prompt, "-n", n_gen, "-d", ",".join(map(str, depths)), "-r", per_order,
                 "-t", llama.threads, "-o", "json"]
        proc = llama.run("llama-bench", args)
        if log_dir is not None:
            name = "llama-bench" + ("-reversed" if i else "")
            (log_dir / f"{name}.json").write_text(proc.stdout)
            (log_dir / f"{name}.log").write_text(proc.stderr)
        for r in json.loads(proc.stdout):
            test = "decode" if r["n_gen"] > 0 and r["n_prompt"] == 0 else \
                "prompt" if r["n_prompt"] > 0 and r["n_gen"] == 0 else None
            if test is not None:
                key = (Path(r["model_filename"]).name, int(r.get("n_depth", 0)), test)
                samples.setdefault(key, []).extend(float(t) for t in r["samples_ts"])
    rows: dict[tuple[str, int], SpeedRow] = {}
    for (model, depth, test), ts in samples.items():
        row = rows.setdefault((model, depth), SpeedRow(model, depth, 0.0, 0.0))
        if test == "decode":
            row.decode_ts, row.decode_std = statistics.fmean(ts), statistics.stdev(ts) if len(ts) > 1 else 0.0
        else:
            row.prompt_ts = statistics.fmean(ts)
    return list(rows.values())


def wikitext_ppl(llama: LlamaCpp, model: Path, wikitext: Path, ctx: int, chunks: int | None,
                 log_dir: Path | None = None) -> tuple[float, list[float]]:
    """llama-perplexity's estimate and the mean NLL of each chunk (for paired comparisons)."""
    ppl, text = llama.perplexity(model, wikitext, ctx=ctx, chunks=chunks)
    if log_dir is not None:
        (log_dir / f"ppl-{model.stem}.log").write_text(text)
    return ppl, chunk_nlls(text)


def versus(nlls: list[float], baseline: list[float]) -> dict:
    """ppl ratio to a baseline scored on the same chunks, with the paired standard error of its log; `wins`
    when the ratio is below 1 by more than two standard errors."""
    mean, se = paired_log_ratio(nlls, baseline)
    return {"ratio": round(math.exp(mean), 4), "se": round(se, 4), "wins": mean + 2 * se < 0}


@dataclass
class LfucTableRequest:
    hf_dir: Path
    sizes: tuple[int, ...] = (4, 6, 8)
    methods: tuple[str, ...] = ("lfuc", "prune")
    outtype: OutType = OutType.Q8_0
    heal: HealSettings = field(default_factory=HealSettings)
    wikitext: Path | None = None
    ctx: int = 512
    chunks: int | None = None             # None: the whole WikiText-2 test set
    depth: int = 0
    results: Path = Path("bench/results")
    scores: Path | None = None
    progress: bool = True


def lfuc_table(req: LfucTableRequest, llama: LlamaCpp | None = None) -> Path:
    """LF-UC against the equally healed baselines at each size, plus the dense model (issue table)."""
    from .data import DEFAULT_EVAL

    llama = llama or LlamaCpp.default()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(req.results) / f"lfuc-{stamp}"
    work = budget_work_dir(req.results, req.heal)
    for d in (out_dir, work):
        d.mkdir(parents=True, exist_ok=True)
    variants = [Variant("dense")] + [Variant.of(m, n, req.depth) for n in req.sizes for m in req.methods]
    files = {}
    for v in variants:
        files[v] = build_variant(v, req.hf_dir, work, req.outtype, req.heal, req.scores, req.progress)
    speed = {(r.model, r.depth): r for r in llama_bench(llama, list(files.values()), depths=(req.depth,),
                                                         log_dir=out_dir)}
    host = get_device("host")
    phone = load_devices()["phone-i8mm"]
    dense_cost = gguf_cost(files[variants[0]], depth=req.depth)
    rows, nlls = [], {}
    for v in variants:
        f = files[v]
        cost = gguf_cost(f, depth=req.depth)
        ppl, nlls[v] = wikitext_ppl(llama, f, req.wikitext or DEFAULT_EVAL, req.ctx, req.chunks, log_dir=out_dir)
        s = speed[(f.name, req.depth)]
        healed = healing_spent(work / f"{v.name}.d2m")
        rows.append({
            "variant": v.name, "method": v.label, "fuse": v.fuse,
            "heal_tokens": healed["tokens"], "heal_minutes": healed["minutes"],
            "ppl": round(ppl, 3),
            "mb_per_token": round(cost.total_bytes / 1e6, 2),
            "decode_ts": round(s.decode_ts, 2), "decode_std": round(s.decode_std, 2),
            "predicted_speedup_host": round(cost.tokens_per_s(host) / dense_cost.tokens_per_s(host), 3),
            "predicted_tps_phone": round(cost.tokens_per_s(phone), 1),
        })
    dense = rows[0]
    for v, r in zip(variants, rows):
        r["ppl_vs_dense"] = round(r["ppl"] / dense["ppl"], 3)
        r["measured_speedup"] = round(r["decode_ts"] / dense["decode_ts"], 3)
        # each method against the pruning baselines of the same size, chunk by chunk
        for prune in (Variant("prune", v.fuse), Variant("prune", v.fuse, depth_aware=req.depth)):
            column = f"ppl_vs_{prune.label}"
            if v.method != "dense" and v != prune and prune in nlls:
                vs = versus(nlls[v], nlls[prune])
                r[column] = f"{vs['ratio']:.4f} ± {vs['se']:.4f}"
                r[f"beats_{prune.label}"] = "yes" if vs["wins"] else "no"
            elif any(p.label == prune.label for p in variants):
                r[column], r[f"beats_{prune.label}"] = "", ""
    _write_table(rows, out_dir / "lfuc", title=f"LF-UC vs baselines ({req.outtype.value}, WikiText-2 test ctx {req.ctx}"
                 f"{'' if req.chunks is None else f', {req.chunks} chunks'}; decode at depth {req.depth})")
    (out_dir / "settings.json").write_text(json.dumps({"heal": _heal_key(req.heal), "sizes": req.sizes,
                                                       "outtype": req.outtype.value, "ctx": req.ctx,
                                                       "chunks": req.chunks}, indent=1))
    return out_dir


@dataclass
class CurveRequest:
    """Quality against the healing budget: the honest curve where a target is out of reach of the default."""

    hf_dir: Path
    fuse: int = 8
    methods: tuple[str, ...] = ("lfuc", "prune")
    budgets: tuple[int, ...] = (0, 160_000, 640_000, 1_280_000)   # healing tokens (the default is 640k)
    outtype: OutType = OutType.Q8_0
    wikitext: Path | None = None
    ctx: int = 512
    chunks: int | None = 40
    results: Path = Path("bench/results")
    scores: Path | None = None
    progress: bool = True


def healing_curve(req: CurveRequest, llama: LlamaCpp | None = None) -> Path:
    """WikiText-2 ppl (llama-perplexity) of each method at each healing-token budget, plus the dense model:
    curve.csv, curve.md, curve.png. A budget's variants are built under work/heal-<tokens>/ and reused."""
    from .data import DEFAULT_EVAL

    llama = llama or LlamaCpp.default()
    out_dir = Path(req.results) / f"curve-{time.strftime('%Y%m%d-%H%M%S')}"
    work = Path(req.results) / "work"
    for d in (out_dir, work):
        d.mkdir(parents=True, exist_ok=True)
    text = req.wikitext or DEFAULT_EVAL
    dense_file = build_variant(Variant("dense"), req.hf_dir, work, req.outtype, HealSettings(tokens=0), None,
                               req.progress)
    dense_ppl, _ = wikitext_ppl(llama, dense_file, text, req.ctx, req.chunks, log_dir=out_dir)
    rows = []
    for tokens in req.budgets:
        heal = HealSettings(tokens=tokens)
        budget_dir, log_dir = budget_work_dir(req.results, heal), out_dir / f"heal-{tokens}"
        for d in (budget_dir, log_dir):
            d.mkdir(parents=True, exist_ok=True)
        for method in req.methods:
            v = Variant.of(method, req.fuse, depth=0)
            f = build_variant(v, req.hf_dir, budget_dir, req.outtype, heal, req.scores, req.progress)
            ppl, _ = wikitext_ppl(llama, f, text, req.ctx, req.chunks, log_dir=log_dir)
            spent = healing_spent(budget_dir / f"{v.name}.d2m")
            rows.append({"variant": v.name, "method": v.label, "fuse": req.fuse, "budget_tokens": tokens,
                         "heal_tokens": spent["tokens"], "heal_minutes": spent["minutes"], "ppl": round(ppl, 3),
                         "ppl_vs_dense": round(ppl / dense_ppl, 3)})
            log.info("%s at %d healing tokens: ppl %.2f (dense %.2f)", v.name, tokens, ppl, dense_ppl)
    _write_table(rows, out_dir / "curve", title=f"Healing curve: fuse {req.fuse}, {req.outtype.value}, WikiText-2 test "
                 f"ctx {req.ctx}{'' if req.chunks is None else f', {req.chunks} chunks'}; dense ppl {dense_ppl:.3f}")
    plot_curve(rows, dense_ppl, out_dir / "curve.png")
    return out_dir


def plot_curve(rows: list[dict], dense_ppl: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["budget_tokens"], r["ppl"]) for r in rows if r["method"] == method)
        ax.plot([p[0] / 1e3 for p in pts], [p[1] for p in pts], marker="o", label=f"{method}-{rows[0]['fuse']}")
    ax.axhline(dense_ppl, color="k", lw=1, label="dense")
    ax.axhline(1.25 * dense_ppl, color="k", lw=1, ls="--", label="1.25 x dense")
    ax.set_xlabel("healing tokens (thousands)")
    ax.set_ylabel("WikiText-2 ppl")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def budget_work_dir(results: Path, heal: HealSettings) -> Path:
    """Where variants healed with `heal` are built: one folder per token budget, shared by `bench lfuc` and
    `bench curve` (a variant is rebuilt only when its settings stamp differs)."""
    return Path(results) / "work" / f"heal-{heal.tokens or 0}"


def healing_spent(work_dir: Path) -> dict:
    """Tokens and minutes a variant's healing took (its heal.json; zero when it was not healed)."""
    try:
        stages = json.loads((work_dir / "heal.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {"tokens": 0, "minutes": 0.0}
    return {"tokens": sum(s["tokens"] for s in stages),
            "minutes": round(sum(s.get("seconds", 0.0) for s in stages) / 60, 1)}


def _write_table(rows: list[dict], stem: Path, title: str) -> None:
    keys = list(rows[0])
    with open(stem.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


__all__ = ["Variant", "build_variant", "llama_bench", "lfuc_table", "LfucTableRequest", "healing_curve", "CurveRequest",
           "D2MError"]
