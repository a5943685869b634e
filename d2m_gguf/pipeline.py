"""`convert.py HF_DIR OUT.gguf`: the job, one named stage after another, each with a reusable artefact.

    check_inputs -> calibration text -> plan (analyse + choose, or --plan) -> upcycle -> heal -> write

Artefacts go to a work directory beside the output (OUT.d2m/ by default): scores.json + scores.png (analysis),
plan.json, heal.csv + heal.png + heal.json (healing), summary.json. Pass --scores / --plan to reuse earlier
ones. `d2m distill` (end-to-end distillation of a saved checkpoint, resumable, under torchrun too) is
`distill_checkpoint`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .analysis import ANALYSIS_SEQUENCES, LayerScores, analyze, plot_scores
from .atomic import check_output_path
from .checkpoint import Checkpoint
from .costmodel import get_device
from .data import DEFAULT_CALIBRATION, Tokenizer, read_text, token_chunks
from .distill import Budget, E2EConfig, StageLog, frozen_guests
from .ggufout import OutType
from .heal import HealSettings, Healed, block_local_config, check_memory, heal, write_heal_logs
from .hf_export import load_hf_checkpoint, load_hf_plan, load_hf_weights, save_hf_checkpoint, written_by_d2m
from .hybrid_export import hybrid_tensors
from .options import setting
from .plan import FusionPlan, identity_plan, load_plan, plan_summary
from .planner import PlanRequest, choose_plan
from .spec import DenseSpec, load_dense_spec
from .stock_export import ArchChoice, GgufArch, check_arch_reachable, choose_arch, export_model
from .upcycle import plan_weights, upcycle
from .vocab import check_tokenizer
from .weights import Weights

log = logging.getLogger("d2m")


def calibration(hf_dir: Path, text: Path | None, ctx: int, max_chunks: int | None) -> torch.Tensor:
    """The calibration text (`text`, default the shipped one) as token sequences of `ctx`."""
    tok = Tokenizer(hf_dir)
    source = text or DEFAULT_CALIBRATION
    return token_chunks(tok.encode(read_text(source)), ctx, max_chunks, tok.bos, where=f"{source} (--ctx {ctx})")


@dataclass
class ConvertRequest:
    hf_dir: Path
    out: Path
    outtype: OutType = OutType.F16
    plan: Path | None = None
    scores: Path | None = None
    request: PlanRequest = field(default_factory=PlanRequest)
    device: str = setting("host", "Device profile of the predictions (host: measured by a bandwidth probe; "
                          "phone-i8mm, phone-dotprod, rpi5, ...: d2m_gguf/data/devices.json).")
    text: Path | None = None
    healing: HealSettings = field(default_factory=HealSettings)
    work_dir: Path | None = None
    save_hf: Path | None = None
    pre_tokenizer: str | None = None
    router_init: str | None = setting(None, "Override the plan's router initialisation (fit: the host's MLP, "
                                      "then fitted while healing; host; random).", choices=("fit", "host", "random"))
    gguf_arch: GgufArch = setting(GgufArch.AUTO, "GGUF architecture: auto (a stock llama.cpp one where it is "
                                  "exact: standard, then deci; else dense2moe), standard (the source's, or refuse), "
                                  "deci, or dense2moe (the patched llama.cpp's).")
    seed: int = 0
    progress: bool = True
    student: Path | None = None         # an upcycled (e.g. `d2m distill`ed) HF-style checkpoint: write it, no planning

    @property
    def work(self) -> Path:
        return self.work_dir or self.out.with_name(self.out.name + ".d2m")


@dataclass
class Inputs:
    """Everything the job reads, checked before any work and before anything is written."""

    spec: DenseSpec
    ckpt: Checkpoint
    plan: FusionPlan | None             # given with --plan; None: planned from scores
    healing: HealSettings               # the request's, off for a plan that changes nothing


@dataclass
class Planned:
    plan: FusionPlan
    predicted: dict | None = None       # the roofline prediction of a plan chosen here


def run(req: ConvertRequest) -> dict:
    """The whole job. Returns a summary (also written as OUT.d2m/summary.json)."""
    if req.student is None and req.plan is None and req.scores is None and written_by_d2m(req.hf_dir):
        log.info("%s was written by d2m (it carries its fusion plan): writing it as it is", req.hf_dir)
        req = replace(req, student=req.hf_dir)
    if req.student is not None:
        return export_student(req, load_dense_spec(req.hf_dir))
    inputs = check_inputs(req)
    chunks = None
    if (inputs.plan is None and req.scores is None) or inputs.healing.enabled:
        chunks = calibration(req.hf_dir, req.text, inputs.healing.ctx, inputs.healing.max_chunks)
    torch.manual_seed(req.seed)
    teacher = plan_weights(inputs.spec, inputs.ckpt, identity_plan(inputs.spec.n_layer))   # read as needed
    planned = plan_stage(req, inputs, teacher, chunks)
    weights = plan_weights(inputs.spec, inputs.ckpt, planned.plan, seed=req.seed)
    # the exact size is known now: fail before healing, not after it
    check_output_path(req.out, need_bytes=sum(t.nbytes for t in hybrid_tensors(weights, req.outtype)))
    req.work.mkdir(parents=True, exist_ok=True)
    healed, healing = heal_stage(req, inputs, weights, teacher, planned.plan, chunks)
    summary: dict = {"source": str(req.hf_dir), "output": str(req.out)}
    if planned.predicted is not None:
        summary["predicted"] = planned.predicted
    summary["plan"] = plan_summary(healed.plan)
    summary["healing"] = healing
    written = healed.model if isinstance(healed.model, Weights) else Weights.of_model(healed.model, weights)
    summary["gguf"] = write_stage(req, inputs.spec, written, healed.plan, healing).record()
    (req.work / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    return summary


def check_inputs(req: ConvertRequest) -> Inputs:
    """The checkpoint, its tokenizer, the output path and the plan, before any work."""
    spec = load_dense_spec(req.hf_dir)
    ckpt = Checkpoint(req.hf_dir)
    ckpt.check(spec)
    check_tokenizer(req.hf_dir, spec.vocab_size)
    check_output_path(req.out)
    plan, healing = None, req.healing
    if req.plan is not None:
        plan = load_plan(req.plan, spec.n_layer, spec.n_ff)
        if plan.changes_nothing() and healing.enabled:
            log.info("the plan changes nothing (the dense model in the dense2moe format): no healing")
            healing = healing.disabled()
    return Inputs(spec, ckpt, plan, healing)


def plan_stage(req: ConvertRequest, inputs: Inputs, teacher: Weights, chunks: torch.Tensor | None) -> Planned:
    """The given plan, or one chosen from the layer scores (`--scores`, or analysed now) for the request's
    target; either way with the request's router initialisation, saved as plan.json."""
    planned = Planned(inputs.plan) if inputs.plan is not None else _choose(req, inputs.spec, teacher, chunks)
    if req.router_init:
        planned.plan = planned.plan.with_router_init(req.router_init)
    check_arch_reachable(planned.plan, inputs.spec, req.gguf_arch, inputs.healing.enabled)
    return planned


