"""The healing stage: what an upcycled model trains, in which order, within one budget.

Healing is a schedule of steps over the training of distill.py. Host first (the default) heals every block with
its tokens on the host, as the pruned model's block would be healed, then lets the router fit admit a guest
only where that lowers the healed block's held-out error; route first fits the routers on the unhealed blocks
and trains them while the blocks heal. Each schedule lists its steps once (`HOST_FIRST`, `ROUTE_FIRST`); `heal` runs them.
Artefacts: heal.csv + heal.png (loss curves) in the work directory.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .distill import (BlockLocalConfig, Budget, E2EConfig, RouterFitConfig, StageLog, TeacherCache,
                      block_local_distill, fit_routers, frozen_guests, frozen_routers)
from .errors import D2MError
from .model import HybridModel
from .options import setting
from .plan import FusionPlan, block_spans, trained_blocks
from .spec import DenseSpec
from .upcycle import drop_idle_experts
from .weights import LayerStream, Weights, layer_of

log = logging.getLogger("d2m")


@dataclass
class HealSettings:
    """The healing budget and its split. A token budget drives the learning-rate schedule, so the result does not
    depend on the machine's speed; `minutes` is only a stop. A block-local token costs a fraction of an
    end-to-end one (only the fused blocks run, on cached teacher states), so most of the budget goes there."""

    tokens: int | None = setting(640_000, "Healing budget in tokens; it drives the schedule, so the result is "
                                 "reproducible.", flag="--heal-tokens")
    minutes: float | None = setting(None, "A time limit on healing (whichever ends first; alone, with 0 tokens: "
                                    "a time budget).", flag="--heal-minutes")
    block_local_fraction: float = setting(0.9375, "Share of the budget for block-local distillation; the rest is "
                                          "end-to-end.")
    ctx: int = setting(256, "Tokens per calibration sequence.")
    max_chunks: int | None = None       # calibration sequences used (None: the whole text)
    block_local_sequences: int = 512    # teacher activations cached for block-local distillation (ctx each)
    block_local: BlockLocalConfig = field(default_factory=BlockLocalConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)
    seed: int = 0                       # router fit (its held-out split and draws)
    freeze_guests: bool = setting(True, "lfuc: keep the guest experts (removed layers' MLPs) at their pretrained "
                                  "weights while the host, attention, norms and routers heal.",
                                  flag="--freeze-guests/--train-guests")
    min_expert_share: float = setting(0.001, "After healing, drop the experts a top-1 router picks for fewer than "
                                      "this share of the calibration tokens (the most used one stays); a routed "
                                      "block left with one expert is written dense (0 keeps every expert).",
                                      bounds=(0.0, 1.0))
    host_first: bool = setting(True, "lfuc: heal every routed block with all tokens on its host (the pruned "
                               "model's healing), then admit a guest only where the router fit lowers the healed "
                               "block's held-out error; --route-first fits the routers first and trains them "
                               "while the blocks heal.", flag="--host-first/--route-first")

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

    def disabled(self) -> "HealSettings":
        return replace(self, tokens=0, minutes=None)


# -- schedules ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """The steps of healing in order, and how block-local distillation treats the routers.

    Steps: `router-fit` (where the plan's routers are `fit`), `block-local` distillation (both on teacher
    activations cached once for the two), `drop-unrouted` (the experts the fitted routers leave idle, before
    end-to-end healing: a block whose guests the fit did not admit then heals as the pruned model's block),
    `end-to-end` distillation, `drop-idle` (the same rule on the healed model, before it is written)."""

    name: str
    steps: tuple[str, ...]
    routers_frozen: bool               # block-local: every token on the host, no router or balance term


HOST_FIRST = Schedule("host-first", ("block-local", "router-fit", "drop-unrouted", "end-to-end", "drop-idle"),
                      routers_frozen=True)
ROUTE_FIRST = Schedule("route-first", ("router-fit", "block-local", "end-to-end", "drop-idle"), routers_frozen=False)
CACHED_STEPS = ("router-fit", "block-local")


def schedule_for(settings: HealSettings, plan: FusionPlan) -> Schedule:
    """Host first needs routers that start on the host (`host`, or `fit`, which starts there)."""
    return HOST_FIRST if settings.host_first and plan.router_init in ("host", "fit") else ROUTE_FIRST


def block_local_config(settings: HealSettings, plan: FusionPlan) -> BlockLocalConfig:
    """What block-local distillation runs with. Host first: every token on its host (routers frozen at the host
    initialisation), the pruned model's healing step for step, so no router or balance term."""
    if schedule_for(settings, plan).routers_frozen:
        return replace(settings.block_local, router_weight=0.0, balance_weight=0.0)
    return settings.block_local


@dataclass
class Healed:
    """What healing leaves: the model and its plan without its idle experts (a routed block left with one expert
    is dense), the steps' logs, and the expert usage each drop went by."""

    model: HybridModel | Weights        # Weights: nothing was healed (the plan's weights, read from disk)
    plan: FusionPlan
    logs: list[StageLog] = field(default_factory=list)
    usage_after_router_fit: dict[int, list[float]] = field(default_factory=dict)   # drop-unrouted's
    usage: dict[int, list[float]] = field(default_factory=dict)                    # drop-idle's


def heal(model: HybridModel, teacher: HybridModel | Weights, plan: FusionPlan, spec: DenseSpec,
         chunks: torch.Tensor, settings: HealSettings, work_dir: Path, progress: bool = True,
         fallback: Weights | None = None) -> Healed:
    """Run the steps of `schedule_for(settings, plan)` within the budget (block-local steps only where the plan
    has trained blocks and the budget a block-local share, end-to-end only where it has an end-to-end share).

    `model` may be partial (upcycle(..., blocks=trained_blocks(plan))): the blocks it never loaded read from
    `fallback` (the plan's weights), and the teacher may stay on disk (`Weights`): both are loaded whole only
    for end-to-end distillation, which needs them.
    Always from the upcycled model, and without an end-to-end checkpoint: one left in `work_dir` by an
    earlier run (another plan or budget, same shapes) would be resumed over this run's block-local result.
    Resuming is `d2m distill`'s job."""
    schedule = schedule_for(settings, plan)
    healed = Healed(model, plan)
    torch.manual_seed(settings.block_local.seed)
    blocks = trained_blocks(plan)
    local = bool(blocks) and settings.block_local_fraction > 0
    if local:
        with frozen_guests(model, plan, settings.freeze_guests):
            healed.logs += _cached_steps(model, teacher, plan, chunks, settings, schedule, blocks, work_dir, progress)
    for step in schedule.steps:
        if step == "drop-unrouted" and local:
            healed.model, healed.plan, healed.usage_after_router_fit = drop_idle(
                healed.model, healed.plan, spec, chunks, settings.min_expert_share, fallback)
            if "idle_experts_dropped" in healed.plan.notes:
                log.info("before end-to-end healing, unrouted experts dropped (block: source layers): %s",
                         healed.plan.notes["idle_experts_dropped"])
        elif step == "end-to-end" and settings.block_local_fraction < 1:
            from .trainer import distill_e2e   # transformers' Trainer: seconds to import, only when it runs
            healed.model = whole(healed.model, fallback)
            with frozen_guests(healed.model, healed.plan, settings.freeze_guests):
                healed.logs.append(distill_e2e(healed.model, whole(teacher), chunks,
                                               settings.stage_budget(1 - settings.block_local_fraction),
                                               settings.e2e, checkpoint_dir=None, progress=progress))
        elif step == "drop-idle":
            before = healed.plan
            healed.model, healed.plan, healed.usage = drop_idle(healed.model, healed.plan, spec, chunks,
                                                                settings.min_expert_share, fallback)
            if healed.plan is not before:
                log.info("experts picked for under %.2g of the calibration tokens dropped (block: source layers): "
                         "%s", settings.min_expert_share, healed.plan.notes["idle_experts_dropped"])
    write_heal_logs(healed.logs, work_dir)
    return healed


def whole(model: HybridModel | Weights, fallback: Weights | None = None) -> HybridModel:
    """`model` with every tensor in memory (a partial model's missing blocks loaded from `fallback`)."""
    if isinstance(model, HybridModel) and not any(p.is_meta for p in model.parameters()):
        return model
    weights = model if isinstance(model, Weights) else Weights.of_model(model, fallback)
    out = weights.materialize()
    return out.train(model.training) if isinstance(model, HybridModel) else out


def _cached_steps(model: HybridModel, teacher: HybridModel | Weights, plan: FusionPlan, chunks: torch.Tensor,
                  settings: HealSettings, schedule: Schedule, blocks: list[int], work_dir: Path,
                  progress: bool) -> list[StageLog]:
    """The schedule's steps on cached teacher activations (router fit, block-local distillation), in its order."""
    spans = block_spans(plan)
    boundaries = {spans[j][0] for j in blocks} | {spans[j][1] for j in blocks}
    t = time.monotonic()
    cached = spread_subset(chunks, settings.cached_sequences())
    cache = TeacherCache(teacher, cached, boundaries, cache_dir=work_dir, progress=progress)
    log.info("teacher activations: %d sequences x %d tokens at %d boundaries (%.0f s)",
             cached.shape[0], cached.shape[1], len(boundaries), time.monotonic() - t)
    logs: list[StageLog] = []
    try:
        for step in (s for s in schedule.steps if s in CACHED_STEPS):
            if step == "router-fit" and plan.router_init == "fit":
                logs.append(_fit_routers(model, plan, cache, settings.seed))
            elif step == "block-local":
                with frozen_routers(model, schedule.routers_frozen):
                    logs.append(block_local_distill(model, plan, cache,
                                                    settings.stage_budget(settings.block_local_fraction),
                                                    block_local_config(settings, plan), progress=progress))
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


def spread_subset(chunks: torch.Tensor, n: int) -> torch.Tensor:
    """All of `chunks` when there are at most `n`, else `n` of them evenly spaced over the whole text: block-local
    distillation caches that many, and the head of a large healing text (`--text`, `d2m synth`) is not a sample
    of it."""
    if len(chunks) <= n:
        return chunks
    return chunks[torch.linspace(0, len(chunks) - 1, n).round().long()]


# -- memory -----------------------------------------------------------------------------------------------

RUNTIME_BYTES = 600_000_000    # Python, torch and transformers themselves (0.24-0.35 GB measured here) and slack


@dataclass
class MemoryNeed:
    """What healing will hold in memory at its peak, by part (bytes), and which student blocks it loads
    (None: all of them, for end-to-end distillation)."""

    parts: dict[str, int]
    loaded_blocks: list[int] | None

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {value / 1e9:.1f}" for name, value in self.parts.items() if value >= 5e7)


def memory_need(weights: Weights, teacher: Weights, plan: FusionPlan, settings: HealSettings) -> MemoryNeed:
    """An upper estimate of healing's peak memory. Block-local distillation holds the trained blocks, one
    block's gradients and AdamW state, the teacher's residual stream over the cached sequences and one teacher
    layer; end-to-end distillation holds teacher and student whole, the student's gradients and AdamW state,
    and a batch's activations and logits."""
    cfg = weights.cfg
    layer_bytes = [0] * cfg.n_layer
    for key, shape in weights.shapes.items():
        if (j := layer_of(key)) is not None:
            layer_bytes[j] += 4 * math.prod(shape)
    teacher_layer = sum(4 * math.prod(s) for k, s in teacher.shapes.items() if layer_of(k) == 0)
    blocks = trained_blocks(plan) if settings.block_local_fraction > 0 else []
    end_to_end = settings.block_local_fraction < 1
    widest = max(b.n_ff * max(b.n_expert_used, 1) for b in cfg.blocks)
    # bytes per token of one block's saved activations (attention scores, MLP and residual tensors), and of the
    # logits' (teacher, student, softmax, gradient): upper bounds of SmolLM2-135M's measured 5.1 GB peak (6.9)
    per_token = 4 * (12 * cfg.n_embd + 2 * cfg.n_head * settings.ctx + 4 * widest)
    parts: dict[str, int] = {}
    if end_to_end:
        tokens = settings.e2e.batch * settings.ctx
        parts["student"] = 4 * weights.n_params()
        parts["teacher"] = 4 * teacher.n_params()
        parts["end-to-end gradients + AdamW"] = 12 * weights.n_params()
        parts["end-to-end activations"] = tokens * (cfg.n_layer * per_token + 24 * cfg.vocab_size)
    else:
        parts["student (trained blocks)"] = sum(layer_bytes[j] for j in blocks)
    if blocks:
        parts["block-local gradients + AdamW"] = 3 * max(layer_bytes[j] for j in blocks)
        parts["block-local activations"] = settings.block_local.batch * settings.ctx * per_token
        parts["teacher stream"] = (settings.cached_sequences() * settings.ctx * cfg.n_embd * 4 + teacher_layer
                                   + 4 * cfg.vocab_size * cfg.n_embd)
    parts["runtime"] = RUNTIME_BYTES
    return MemoryNeed(parts, None if end_to_end else blocks)


def available_memory() -> int:
    """Bytes this process can still allocate without swapping (the OS's estimate)."""
    import psutil
    return int(psutil.virtual_memory().available)


MEMORY_HEADROOM = 0.9   # of the available memory healing may plan to use: the estimate came within 2% of measured
                        # block-local peaks (Llama-3.2-3B shape: 10.6 GB estimated, 10.4 measured); the rest is for
                        # the OS and the page cache the checkpoint reads go through


def check_memory(weights: Weights, teacher: Weights, plan: FusionPlan, settings: HealSettings) -> MemoryNeed:
    """`memory_need`, or one clear D2MError (exit 2) before any work when it exceeds the available memory
    (less MEMORY_HEADROOM)."""
    need, have = memory_need(weights, teacher, plan, settings), available_memory()
    if need.total > MEMORY_HEADROOM * have:
        if need.loaded_blocks is None:
            instead = ("heal block-local only with --block-local-fraction 1 (the trained blocks in memory, not the "
                       "model)")
        else:
            instead = (f"fuse fewer layers (--fuse: the largest healed block alone needs "
                       f"{need.parts.get('block-local gradients + AdamW', 0) / 1e9:.1f} GB of gradients and AdamW state)")
        raise D2MError(f"healing needs about {need.total / 1e9:.1f} GB of memory ({need.describe()} GB), "
                       f"{have / 1e9:.1f} GB are available: {instead}, write the unhealed model with --no-heal, "
                       f"or heal where the memory is (`--save-hf`, then `d2m distill` on a GPU machine)")
    return need


# -- idle experts ------------------------------------------------------------------------------------------

@torch.no_grad()
def expert_usage(model: HybridModel, chunks: torch.Tensor, batch: int = 4,
                 fallback: Weights | None = None) -> dict[int, list[float]]:
    """Share of routed slots per expert, per MoE block, on `chunks`; layer by layer (weights.LayerStream), the
    blocks of a partial model that were never loaded read from `fallback`."""
    from .model import MoEFFN

    stream = LayerStream(Weights.of_model(model, fallback))
    pos = stream.positions(chunks.shape[1])
    xs = stream.embed_batches(chunks, batch)
    counts: dict[int, torch.Tensor] = {}
    for j, block in stream.blocks():
        for k, x in enumerate(xs):
            xs[k] = block(x, pos)
            if isinstance(block.mlp, MoEFFN):
                n = block.mlp.experts.gate_proj.shape[0]
                sel = block.mlp.last_selection
                counts[j] = counts.get(j, torch.zeros(n)) + torch.bincount(sel.flatten(), minlength=n)
    return {j: (c / c.sum()).tolist() for j, c in counts.items()}


def drop_idle(model: HybridModel, plan: FusionPlan, spec: DenseSpec, chunks: torch.Tensor, min_share: float,
              fallback: Weights | None = None) -> tuple[HybridModel, FusionPlan, dict[int, list[float]]]:
    """The expert usage on (up to) 16 calibration sequences, and the model and plan without the experts used
    less than `min_share` (upcycle.drop_idle_experts)."""
    usage = expert_usage(model, chunks[:16], fallback=fallback)
    model, plan = drop_idle_experts(model, plan, spec, usage, min_share)
    return model, plan, usage


# -- logs --------------------------------------------------------------------------------------------------

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
