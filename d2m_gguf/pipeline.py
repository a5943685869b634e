"""`convert.py HF_DIR OUT.gguf`: analyse -> plan -> upcycle -> heal -> write, every stage reusable.

Artefacts go to a work directory beside the output (OUT.d2m/ by default):
scores.json + scores.png (analysis), plan.json, heal.csv + heal.png + heal.json
(healing curves and settings). A resumable end-to-end checkpoint is `d2m heal`'s (--save-hf, then heal).
Pass --scores / --plan to reuse earlier ones.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .analysis import LayerScores, analyze, plot_scores
from .checkpoint import Checkpoint
from .costmodel import get_device
from .data import DEFAULT_CALIBRATION, Tokenizer, read_text, token_chunks
from .errors import D2MError
from .ggufout import OutType
from .heal import (BlockLocalConfig, Budget, E2EConfig, StageLog, TeacherCache, block_local_distill, RouterFitConfig,
                   distill_e2e, fit_routers, frozen_guests, frozen_routers)
from .atomic import check_output_path
from .hybrid_export import export_hybrid, hybrid_tensors
from .model import HybridModel
from .plan import FusionPlan, block_spans, identity_plan, load_plan, plan_summary, trained_blocks
from .planner import PlanRequest, choose_plan
from .spec import DenseSpec, load_dense_spec
from .upcycle import drop_idle_experts, upcycle
from .vocab import check_tokenizer

log = logging.getLogger("d2m")


@dataclass
class HealSettings:
    """The healing budget. The default, 640k tokens (600k of block-local distillation, then 40k end-to-end), takes
    about 8 minutes for SmolLM2-135M with 8 fused layers on 2 CPU cores with native bf16 (22 in fp32 on AVX2
    alone). A block-local token costs about a tenth of an end-to-end one (only the fused blocks run, on cached
    teacher states) and heals far more per minute:
    SmolLM2, 8 fused, WikiText ppl on 16 x 512 tokens, 60k + 40k tokens 60.5 (3.7 min), 300k + 40k 55.1
    (5.9 min), while 100k + 200k end-to-end gave 54.3 in 13 min. A token budget drives the learning-rate
    schedule, so the result does not depend on the machine's speed; `minutes` is only a stop."""

    tokens: int | None = 640_000
    minutes: float | None = None
    block_local_fraction: float = 0.9375  # of the budget; the rest is end-to-end distillation
    ctx: int = 256
    max_chunks: int | None = None       # calibration sequences used (None: the whole text)
    block_local_sequences: int = 512    # teacher activations cached for block-local distillation (ctx each)
    block_local: BlockLocalConfig = field(default_factory=BlockLocalConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)
    seed: int = 0                       # router fit (its held-out split and draws)
    freeze_guests: bool = True          # guests keep their pretrained weights (heal.frozen_guests; README)
    min_expert_share: float = 0.001     # healed experts picked for fewer of the tokens are dropped (upcycle)
    host_first: bool = True             # block-local heals hosts alone, then the router fit admits guests

    @property
    def enabled(self) -> bool:
        return (self.minutes or 0) > 0 or (self.tokens or 0) > 0

    def stage_budget(self, fraction: float) -> Budget:
        return Budget(tokens=int(self.tokens * fraction) if self.tokens else None,
                      minutes=self.minutes * fraction if self.minutes else None)

    def cached_sequences(self) -> int:
        """Teacher sequences to cache for block-local distillation: `block_local_sequences`, or fewer when the
        block-local token budget would not read them all (the cache costs a teacher forward per sequence)."""
        n = self.block_local_sequences
        if self.tokens:
            n = min(n, max(8, math.ceil(self.tokens * self.block_local_fraction / self.ctx)))
        return n

    def with_precision(self, precision: str) -> "HealSettings":
        """These settings with both training stages at `precision` (bf16 or fp32)."""
        return replace(self, block_local=replace(self.block_local, precision=precision),
                       e2e=replace(self.e2e, precision=precision))

    def seeded(self, seed: int) -> "HealSettings":
        """These settings with every stage drawing from `seed`."""
        return replace(self, seed=seed, block_local=replace(self.block_local, seed=seed),
                       e2e=replace(self.e2e, seed=seed))


def calibration(hf_dir: Path, text: Path | None, ctx: int, max_chunks: int | None) -> torch.Tensor:
    tok = Tokenizer(hf_dir)
    source = text or DEFAULT_CALIBRATION
    return token_chunks(tok.encode(read_text(source)), ctx, max_chunks, tok.bos, where=f"{source} (--ctx {ctx})")


