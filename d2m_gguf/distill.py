"""The training healing is made of: router fit, block-local distillation on cached teacher activations,
end-to-end distillation. What runs in which order is the healing stage's (heal.py).

Every trained block j of a plan replaces a contiguous span of source layers
[start_j, end_j). Its teacher is the dense model's residual stream: input at
boundary start_j, target at boundary end_j. Those states are computed once per
calibration chunk and kept in float16 memory maps (only the boundaries that some
trained block needs), so memory stays bounded however many tokens are used.

Routers learn which experts to pick from an oracle: for a token with FFN target
r (what the replaced layers add to the stream), expert e's contribution c_e
scores 2<c_e, r> - |c_e|^2, the error it removes on its own; the router is
trained towards softmax(score / temperature). A top-k router thereby learns to
select the experts that best reconstruct what the fused layers computed.
Host first (heal.py's default schedule) the routers stay frozen on the host while
the blocks heal (`frozen_routers`) and are fitted on the healed blocks after.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import D2MError
from .options import setting
from .model import Block, HybridModel, MoEFFN, Positions
from .plan import FusionPlan, block_spans, trained_blocks
from .weights import LayerStream, Weights


# -- training precision ----------------------------------------------------------------------

def default_precision() -> str:
    """`bf16` where the hardware multiplies bf16 natively (CUDA, or a CPU with AVX512-BF16 / AMX): matmuls then
    run about twice as fast on CPU while weights, optimiser state and losses stay float32; `fp32` elsewhere,
    where emulated bf16 would be slower than float32."""
    if torch.cuda.is_available():
        return "bf16"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "fp32"
    return "bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else "fp32"


PRECISIONS = ("auto", "bf16", "fp32")   # what a --precision option offers


def resolve_precision(choice: str) -> str:
    """A `--precision` choice as a training precision: `auto` is `default_precision()`."""
    return default_precision() if choice == "auto" else choice


def autocast(model: torch.nn.Module, precision: str):
    """The autocast context of a training forward pass (`precision`: bf16 or fp32)."""
    if precision not in ("bf16", "fp32"):
        raise D2MError(f"unknown training precision {precision!r} (bf16 or fp32)")
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextmanager
def frozen_guests(model: HybridModel, plan: FusionPlan, enabled: bool = True):
    """Inside the `with`, every guest expert (the experts cut from a block's non-host source MLPs) keeps its
    weights while healing trains the rest: their gradients are zeroed, so AdamW without weight decay leaves
    them bit for bit. `enabled=False` changes nothing."""
    moe_blocks = [(block.mlp, b) for block, b in zip(model.layers, plan.blocks)
                  if enabled and isinstance(block.mlp, MoEFFN) and len(b.mlp) > 1]
    handles = []
    for moe, b in moe_blocks:
        mask = torch.ones(moe.experts.gate_proj.shape[0], 1, 1)
        mask[b.split:] = 0.0    # experts [0, split) are the host's (upcycle stacks the host first)
        for p in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
            handles.append(p.register_hook(lambda grad, mask=mask: grad * mask))
        if hasattr(moe.experts, "post_norm"):     # a Gemma-style guest keeps its output norm too
            handles.append(moe.experts.post_norm.register_hook(lambda grad, mask=mask[:, 0]: grad * mask))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def frozen_routers(model: HybridModel, enabled: bool = True):
    """Inside the `with`, every router keeps its weights (no gradient). From the `host` initialisation every
    token then takes its block's host, so a routed block heals exactly as the pruned model's dense block does
    (`HealSettings.host_first`). `enabled=False` changes nothing."""
    routers = [m.router for m in model.modules() if enabled and isinstance(m, MoEFFN)]
    params = [(p, p.requires_grad) for r in routers for p in r.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, was in params:
            p.requires_grad_(was)


# -- teacher activations -----------------------------------------------------------------------

# float16 holds a residual stream up to 65504; Gemma 3's grows past 1e5 in its middle layers
_FLOAT16_SAFE = float(np.finfo(np.float16).max) / 2


class TeacherCache:
    """Residual stream of the dense teacher at chosen layer boundaries, memmaps [N, T, D]: float16, or float32 at
    a boundary where the stream is too large for float16 (Gemma 3's, whose values pass 1e5 in float16 would be
    inf: block-local healing would fit infinite targets).

    Computed layer by layer (weights.LayerStream): every cached sequence passes one block before the next
    is loaded, so the teacher is never in memory whole; only the residual stream of the N sequences is
    (float32, N x T x D)."""

    def __init__(self, teacher: HybridModel | Weights, chunks: torch.Tensor, boundaries: set[int],
                 cache_dir: Path | None = None, batch: int = 8, progress: bool = True):
        self._tmp = tempfile.TemporaryDirectory(prefix="d2m-teacher-", dir=cache_dir)
        stream = LayerStream(teacher)
        n, t = chunks.shape
        self._shape = (n, t, stream.cfg.n_embd)
        self.boundaries = sorted(boundaries)
        self.maps: dict[int, np.ndarray] = {}
        last = max(self.boundaries)
        pos = stream.positions(t)
        with torch.no_grad():
            xs = stream.embed_batches(chunks, batch)
            self._store(0, xs, batch)
            for layer, block in tqdm(stream.blocks(upto=last), total=last, desc="teacher activations (layers)",
                                     disable=not progress, leave=False):
                xs = [block(x, pos) for x in xs]
                self._store(layer + 1, xs, batch)
        self.positions = pos

    def _store(self, boundary: int, xs: list[torch.Tensor], batch: int) -> None:
        if boundary not in self.boundaries:
            return
        fits = max(float(x.abs().max()) for x in xs) < _FLOAT16_SAFE
        self.maps[boundary] = np.lib.format.open_memmap(Path(self._tmp.name) / f"b{boundary}.npy", mode="w+",
                                                        dtype=np.float16 if fits else np.float32, shape=self._shape)
        for k, x in enumerate(xs):
            self.maps[boundary][k * batch:(k + 1) * batch] = x.numpy().astype(self.maps[boundary].dtype)

    def get(self, boundary: int, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.maps[boundary][np.sort(idx)].astype(np.float32))

    def close(self) -> None:
        self.maps.clear()
        self._tmp.cleanup()


# -- routers -----------------------------------------------------------------------------------

def expert_outputs(moe: MoEFFN, h: torch.Tensor) -> torch.Tensor:
    """Every expert's output for tokens h [N, D] -> [N, E, D] (training only: computes all of them)."""
    return moe.experts.every(h)


def oracle_router_target(outs: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """softmax over experts of the error each removes alone: 2<c_e, r> - |c_e|^2 with c_e = out_e / k."""
    c = outs / k
    score = 2 * torch.einsum("ned,nd->ne", c, target) - c.pow(2).sum(-1)
    scale = score.std(dim=-1, keepdim=True).clamp_min(1e-6)
    return torch.softmax(score / scale * 2.0, dim=-1)


def moe_train_forward(moe: MoEFFN, h: torch.Tensor, target: torch.Tensor | None, oracle_tokens: int = 256):
    """(output, router loss, load-balance loss) with the inference routing (top-k of softmax).

    The output runs only the selected experts, as inference does. The router's oracle
    target needs every expert's output, so it is computed (without gradient) on a random
    subset of `oracle_tokens` tokens: the cost of a block stays about one MLP's worth."""
    out = moe(h)
    balance = moe.last_balance if moe.last_balance is not None else torch.zeros(())
    router = torch.zeros(())
    if target is not None:
        rows = torch.randperm(h.shape[0])[:oracle_tokens]
        with torch.no_grad():
            q = oracle_router_target(expert_outputs(moe, h[rows]), target[rows], moe.n_expert_used)
        logp = torch.log_softmax(moe.router(h[rows]), dim=-1)
        router = (q * (torch.log(q.clamp_min(1e-9)) - logp)).sum(-1).mean()
    return out, router, balance


def token_errors(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|out - target|^2 / |target|^2 per token (over the last dimension)."""
    return (out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-6)


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of token_errors: every token counts alike, whatever the norm of its residual stream
    (the attention-sink tokens carry norms hundreds of times larger), which is what the next RMSNorm sees."""
    return token_errors(out, target).mean()


def block_train_forward(block: Block, x: torch.Tensor, x_out: torch.Tensor, pos: Positions,
                        router_target: bool = True):
    """(student output, router loss, balance loss) of one block on teacher input x; `router_target=False`
    skips the router's oracle target (every expert's output on a few tokens) when no router learns from it."""
    a = block.attention(x, pos)
    hres = x if a is None else x + a
    h = block.post_attention_layernorm(hres)
    if isinstance(block.mlp, MoEFFN):
        shape = h.shape
        target = (x_out - hres).reshape(-1, shape[-1]).detach() if router_target else None
        out, router, balance = moe_train_forward(block.mlp, h.reshape(-1, shape[-1]), target)
        return hres + out.reshape(shape), router, balance
    zero = torch.zeros(())
    return hres + block.mlp(h), zero, zero


@dataclass
class RouterFitConfig:
    tokens: int = 8192             # calibration tokens per block (a fifth is held out)
    steps: int = 300
    lr: float = 1e-2
    seed: int = 0


def _block_error(block: Block, hres: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> float:
    return relative_error(hres + block.mlp(h), y).item()


def oracle_top1(moe: MoEFFN, hres: torch.Tensor, h: torch.Tensor, y: torch.Tensor, split: int) -> tuple[float, float]:
    """(relative error, share of tokens sent to guests) of the best single expert for each token: what a
    perfect top-1 router would reach, the ceiling of any router fit (experts [0, split) are the host's)."""
    errs = torch.cat([token_errors(hres[i:i + 512, None] + expert_outputs(moe, h[i:i + 512]), y[i:i + 512, None])
                      for i in range(0, len(h), 512)])
    best, which = errs.min(-1)
    return best.mean().item(), (which >= split).float().mean().item()


def fit_routers(model: HybridModel, plan: FusionPlan, cache: TeacherCache,
                cfg: RouterFitConfig = RouterFitConfig()) -> dict[int, dict]:
    """Fit each MoE router by classification on the oracle target (which experts best rebuild the teacher's
    output at the end of the fused span), on cached teacher activations.

    The fitted router is kept only where it lowers the block's error on held-out tokens
    compared with the router it started from (`host` init: the pruned model), so fitting
    never makes a block worse than pruning its guests would. Returns per block the held-out
    errors before and after, whether the fit was kept, and (top-1) the error a perfect router would reach
    with the share of tokens it would send to guests."""
    spans = block_spans(plan)
    n, t = next(iter(cache.maps.values())).shape[:2]
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    report: dict[int, dict] = {}
    for j, block in enumerate(model.layers):
        if not isinstance(block.mlp, MoEFFN):
            continue
        moe = block.mlp
        s, e = spans[j]
        idx = rng.choice(n, size=min(n, max(2, -(-cfg.tokens // t))), replace=False)
        with torch.no_grad():
            x, y = cache.get(s, idx), cache.get(e, idx)
            a = block.attention(x, cache.positions)
            hres = x if a is None else x + a
            d = hres.shape[-1]
            hres, y = hres.reshape(-1, d), y.reshape(-1, d)
            h = block.post_attention_layernorm(hres)
            q = torch.cat([oracle_router_target(expert_outputs(moe, h[i:i + 512]), (y - hres)[i:i + 512],
                                                moe.n_expert_used) for i in range(0, len(h), 512)])
        held = len(h) // 5
        train, test = slice(held, None), slice(0, held)
        before_state = {k: v.clone() for k, v in moe.router.state_dict().items()}
        with torch.no_grad():
            before = _block_error(block, hres[test], h[test], y[test])
        opt = torch.optim.Adam(moe.router.parameters(), lr=cfg.lr)
        for _ in range(cfg.steps):
            logp = torch.log_softmax(moe.router(h[train]), dim=-1)
            loss = -(q[train] * logp).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = _block_error(block, hres[test], h[test], y[test])
        kept = after < before
        if not kept:
            moe.router.load_state_dict(before_state)
        report[j] = {"held_out_rel_err_before": round(before, 5), "held_out_rel_err_after": round(after, 5),
                     "kept": kept, "tokens": len(h)}
        if moe.n_expert_used == 1 and moe.normalize:
            with torch.no_grad():
                oracle, share = oracle_top1(moe, hres[test], h[test], y[test], plan.blocks[j].split)
            report[j].update(held_out_rel_err_oracle=round(oracle, 5), oracle_guest_share=round(share, 4))
    return report


# -- budgets and logs --------------------------------------------------------------------------

@dataclass
class Budget:
    """How much healing: stop at whichever comes first (None = unlimited)."""

    tokens: int | None = None
    minutes: float | None = None
    max_steps: int | None = None

    def done(self, tokens: int, seconds: float, steps: int) -> bool:
        return ((self.tokens is not None and tokens >= self.tokens)
                or (self.minutes is not None and seconds >= self.minutes * 60)
                or (self.max_steps is not None and steps >= self.max_steps))

    def fraction_spent(self, tokens: int, seconds: float, steps: int) -> float:
        """How much of the budget is spent, for the cosine learning-rate schedule.

        A token or step budget, when given, drives the schedule alone and the time budget is
        only a stop: the wall clock then never changes a weight, so the same inputs and seed
        heal to the same model (byte-identical GGUF) on any machine that finishes in time."""
        fractions = []
        if self.tokens:
            fractions.append(tokens / self.tokens)
        if self.max_steps:
            fractions.append(steps / self.max_steps)
        if self.minutes and not fractions:
            fractions.append(seconds / (self.minutes * 60))
        return max(fractions) if fractions else 0.0


@dataclass
class StageLog:
    stage: str
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    def add(self, **row) -> None:
        self.rows.append(row)


@dataclass
class BlockLocalConfig:
    lr: float = 3e-4
    batch: int = 4                 # sequences per step
    router_weight: float = 0.1
    balance_weight: float = 0.01
    weight_decay: float = 0.0
    log_every: int = 10
    seed: int = 0
    precision: str = field(default_factory=default_precision)


def block_local_distill(model: HybridModel, plan: FusionPlan, cache: TeacherCache, budget: Budget,
                        cfg: BlockLocalConfig = BlockLocalConfig(), progress: bool = True) -> StageLog:
    """Train each fused block to map the teacher's input at its span start to the teacher's output at its end.

    The blocks share nothing (each its own loss and parameters), so they train one after another, each with its
    own AdamW over the same draws of sequences and the same schedule: the updates one optimiser over all of
    them would make, with one block's gradients and optimiser state in memory at a time (the other blocks of
    a partial student need not be loaded at all). A time budget is split evenly between the blocks."""
    blocks = trained_blocks(plan)
    log = StageLog("block-local")
    if not blocks:
        return log
    share = Budget(tokens=budget.tokens, max_steps=budget.max_steps,
                   minutes=budget.minutes / len(blocks) if budget.minutes else None)
    rows: dict[int, dict] = {}
    started = time.monotonic()
    n, t = next(iter(cache.maps.values())).shape[:2]
    total = (budget.tokens or (budget.max_steps or 0) * min(cfg.batch, n) * t or 0) * len(blocks) or None
    bar = tqdm(total=total, unit="tok", desc="block-local distillation", disable=not progress, leave=False)
    model.train()
    for j in blocks:
        for row in _train_block(model.layers[j], block_spans(plan)[j], cache, share, cfg, seed=cfg.seed, bar=bar):
            merged = rows.setdefault(row["step"], {"step": row["step"], "tokens": row["tokens"], "lr": row["lr"],
                                                   "losses": []})
            merged["seconds"] = round(time.monotonic() - started, 2)
            merged["losses"].append(row["loss"])
            merged[f"rel_mse_{j}"] = row["rel"]
        log.tokens = max(log.tokens, rows[max(rows)]["tokens"] if rows else 0)
    bar.close()
    model.eval()
    for step in sorted(rows):
        row = rows[step]
        losses = row.pop("losses")
        log.add(**{k: row[k] for k in ("step", "tokens", "seconds", "lr")}, loss=sum(losses) / len(losses),
                **{k: v for k, v in row.items() if k.startswith("rel_mse_")})
    log.seconds = time.monotonic() - started
    return log


def _train_block(block: Block, span: tuple[int, int], cache: TeacherCache, budget: Budget, cfg: BlockLocalConfig,
                 seed: int, bar) -> list[dict]:
    """One block's block-local training; its logged steps (step, tokens, lr, loss, rel)."""
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, t = next(iter(cache.maps.values())).shape[:2]
    rng = np.random.default_rng(seed)          # every block draws the same sequences, as one joint loop did
    torch.manual_seed(seed)
    s, e = span
    rows: list[dict] = []
    started, steps, tokens = time.monotonic(), 0, 0
    while not budget.done(tokens, seconds := time.monotonic() - started, steps):
        idx = rng.choice(n, size=min(cfg.batch, n), replace=False)
        opt.zero_grad(set_to_none=True)
        x, y = cache.get(s, idx), cache.get(e, idx)
        with autocast(block, cfg.precision):
            out, router, balance = block_train_forward(block, x, y, cache.positions,
                                                       router_target=cfg.router_weight > 0)
        rel = relative_error(out.float(), y)
        loss = rel + cfg.router_weight * router + cfg.balance_weight * balance
        loss.backward()
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, budget.fraction_spent(tokens, seconds, steps))))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        steps += 1
        tokens += len(idx) * t
        bar.update(len(idx) * t)
        if steps == 1 or steps % cfg.log_every == 0 or budget.done(tokens, time.monotonic() - started, steps):
            rows.append({"step": steps, "tokens": tokens, "lr": lr, "loss": loss.item(), "rel": rel.item()})
    opt.zero_grad(set_to_none=True)
    return rows


# -- end-to-end distillation (trainer.py runs it) ----------------------------------------------------

@dataclass
class E2EConfig:
    lr: float = setting(1e-4, "Peak learning rate (cosine decay).")
    batch: int = setting(4, "Sequences per step (per process).")
    kd_weight: float = setting(1.0, "Weight of KL(teacher || student) on the logits.")
    lm_weight: float = setting(0.1, "Weight of the next-token loss on the calibration text.")
    balance_weight: float = 0.01
    freeze_embeddings: bool = True  # the (often tied) embeddings stay as the teacher's
    log_every: int = 5
    checkpoint_every: int = 50
    seed: int = 0
    precision: str = field(default_factory=default_precision)