def _choose(req: ConvertRequest, spec: DenseSpec, teacher: Weights, chunks: torch.Tensor | None) -> Planned:
    req.work.mkdir(parents=True, exist_ok=True)
    if req.scores is not None:
        scores = LayerScores.load(req.scores)
    else:
        scores = analyze(teacher, chunks[:ANALYSIS_SEQUENCES], progress=req.progress, source=req.hf_dir.name)
        scores.save(req.work / "scores.json")
        plot_scores(scores, req.work / "scores.png")
    device = get_device(req.device)
    choice = choose_plan(spec, scores, req.request, device)
    choice.plan.save(req.work / "plan.json")
    log.info("plan: %s fuse=%d %s; predicted x%.2f on %s at depth %d (%s)", choice.plan.method, choice.fuse,
             json.dumps(plan_summary(choice.plan)), choice.predicted_speedup, device.name, req.request.depth,
             choice.bound())
    return Planned(choice.plan, {"device": device.name, "depth": req.request.depth,
                                 "dense_mb_per_token": round(choice.dense_bytes / 1e6, 2),
                                 "plan_mb_per_token": round(choice.plan_bytes / 1e6, 2),
                                 "speedup": round(choice.predicted_speedup, 3),
                                 "lm_head_share": round(choice.head_share, 3),
                                 "speedup_ceiling": round(choice.ceiling, 3)})


