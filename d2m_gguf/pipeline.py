"""`convert.py HF_DIR OUT.gguf`: analyse -> plan -> upcycle -> heal -> write, every stage reusable.

Artefacts go to a work directory beside the output (OUT.d2m/ by default):
scores.json + scores.png (analysis), plan.json, heal.csv + heal.png + heal.json
(healing curves and settings), checkpoint.pt (resumable end-to-end stage).
Pass --scores / --plan to reuse earlier ones.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .analysis import LayerScores, analyze, plot_scores
from .checkpoint import Checkpoint
from .costmodel import get_device
from .data import DEFAULT_CALIBRATION, Tokenizer, read_text, token_chunks
from .errors import D2MError
from .ggufout import OutType
from .heal import (BlockLocalConfig, Budget, E2EConfig, StageLog, TeacherCache, block_local_distill, block_spans,
                   distill_e2e, trained_blocks)
from .hybrid_export import export_hybrid
from .model import HybridModel
from .plan import FusionPlan, identity_plan, load_plan, plan_summary
from .planner import PlanRequest, choose_plan
from .spec import DenseSpec, load_dense_spec
from .upcycle import upcycle

log = logging.getLogger("d2m")


@dataclass
class HealSettings:
    """The healing budget. The default finishes in minutes on SmolLM2-135M with 2 CPU cores."""

    minutes: float = 10.0
    tokens: int | None = None
    block_local_fraction: float = 0.6   # of the budget; the rest is end-to-end distillation
    ctx: int = 256
    max_chunks: int | None = None       # calibration sequences used (None: the whole text)
    block_local: BlockLocalConfig = field(default_factory=BlockLocalConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)

    @property
    def enabled(self) -> bool:
        return (self.minutes or 0) > 0 or (self.tokens or 0) > 0

    def stage_budget(self, fraction: float) -> Budget:
        return Budget(tokens=int(self.tokens * fraction) if self.tokens else None,
                      minutes=self.minutes * fraction if self.minutes else None)


def calibration(hf_dir: Path, text: Path | None, ctx: int, max_chunks: int | None) -> torch.Tensor:
    tok = Tokenizer(hf_dir)
    return token_chunks(tok.encode(read_text(text or DEFAULT_CALIBRATION)), ctx, max_chunks, tok.bos)


def heal(model: HybridModel, teacher: HybridModel, plan: FusionPlan, chunks: torch.Tensor, settings: HealSettings,
         work_dir: Path, progress: bool = True) -> list[StageLog]:
    """Block-local distillation of the fused blocks (with router fitting), then end-to-end distillation."""
    logs: list[StageLog] = []
    torch.manual_seed(settings.block_local.seed)
    blocks = trained_blocks(plan)
    if blocks and settings.block_local_fraction > 0:
        spans = block_spans(plan)
        boundaries = {spans[j][0] for j in blocks} | {spans[j][1] for j in blocks}
        t = time.monotonic()
        cache = TeacherCache(teacher, chunks, boundaries, cache_dir=work_dir, progress=progress)
        log.info("teacher activations: %d sequences x %d tokens at %d boundaries (%.0f s)",
                 chunks.shape[0], chunks.shape[1], len(boundaries), time.monotonic() - t)
        try:
            logs.append(block_local_distill(model, plan, cache, settings.stage_budget(settings.block_local_fraction),
                                            settings.block_local, progress=progress))
        finally:
            cache.close()
    if settings.block_local_fraction < 1:
        logs.append(distill_e2e(model, teacher, chunks, settings.stage_budget(1 - settings.block_local_fraction),
                                settings.e2e, checkpoint=work_dir / "checkpoint.pt", progress=progress))
    write_heal_logs(logs, work_dir)
    return logs


def write_heal_logs(logs: list[StageLog], work_dir: Path) -> None:
    """heal.csv (every logged step of every stage) and heal.png (loss against tokens)."""
    rows = [{"stage": s.stage, **r} for s in logs for r in s.rows]
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(work_dir / "heal.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(5.5 * len(logs), 3.8), squeeze=False)
    for ax, stage in zip(axes[0], logs):
        if not stage.rows:
            continue
        x = [r["tokens"] for r in stage.rows]
        for key in [k for k in stage.rows[0] if k.startswith("rel_mse_") or k in ("kd", "lm")]:
            ax.plot(x, [r[key] for r in stage.rows], label=key)
        ax.set_title(f"{stage.stage} ({stage.tokens} tokens, {stage.seconds / 60:.1f} min)")
        ax.set_xlabel("tokens")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(work_dir / "heal.png", dpi=100)
    plt.close(fig)


def expert_usage(model: HybridModel, chunks: torch.Tensor, batch: int = 4) -> dict[int, list[float]]:
    """Share of routed slots per expert, per MoE block, on `chunks`."""
    from .model import MoEFFN

    counts: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(0, len(chunks), batch):
            model(chunks[i:i + batch])
            for j, block in enumerate(model.blocks):
                if isinstance(block.ffn, MoEFFN):
                    sel = block.ffn.last_selection
                    n = block.ffn.ffn_gate_exps.shape[0]
                    counts[j] = counts.get(j, torch.zeros(n)) + torch.bincount(sel.flatten(), minlength=n)
    return {j: (c / c.sum()).tolist() for j, c in counts.items()}


@dataclass
class ConvertRequest:
    hf_dir: Path
    out: Path
    outtype: OutType = OutType.F16
    plan: Path | None = None
    scores: Path | None = None
    request: PlanRequest = field(default_factory=PlanRequest)
    device: str = "host"
    text: Path | None = None
    heal: HealSettings = field(default_factory=HealSettings)
    work_dir: Path | None = None
    save_hf: Path | None = None
    pre_tokenizer: str | None = None
    router_init: str | None = None      # overrides the plan's
    seed: int = 0
    progress: bool = True


def run(req: ConvertRequest) -> dict:
    """The whole job. Returns a summary (also written as OUT.d2m/summary.json)."""
    spec = load_dense_spec(req.hf_dir)
    ckpt = Checkpoint(req.hf_dir)
    ckpt.check(spec)
    work = req.work_dir or req.out.with_name(req.out.name + ".d2m")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(req.seed)
    summary: dict = {"source": str(req.hf_dir), "output": str(req.out)}
    teacher = upcycle(spec, ckpt, identity_plan(spec.n_layer))
    chunks = None

    if req.plan is not None:
        plan = load_plan(req.plan, spec.n_layer)
    else:
        if req.scores is not None:
            scores = LayerScores.load(req.scores)
        else:
            chunks = calibration(req.hf_dir, req.text, req.heal.ctx, req.heal.max_chunks)
            scores = analyze(teacher, chunks[:32], progress=req.progress, source=req.hf_dir.name)
            scores.save(work / "scores.json")
            plot_scores(scores, work / "scores.png")
        device = get_device(req.device)
        choice = choose_plan(spec, scores, req.request, device)
        plan = choice.plan
        plan.save(work / "plan.json")
        summary["predicted"] = {"device": device.name, "depth": req.request.depth,
                                "dense_mb_per_token": round(choice.dense_bytes / 1e6, 2),
                                "plan_mb_per_token": round(choice.plan_bytes / 1e6, 2),
                                "speedup": round(choice.predicted_speedup, 3)}
        log.info("plan: %s fuse=%d %s; predicted x%.2f on %s at depth %d", plan.method, choice.fuse,
                 json.dumps(plan_summary(plan)), choice.predicted_speedup, device.name, req.request.depth)
    if req.router_init:
        plan = plan.with_router_init(req.router_init)
    summary["plan"] = plan_summary(plan)

    model = upcycle(spec, ckpt, plan, seed=req.seed)
    healing = None
    if req.heal.enabled:
        if chunks is None:
            chunks = calibration(req.hf_dir, req.text, req.heal.ctx, req.heal.max_chunks)
        logs = heal(model, teacher, plan, chunks, req.heal, work, progress=req.progress)
        healing = {"minutes": req.heal.minutes, "tokens_budget": req.heal.tokens,
                   "block_local_fraction": req.heal.block_local_fraction,
                   "stages": [{"stage": s.stage, "tokens": s.tokens, "seconds": round(s.seconds, 1),
                               "final": s.rows[-1] if s.rows else {}} for s in logs],
                   "calibration_tokens": int(chunks.numel()),
                   "settings": {"block_local": asdict(req.heal.block_local), "e2e": asdict(req.heal.e2e)}}
        usage = expert_usage(model, chunks[: min(16, len(chunks))])
        if usage:
            healing["expert_usage"] = {str(j): [round(u, 3) for u in v] for j, v in usage.items()}
        (work / "heal.json").write_text(json.dumps(healing, indent=1) + "\n", encoding="utf-8")
    elif plan.router_init == "fit" and any(b.moe for b in plan.blocks):
        log.warning("router_init 'fit' without healing: routers stay at their random initialisation")
    summary["healing"] = healing

    if req.save_hf:
        from .hf_export import save_hf_checkpoint
        save_hf_checkpoint(model, plan, spec, req.hf_dir, req.save_hf)
    export_hybrid(model, plan, spec, req.hf_dir, req.out, req.outtype, pre_tokenizer=req.pre_tokenizer,
                  healing=healing, progress=req.progress)
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    return summary


__all__ = ["ConvertRequest", "HealSettings", "run", "heal", "calibration", "expert_usage", "D2MError", "DenseSpec"]
