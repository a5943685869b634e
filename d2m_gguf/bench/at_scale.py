"""`d2m bench at-scale`: pruning against LF-UC healed with the same end-to-end budget on transformers' Trainer.

The comparison the CPU budgets here cannot settle (issue 4's note: 10^7-10^8 healing tokens), in one command for
a machine with GPUs. Each method at one size: convert's own healing first (the same token budget for both;
LF-UC routes first and trains its guests), then `d2m distill` end to end for `--tokens` tokens (torchrun over
the GPUs, bf16 where the hardware has it), then the GGUF. Quality is WikiText-2 through llama-perplexity, LF-UC's
ratio to pruning paired chunk by chunk. On CPU the same code runs at a tiny budget (tests/test_trainer.py).
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..distill import E2EConfig, PRECISIONS, resolve_precision
from ..errors import D2MError
from ..ggufout import OutType
from ..heal import HealSettings
from ..llamacpp import LlamaCpp
from ..options import setting
from ..pipeline import ConvertRequest, DistillRequest, distill_checkpoint, run
from ..planner import PlanRequest
from .lfuc import versus, wikitext_ppl
from .provenance import provenance
from .tables import write_table
from .variants import cached_build, results_setting, source_key

log = logging.getLogger("d2m")

METHODS = ("prune", "lfuc")


@dataclass
class AtScaleRequest:
    hf_dir: Path
    fuse: int = setting(8, "Fused groups (LF-UC) / removed layers (pruning).")
    tokens: int = setting(20_000_000, "End-to-end healing tokens of each method (d2m distill on transformers' "
                          "Trainer).", bounds=(1, None))
    local_tokens: int = setting(HealSettings.tokens, "Healing tokens of convert's own healing before it (the same "
                                "for both methods).", bounds=(0, None))
    nproc: int = setting(0, "torchrun processes (0: one per CUDA GPU; one process without GPUs).", bounds=(0, None))
    batch: int = setting(8, "Sequences per step per process.")
    lr: float = E2EConfig.lr
    precision: str = setting("auto", "Training precision; auto: bf16 where the hardware has it.",
                             choices=PRECISIONS)
    heal_ctx: int = setting(HealSettings.ctx, "Tokens per healing sequence.")
    text: Path | None = None
    outtype: OutType = setting(OutType.F16, "Tensor type the GGUFs are written and measured in.")
    wikitext: Path | None = None
    ctx: int = setting(512, "llama-perplexity context.")
    chunks: int | None = setting(None, "WikiText chunks.", default_text="the whole test set")
    results: Path = results_setting()
    progress: bool = True


def _processes(req: AtScaleRequest) -> int:
    return req.nproc or max(1, torch.cuda.device_count())


def _distill(req: AtScaleRequest, student: Path, out: Path) -> None:
    """`d2m distill` of `student` into `out` (resumed from out/checkpoints after an interruption)."""
    e2e = replace(E2EConfig(), batch=req.batch, lr=req.lr, precision=resolve_precision(req.precision))
    dreq = DistillRequest(student=student, teacher=req.hf_dir, out=out, minutes=None, tokens=req.tokens,
                          text=req.text, ctx=req.heal_ctx, e2e=e2e, freeze_guests=False, progress=req.progress)
    n = _processes(req)
    if n == 1:
        distill_checkpoint(dreq)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m", "d2m_gguf", "distill",
           str(student), str(out), "--teacher", str(req.hf_dir), "--tokens", str(req.tokens), "--minutes", "0",
           "--batch", str(req.batch), "--lr", str(req.lr), "--precision", req.precision, "--ctx", str(req.heal_ctx),
           "--train-guests", *(["--text", str(req.text)] if req.text else []), *([] if req.progress else ["--quiet"])]
    if subprocess.run(cmd).returncode != 0:
        raise D2MError(f"d2m distill under torchrun failed: {' '.join(cmd)}")


def _throughput(distilled: Path) -> tuple[int, float]:
    """(tokens, tokens/s) of a distillation run, from its heal.csv (this run's steps)."""
    with open(distilled / "heal.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    first, last = rows[0], rows[-1]
    seconds = float(last["seconds"]) - float(first["seconds"])
    steps = int(last["step"]) - int(first["step"])
    per_step = int(last["tokens"]) / int(last["step"])
    return int(last["tokens"]), (steps * per_step / seconds if seconds > 0 else float("nan"))


def compare_at_scale(req: AtScaleRequest, llama: LlamaCpp | None = None) -> Path:
    """at_scale.md/.csv (+ settings.json) under a new results folder; the builds go to work/at-scale-<tokens>."""
    from ..data import DEFAULT_EVAL
    from ..dense_export import export_dense

    prov = provenance()
    llama = llama or LlamaCpp.default()
    out_dir = Path(req.results) / f"at-scale-{time.strftime('%Y%m%d-%H%M%S')}"
    work = Path(req.results) / "work" / f"at-scale-{req.tokens}"
    for d in (out_dir, work):
        d.mkdir(parents=True, exist_ok=True)
    heal = HealSettings(tokens=req.local_tokens, ctx=req.heal_ctx, host_first=False, freeze_guests=False)
    heal = heal.with_precision(resolve_precision(req.precision)) if req.local_tokens else heal.disabled()
    dense = cached_build(work / f"dense-{req.outtype.value}.gguf", req.outtype.value,
                         lambda: export_dense(req.hf_dir, work / f"dense-{req.outtype.value}.gguf", req.outtype,
                                              progress=req.progress))
    wikitext = req.wikitext or DEFAULT_EVAL
    ppl, nlls = {}, {}
    ppl["dense"], nlls["dense"] = wikitext_ppl(llama, dense, wikitext, req.ctx, req.chunks, log_dir=out_dir)
    rows = [{"method": "dense", "fuse": 0, "local_tokens": 0, "e2e_tokens": 0, "e2e_tokens_per_s": "",
             "ppl": round(ppl["dense"], 3), "ppl_vs_dense": 1.0, "ppl_vs_prune": "", "beats_prune": ""}]
    for method in METHODS:
        name = f"{method}-{req.fuse}"
        upcycled, distilled = work / f"{name}-upcycled", work / f"{name}-distilled"
        settings = json.dumps({"source": source_key(req.hf_dir), "method": method, "fuse": req.fuse, "heal": repr(heal), "text": str(req.text)})
        cached_build(work / f"{name}-local.gguf", settings, lambda: run(ConvertRequest(
            hf_dir=req.hf_dir, out=work / f"{name}-local.gguf", outtype=req.outtype, text=req.text,
            request=PlanRequest(method=method, fuse=req.fuse), healing=heal, save_hf=upcycled,
            work_dir=work / f"{name}.d2m", progress=req.progress)))
        _distill(req, upcycled, distilled)
        tokens, tps = _throughput(distilled)
        gguf = work / f"{name}-{req.outtype.value}.gguf"
        run(ConvertRequest(hf_dir=distilled, out=gguf, outtype=req.outtype, progress=req.progress))
        ppl[method], nlls[method] = wikitext_ppl(llama, gguf, wikitext, req.ctx, req.chunks, log_dir=out_dir)
        rows.append({"method": method, "fuse": req.fuse, "local_tokens": req.local_tokens, "e2e_tokens": tokens,
                     "e2e_tokens_per_s": round(tps, 1), "ppl": round(ppl[method], 3),
                     "ppl_vs_dense": round(ppl[method] / ppl["dense"], 3), "ppl_vs_prune": "", "beats_prune": ""})
    vs = versus(nlls["lfuc"], nlls["prune"])
    rows[-1]["ppl_vs_prune"] = f"{vs['ratio']:.4f} ± {vs['se']:.4f}"
    rows[-1]["beats_prune"] = "yes" if vs["wins"] else "no"
    write_table(rows, out_dir / "at_scale", provenance=prov, title=(
        f"Pruning vs LF-UC at {req.fuse}, each healed {req.local_tokens} tokens by convert then {req.tokens} "
        f"end to end on {_processes(req)} process(es), {req.precision} ({req.outtype.value}, WikiText-2 test ctx "
        f"{req.ctx}{'' if req.chunks is None else f', {req.chunks} chunks'})"))
    (out_dir / "settings.json").write_text(json.dumps({"provenance": prov, "request": {
        k: str(v) for k, v in vars(req).items()}}, indent=1))
    return out_dir