def heal_stage(req: ConvertRequest, inputs: Inputs, weights: Weights, teacher: Weights, plan: FusionPlan,
               chunks: torch.Tensor | None) -> tuple[Healed, dict | None]:
    """Healing (heal.py) within the request's budget, and its record (heal.json, and the GGUF's metadata).

    Without healing nothing is loaded: the writer reads `weights` one tensor at a time. With it, the memory
    healing needs is checked first (heal.check_memory: one clear line, exit 2, when it will not fit); without
    an end-to-end stage only the trained blocks are loaded."""
    if not inputs.healing.enabled:
        if plan.router_init == "fit" and any(b.moe for b in plan.blocks):
            log.warning("router_init 'fit' without healing: routers keep their host initialisation (the pruned model)")
        return Healed(weights, plan), None
    settings = inputs.healing.seeded(req.seed)
    need = check_memory(weights, teacher, plan, settings)
    log.info("healing needs about %.1f GB of memory (%s)", need.total / 1e9, need.describe())
    model = weights.materialize(need.loaded_blocks)
    healed = heal(model, teacher, plan, inputs.spec, chunks, settings, req.work, progress=req.progress,
                  fallback=weights)
    healing = {"minutes": settings.minutes, "tokens_budget": settings.tokens,
               "block_local_fraction": settings.block_local_fraction, "freeze_guests": settings.freeze_guests,
               "host_first": settings.host_first,
               "stages": [{"stage": s.stage, "tokens": s.tokens, "seconds": round(s.seconds, 1),
                           "final": s.rows[-1] if s.rows else {}} for s in healed.logs],
               "calibration_tokens": int(chunks.numel()),
               "settings": {"block_local": asdict(block_local_config(settings, plan)), "e2e": asdict(settings.e2e)}}
    if healed.usage_after_router_fit:
        healing["expert_usage_after_router_fit"] = _rounded(healed.usage_after_router_fit)
    healing["expert_usage"] = _rounded(healed.usage)
    if "idle_experts_dropped" in healed.plan.notes:
        healing["idle_experts_dropped"] = healed.plan.notes["idle_experts_dropped"]
    (req.work / "heal.json").write_text(json.dumps(healing, indent=1) + "\n", encoding="utf-8")
    return healed, healing


def _rounded(usage: dict[int, list[float]]) -> dict[str, list[float]]:
    return {str(j): [round(u, 3) for u in v] for j, v in usage.items()}


def write_stage(req: ConvertRequest, spec: DenseSpec, weights: Weights, plan: FusionPlan,
                healing: dict | None) -> ArchChoice:
    """The GGUF, in the architecture `--gguf-arch` allows (stock_export.choose_arch), and with --save-hf the
    HF-style checkpoint, both written one tensor at a time. Wall-clock times stay in heal.json: the GGUF holds
    only what the same inputs and seed reproduce."""
    choice = choose_arch(weights.cfg, spec, req.gguf_arch)   # a refusal leaves nothing written, --save-hf too
    if req.save_hf:
        save_hf_checkpoint(weights, plan, spec, req.hf_dir, req.save_hf)
    return export_model(weights, plan, spec, req.hf_dir, req.out, req.outtype, req.gguf_arch,
                        pre_tokenizer=req.pre_tokenizer, healing=_without_timings(healing), progress=req.progress,
                        choice=choice)