@dataclass
class Healed:
    """What healing leaves: the model and its plan (host-first healing may have written routed blocks dense),
    the stages' logs, and (host first) the expert usage the dropping before end-to-end healing went by."""

    model: HybridModel
    plan: FusionPlan
    logs: list[StageLog]
    usage_after_router_fit: dict[int, list[float]] = field(default_factory=dict)


def heal(model: HybridModel, teacher: HybridModel, plan: FusionPlan, spec: DenseSpec, chunks: torch.Tensor,
         settings: HealSettings, work_dir: Path, progress: bool = True) -> Healed:
    """Block-local distillation of the fused blocks (with router fitting), then end-to-end distillation.

    Host first (`settings.host_first`), the experts the fitted routers leave idle are dropped between the two
    stages, so a block whose guests the fit did not admit heals end to end as the pruned model's block does.
    Always from the upcycled model, and without an end-to-end checkpoint: one left in `work_dir` by an
    earlier run (another plan or budget, same shapes) would be resumed over this run's block-local result,
    and a model's with its optimiser state is 1.3 GB for SmolLM2. Resuming is `d2m heal`'s job."""
    logs: list[StageLog] = []
    usage: dict[int, list[float]] = {}
    torch.manual_seed(settings.block_local.seed)
    blocks = trained_blocks(plan)
    if blocks and settings.block_local_fraction > 0:
        with frozen_guests(model, plan, settings.freeze_guests):
            logs += _block_local_stages(model, teacher, plan, chunks, settings, blocks, work_dir, progress)
        if _host_first(settings, plan):
            model, plan, usage = _drop_idle(model, plan, spec, chunks, settings.min_expert_share)
            if "idle_experts_dropped" in plan.notes:
                log.info("before end-to-end healing, unrouted experts dropped (block: source layers): %s",
                         plan.notes["idle_experts_dropped"])
    if settings.block_local_fraction < 1:
        with frozen_guests(model, plan, settings.freeze_guests):
            logs.append(distill_e2e(model, teacher, chunks, settings.stage_budget(1 - settings.block_local_fraction),
                                    settings.e2e, checkpoint=None, progress=progress))
    write_heal_logs(logs, work_dir)
    return Healed(model, plan, logs, usage)


def _drop_idle(model: HybridModel, plan: FusionPlan, spec: DenseSpec, chunks: torch.Tensor,
               min_share: float) -> tuple[HybridModel, FusionPlan, dict[int, list[float]]]:
    """The expert usage on (up to) 16 calibration sequences, and the model and plan without the experts used
    less than `min_share` (upcycle.drop_idle_experts)."""
    usage = expert_usage(model, chunks[:16])
    model, plan = drop_idle_experts(model, plan, spec, usage, min_share)
    return model, plan, usage


def _rounded(usage: dict[int, list[float]]) -> dict[str, list[float]]:
    return {str(j): [round(u, 3) for u in v] for j, v in usage.items()}


def _host_first(settings: HealSettings, plan: FusionPlan) -> bool:
    """Host-first healing needs routers that start on the host (`host`, or `fit`, which starts there)."""
    return settings.host_first and plan.router_init in ("host", "fit")


def block_local_config(settings: HealSettings, plan: FusionPlan) -> BlockLocalConfig:
    """What block-local distillation runs with. Host first: every token on its host (routers frozen at the host
    initialisation), the pruned model's healing step for step, so no router or balance term; the router fit
    then admits a guest only where it lowers the healed block's error."""
    if _host_first(settings, plan):
        return replace(settings.block_local, router_weight=0.0, balance_weight=0.0)
    return settings.block_local


def spread_subset(chunks: torch.Tensor, n: int) -> torch.Tensor:
    """All of `chunks` when there are at most `n`, else `n` of them evenly spaced over the whole text: block-local
    distillation caches that many, and the head of a large healing text (`--text`, `d2m synth`) is not a sample
    of it."""
    if len(chunks) <= n:
        return chunks
    return chunks[torch.linspace(0, len(chunks) - 1, n).round().long()]


def _block_local_stages(model: HybridModel, teacher: HybridModel, plan: FusionPlan, chunks: torch.Tensor,
                        settings: HealSettings, blocks: list[int], work_dir: Path, progress: bool) -> list[StageLog]:
    """Router fit and block-local distillation on the teacher's cached activations at the trained spans."""
    logs: list[StageLog] = []
    spans = block_spans(plan)
    boundaries = {spans[j][0] for j in blocks} | {spans[j][1] for j in blocks}
    t = time.monotonic()
    cached = spread_subset(chunks, settings.cached_sequences())
    cache = TeacherCache(teacher, cached, boundaries, cache_dir=work_dir, progress=progress)
    log.info("teacher activations: %d sequences x %d tokens at %d boundaries (%.0f s)",
             cached.shape[0], cached.shape[1], len(boundaries), time.monotonic() - t)
    host_first = _host_first(settings, plan)
    local = block_local_config(settings, plan)
    fit = plan.router_init == "fit"
    try:
        if fit and not host_first:
            logs.append(_fit_routers(model, plan, cache, settings.seed))
        with frozen_routers(model, host_first):
            logs.append(block_local_distill(model, plan, cache, settings.stage_budget(settings.block_local_fraction),
                                            local, progress=progress))
        if fit and host_first:
            logs.append(_fit_routers(model, plan, cache, settings.seed))
    finally:
        cache.close()
    return logs


