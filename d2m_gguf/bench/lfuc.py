"""`d2m bench lfuc` and `d2m bench curve`: LF-UC against equally healed baselines, and quality against healing.

Every measured number comes from the patched llama.cpp (llama-perplexity on
WikiText-2 test, llama-bench for speed); variants of one table are timed together
(llamabench.llama_bench: one process in each file order) so their ratios hold. Nothing here
asserts: tests check the machinery, the numbers go into the results directory.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..costmodel import gguf_cost, get_device, load_devices
from ..ggufout import OutType
from ..llamacpp import LlamaCpp, chunk_nlls, paired_log_ratio
from ..heal import HealSettings
from ..options import setting
from .llamabench import llama_bench
from .provenance import provenance
from .tables import write_table
from .variants import Variant, budget_work_dir, build_variant, heal_key, healing_spent, results_setting

log = logging.getLogger("d2m")


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


def _methods():
    return setting(("lfuc", "prune"), "Methods to compare (plus dense); a -da suffix (lfuc-da, prune-da) plans "
                   "depth-aware at the timed depth.")


def _outtype():
    return setting(OutType.Q8_0, "Tensor type the variants are written and measured in.")


def _scores():
    return setting(None, "Reuse scores from `d2m analyze`.")


@dataclass
class LfucTableRequest:
    hf_dir: Path
    sizes: tuple[int, ...] = setting((4, 6, 8), "Fused groups / removed layers per variant.")
    methods: tuple[str, ...] = _methods()
    outtype: OutType = _outtype()
    heal: HealSettings = field(default_factory=HealSettings)
    wikitext: Path | None = None
    ctx: int = setting(512, "llama-perplexity context.")
    chunks: int | None = setting(None, "WikiText chunks.", default_text="the whole test set")
    depth: int = setting(0, "Context depth of the decode timing.")
    results: Path = results_setting()
    scores: Path | None = _scores()
    progress: bool = True


def lfuc_table(req: LfucTableRequest, llama: LlamaCpp | None = None) -> Path:
    """LF-UC against the equally healed baselines at each size, plus the dense model (issue table)."""
    from ..data import DEFAULT_EVAL

    prov = provenance()
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
    write_table(rows, out_dir / "lfuc", title=f"LF-UC vs baselines ({req.outtype.value}, WikiText-2 test ctx {req.ctx}"
                f"{'' if req.chunks is None else f', {req.chunks} chunks'}; decode at depth {req.depth})",
                provenance=prov)
    (out_dir / "settings.json").write_text(json.dumps({"provenance": prov, "heal": heal_key(req.heal),
                                                       "sizes": req.sizes, "outtype": req.outtype.value,
                                                       "ctx": req.ctx, "chunks": req.chunks}, indent=1))
    return out_dir


@dataclass
class CurveRequest:
    """Quality against the healing budget: the honest curve where a target is out of reach of the default."""

    hf_dir: Path
    fuse: int = setting(8, "Fused groups / removed layers.")
    methods: tuple[str, ...] = _methods()
    budgets: tuple[int, ...] = setting((0, 160_000, 640_000, 1_280_000), "Healing-token budgets (each split as "
                                       "--block-local-fraction's default says).")
    outtype: OutType = _outtype()
    wikitext: Path | None = None
    ctx: int = 512
    chunks: int | None = setting(40, "WikiText chunks of 512 tokens.")
    results: Path = results_setting()
    scores: Path | None = _scores()
    progress: bool = True


def healing_curve(req: CurveRequest, llama: LlamaCpp | None = None) -> Path:
    """WikiText-2 ppl (llama-perplexity) of each method at each healing-token budget, plus the dense model:
    curve.csv, curve.md, curve.png. A budget's variants are built under work/heal-<tokens>/ and reused."""
    from ..data import DEFAULT_EVAL

    prov = provenance()
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
    write_table(rows, out_dir / "curve", title=f"Healing curve: fuse {req.fuse}, {req.outtype.value}, WikiText-2 test "
                f"ctx {req.ctx}{'' if req.chunks is None else f', {req.chunks} chunks'}; dense ppl {dense_ppl:.3f}",
                provenance=prov)
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


__all__ = ["LfucTableRequest", "lfuc_table", "CurveRequest", "healing_curve", "plot_curve", "wikitext_ppl", "versus"]