def _without_timings(value):
    """`value` (JSON-like) without its wall-clock fields ("seconds"), which differ from run to run."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def export_student(req: ConvertRequest, spec: DenseSpec) -> dict:
    """Write an upcycled HF-style checkpoint (from --save-hf, or `d2m distill`) as a GGUF."""
    source_depth = None if req.student == req.hf_dir else spec.n_layer    # HF_DIR is the result itself
    model, plan = load_hf_weights(req.student), load_hf_plan(req.student, source_depth)
    choice = export_model(model, plan, spec, req.hf_dir, req.out, req.outtype, req.gguf_arch,
                          pre_tokenizer=req.pre_tokenizer, progress=req.progress)
    return {"source": str(req.hf_dir), "student": str(req.student), "output": str(req.out),
            "plan": plan_summary(plan), "gguf": choice.record()}


CHECKPOINTS = "checkpoints"   # `d2m distill`'s Trainer checkpoints, under OUT


@dataclass
class DistillRequest:
    """`d2m distill`: end-to-end distillation of an upcycled HF-style checkpoint against its dense source."""

    student: Path                       # from `d2m convert --save-hf` (or an earlier `d2m distill`)
    teacher: Path                       # the dense HF checkpoint it was made from
    out: Path                           # the distilled checkpoint (same format), checkpoints/, heal.csv/png
    minutes: float | None = setting(10.0, "Budget in minutes (0: none).")
    tokens: int | None = setting(None, "Budget in training tokens (whichever ends first).")
    text: Path | None = None
    ctx: int = HealSettings.ctx
    e2e: E2EConfig = field(default_factory=E2EConfig)
    freeze_guests: bool = setting(True, "Keep the guest experts (removed layers' MLPs) as they are in STUDENT, as "
                                  "convert does.", flag="--freeze-guests/--train-guests")
    lora: int = setting(0, "Train LoRA adapters of this rank on the attention and dense MLP projections instead of "
                        "the weights, merged into OUT at the end (0: train the weights).", bounds=(0, None))
    trainer_args: dict = field(default_factory=dict)   # further transformers TrainingArguments (--trainer-arg)
    progress: bool = True

    @property
    def budget(self) -> Budget:
        return Budget(tokens=self.tokens, minutes=self.minutes or None)


def distill_checkpoint(req: DistillRequest) -> StageLog | None:
    """Run end-to-end distillation on transformers' Trainer (trainer.py); under torchrun or `accelerate launch`
    every rank trains, and rank 0 writes and gets the stage's log (the other ranks get None).

    Trainer checkpoints go to OUT/checkpoints; the last one is resumed from (an interrupted or extended run)."""
    import os

    import torch.distributed as dist

    from .trainer import distill_e2e   # transformers' Trainer: seconds to import, only when it runs

    spec = load_dense_spec(req.teacher)
    ckpt = Checkpoint(req.teacher)
    ckpt.check(spec)
    student = load_hf_checkpoint(req.student)
    plan = load_hf_plan(req.student, spec.n_layer)
    teacher = upcycle(spec, ckpt, identity_plan(spec.n_layer))
    req.out.mkdir(parents=True, exist_ok=True)
    chunks = calibration(req.teacher, req.text, req.ctx, None)
    with frozen_guests(student, plan, req.freeze_guests):
        stage = distill_e2e(student, teacher, chunks, req.budget, req.e2e, checkpoint_dir=req.out / CHECKPOINTS,
                            progress=req.progress, lora_rank=req.lora, trainer_args=req.trainer_args)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        save_hf_checkpoint(student.cpu(), plan, spec, req.teacher, req.out)
        write_heal_logs([stage], req.out)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return stage if rank == 0 else None