def _fit_routers(model: HybridModel, plan: FusionPlan, cache: TeacherCache, seed: int) -> StageLog:
    fits = fit_routers(model, plan, cache, RouterFitConfig(seed=seed))
    for j, r in fits.items():
        oracle = (f"; a perfect router: {r['held_out_rel_err_oracle']:.4f}, {r['oracle_guest_share']:.1%} to guests"
                  if "held_out_rel_err_oracle" in r else "")
        log.info("router of block %d: held-out error %.4f -> %.4f (%s%s)", j, r["held_out_rel_err_before"],
                 r["held_out_rel_err_after"], "fitted" if r["kept"] else "kept host routing", oracle)
    return StageLog("router-fit", rows=[{"block": j, **r} for j, r in fits.items()])


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

    curves = [s for s in logs if s.rows and "tokens" in s.rows[0]]   # training stages (not the router fit)
    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, stage in zip(axes[0], curves):
        x = [r["tokens"] for r in stage.rows]
        for key in [k for k in stage.rows[0] if k.startswith("rel_mse_") or k in ("kd", "lm")]:
            ax.plot(x, [r[key] for r in stage.rows], label=key)
        ax.set_title(f"{stage.stage} ({stage.tokens} tokens, {stage.seconds / 60:.1f} min)")
        ax.set_xlabel("tokens")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
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
    student: Path | None = None         # an upcycled (e.g. `d2m heal`ed) HF-style checkpoint: write it, no planning


def run(req: ConvertRequest) -> dict:
    """The whole job. Returns a summary (also written as OUT.d2m/summary.json)."""
    spec = load_dense_spec(req.hf_dir)
    if req.student is not None:
        return export_student(req, spec)
    ckpt = Checkpoint(req.hf_dir)
    ckpt.check(spec)
    check_tokenizer(req.hf_dir, spec.vocab_size)
    check_output_path(req.out)
    # every input is checked before any work and before anything is written
    plan = None
    if req.plan is not None:
        plan = load_plan(req.plan, spec.n_layer, spec.n_ff)
        if plan.changes_nothing() and req.heal.enabled:
            log.info("the plan changes nothing (the dense model in the dense2moe format): no healing")
            req = replace(req, heal=replace(req.heal, tokens=0, minutes=None))
    chunks = None
    if (plan is None and req.scores is None) or req.heal.enabled:
        chunks = calibration(req.hf_dir, req.text, req.heal.ctx, req.heal.max_chunks)
    work = req.work_dir or req.out.with_name(req.out.name + ".d2m")
    torch.manual_seed(req.seed)
    summary: dict = {"source": str(req.hf_dir), "output": str(req.out)}
    teacher = upcycle(spec, ckpt, identity_plan(spec.n_layer))

    if plan is None:
        work.mkdir(parents=True, exist_ok=True)
        if req.scores is not None:
            scores = LayerScores.load(req.scores)
        else:
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
    # the exact size is known now: fail before healing, not after it
    check_output_path(req.out, need_bytes=sum(t.nbytes for t in hybrid_tensors(model, req.outtype)))
    work.mkdir(parents=True, exist_ok=True)
    healing = None
    if req.heal.enabled:
        settings = req.heal.seeded(req.seed)
        local = block_local_config(settings, plan)   # what block-local healing runs with, for heal.json
        healed = heal(model, teacher, plan, spec, chunks, settings, work, progress=req.progress)
        model, plan, logs = healed.model, healed.plan, healed.logs
        healing = {"minutes": req.heal.minutes, "tokens_budget": req.heal.tokens,
                   "block_local_fraction": req.heal.block_local_fraction, "freeze_guests": req.heal.freeze_guests,
                   "host_first": req.heal.host_first,
                   "stages": [{"stage": s.stage, "tokens": s.tokens, "seconds": round(s.seconds, 1),
                               "final": s.rows[-1] if s.rows else {}} for s in logs],
                   "calibration_tokens": int(chunks.numel()),
                   "settings": {"block_local": asdict(local), "e2e": asdict(settings.e2e)}}
        if healed.usage_after_router_fit:
            healing["expert_usage_after_router_fit"] = _rounded(healed.usage_after_router_fit)
        before = plan
        model, plan, usage = _drop_idle(model, plan, spec, chunks, req.heal.min_expert_share)
        healing["expert_usage"] = _rounded(usage)
        if plan is not before:
            log.info("experts picked for under %.2g of the calibration tokens dropped (block: source layers): %s; "
                     "now %s", req.heal.min_expert_share, plan.notes["idle_experts_dropped"],
                     json.dumps(plan_summary(plan)["kinds"]))
        if "idle_experts_dropped" in plan.notes:
            healing["idle_experts_dropped"] = plan.notes["idle_experts_dropped"]
        summary["plan"] = plan_summary(plan)
        (work / "heal.json").write_text(json.dumps(healing, indent=1) + "\n", encoding="utf-8")
    elif plan.router_init == "fit" and any(b.moe for b in plan.blocks):
        log.warning("router_init 'fit' without healing: routers keep their host initialisation (the pruned model)")
    summary["healing"] = healing

    if req.save_hf:
        from .hf_export import save_hf_checkpoint
        save_hf_checkpoint(model, plan, spec, req.hf_dir, req.save_hf)
    # wall-clock times stay in heal.json: the GGUF holds only what the same inputs and seed reproduce
    export_hybrid(model, plan, spec, req.hf_dir, req.out, req.outtype, pre_tokenizer=req.pre_tokenizer,
                  healing=_without_timings(healing), progress=req.progress)
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    return summary


def _without_timings(value):
    """`value` (JSON-like) without its wall-clock fields ("seconds"), which differ from run to run."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def export_student(req: ConvertRequest, spec: DenseSpec) -> dict:
    """Write an upcycled HF-style checkpoint (from --save-hf, or healed by `d2m heal`) as a dense2moe GGUF."""
    from .hf_export import load_hf_checkpoint, load_hf_plan

    model, plan = load_hf_checkpoint(req.student), load_hf_plan(req.student, spec.n_layer)
    export_hybrid(model, plan, spec, req.hf_dir, req.out, req.outtype, pre_tokenizer=req.pre_tokenizer,
                  progress=req.progress)
    return {"source": str(req.hf_dir), "student": str(req.student), "output": str(req.out),
            "plan": plan_summary(plan)}


@dataclass
class HealRequest:
    """`d2m heal`: end-to-end distillation of an upcycled HF-style checkpoint against its dense source."""

    student: Path                       # from `d2m convert --save-hf` (or an earlier `d2m heal`)
    teacher: Path                       # the dense HF checkpoint it was made from
    out: Path                           # the healed checkpoint (same format), checkpoint.pt, heal.csv/png
    budget: Budget = field(default_factory=lambda: Budget(minutes=10.0))
    text: Path | None = None
    ctx: int = 256
    e2e: E2EConfig = field(default_factory=E2EConfig)
    freeze_guests: bool = True          # guests keep the weights the student has (heal.frozen_guests)
    progress: bool = True


def heal_checkpoint(req: HealRequest) -> StageLog | None:
    """Run end-to-end distillation; under `torchrun` every rank trains (DDP), and rank 0 writes and gets the
    stage's log (the other ranks get None).

    Resumes from OUT/checkpoint.pt when it exists (an interrupted or extended run)."""
    import os

    import torch.distributed as dist

    from .hf_export import load_hf_checkpoint, load_hf_plan, save_hf_checkpoint

    spec = load_dense_spec(req.teacher)
    ckpt = Checkpoint(req.teacher)
    ckpt.check(spec)
    student = load_hf_checkpoint(req.student)
    plan = load_hf_plan(req.student, spec.n_layer)
    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    teacher = upcycle(spec, ckpt, identity_plan(spec.n_layer)).to(device)
    student = student.to(device)
    req.out.mkdir(parents=True, exist_ok=True)
    chunks = calibration(req.teacher, req.text, req.ctx, None)
    with frozen_guests(student, plan, req.freeze_guests):
        stage = distill_e2e(student, teacher, chunks, req.budget, req.e2e, checkpoint=req.out / "checkpoint.pt",
                            progress=req.progress)
    if rank == 0:
        save_hf_checkpoint(student.cpu(), plan, spec, req.teacher, req.out)
        write_heal_logs([stage], req.out)
    if dist.is_initialized():
        dist.barrier()
    if own_group:
        dist.destroy_process_group()
    return stage if rank == 0 else None


__all__ = ["HealRequest", "heal_checkpoint", "ConvertRequest", "HealSettings", "run", "heal", "calibration", "expert_usage", "D2MError", "DenseSpec"]
