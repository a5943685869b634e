"""Automatic fusion plans: which layers to fuse (or prune) for a speed target, under the cost model.

Methods (equal `fuse` = equal active weight bytes):
- `lfuc`: remove the `fuse` most redundant layers (lowest block influence, never the
  first or last); each removed layer loses its attention and its MLP becomes experts
  of the MoE in the nearest kept layer (either side; `attach="before"`: the one before it).
  Each source MLP is cut into `split` experts (default 1: whole MLPs) and `top_k = split` of them run per token, so a
  block reads one MLP's worth of expert weights, chosen per token from all the MLPs of its group.
- `prune`: remove the same layers outright (ShortGPT-style layer pruning).
- `attn-prune`: remove the attention of the `fuse` layers with the least attention influence.
- `upcycle`: plain sparse upcycling: every middle MLP cut into `split` experts, top-k
  lowered in the middle layers until `fuse` MLPs' worth of expert bytes are saved.

Targets: `fuse` directly, or the smallest `fuse` meeting `target_speedup` or
`max_bytes_per_token` at context depth `depth` on `device` (roofline prediction).
With `depth_aware`, `lfuc` (and `prune`, for the matching baseline) may also drop attention alone where
that costs less quality for the bytes saved (at long contexts a layer's KV cache outweighs its MLP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .analysis import LayerScores
from .costmodel import Device, WeightTypes, planned_cost
from .errors import D2MError
from .options import setting
from .plan import BlockPlan, FusionPlan, validate_plan
from .spec import DenseSpec
from .upcycle import hybrid_config

METHODS = ("lfuc", "prune", "attn-prune", "upcycle")


DEFAULT_FUSE = 8   # what the whole job plans when no target is given


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: a method and a target (a size, a speedup or a byte budget) at a context depth."""

    method: str = setting("lfuc", "LF-UC, or a baseline made by the same machinery.", choices=METHODS)
    fuse: int | None = setting(None, "Fused groups (lfuc) / removed layers or attentions (baselines) / MLPs saved "
                               "(upcycle).", default_text=f"{DEFAULT_FUSE} when no other target is given")
    target_speedup: float | None = setting(None, "Smallest plan predicted this much faster.")
    max_bytes_per_token: float | None = setting(None, "Smallest plan reading at most this many bytes per token.")
    depth: int = setting(512, "Context depth the plan targets (the KV cache read per token grows with it).")
    split: int | None = setting(None, "Experts cut from each source MLP.",
                                default_text="1 for lfuc (whole MLPs), 6 for upcycle")
    top_k: int | None = setting(None, "Experts per token (one MLP's worth of expert weights).",
                                default_text="split")
    depth_aware: bool = setting(False, "lfuc, prune: the cheapest mix of removed layers and attentions dropped "
                                "alone that saves --fuse layers' bytes at --depth.")
    router_init: str = "fit"          # the job may override it for any plan (ConvertRequest.router_init)
    attach: str = setting("nearest", "lfuc: a removed layer's MLP joins the nearest kept layer on either side, "
                          "or the one before.", choices=("nearest", "before"))
    weight_types: WeightTypes = WeightTypes()

    def with_default_target(self) -> "PlanRequest":
        """This request, with `fuse` = DEFAULT_FUSE when it names no target."""
        if self.fuse is None and self.target_speedup is None and self.max_bytes_per_token is None:
            return replace(self, fuse=DEFAULT_FUSE)
        return self


def _removable(scores: LayerScores, key: str) -> list[int]:
    """Middle layers, most redundant first."""
    values = getattr(scores, key)
    return sorted(range(1, scores.n_layer - 1), key=lambda i: values[i])


def fused_layers(scores: LayerScores, n: int) -> list[int]:
    return sorted(_removable(scores, "influence")[:n])


def plan_lfuc(n_layer: int, removed: list[int], attn_only: list[int], split: int, top_k: int,
              router_init: str, attach: str) -> FusionPlan:
    """Each removed layer's MLP joins the experts of a kept layer: the nearest kept layer before it
    (`attach="before"`), or the nearest on either side (`"nearest"`, ties before), which halves the
    groups of a long run of removed layers and gives its tokens two routed choices instead of one."""
    removed_set = set(removed)
    kept = [i for i in range(n_layer) if i not in removed_set]
    guests: dict[int, list[int]] = {i: [] for i in kept}
    for r in sorted(removed_set):
        before = max(i for i in kept if i < r)
        after = [i for i in kept if i > r]
        host = after[0] if attach == "nearest" and after and after[0] - r < r - before else before
        guests[host].append(r)
    blocks = []
    for i in kept:
        attention = None if i in attn_only else i
        if not guests[i]:
            blocks.append(BlockPlan(attention, (i,), False))
        else:
            group = (i, *guests[i])
            blocks.append(BlockPlan(attention, group, True, min(top_k, split * len(group)), split))
    return FusionPlan(tuple(blocks), n_layer, normalize_topk=True, router_init=router_init, method="lfuc",
                      notes={"fused_layers": removed, "attention_removed": attn_only, "attach": attach})


def plan_prune(n_layer: int, removed: list[int], attn_only: list[int] = ()) -> FusionPlan:
    """The `removed` layers dropped; with `attn_only` (a depth-aware plan) those layers also lose their attention."""
    gone = set(removed)
    blocks = tuple(BlockPlan(None if i in attn_only else i, (i,), False) for i in range(n_layer) if i not in gone)
    notes = {"removed_layers": removed, **({"attention_removed": list(attn_only)} if attn_only else {})}
    return FusionPlan(blocks, n_layer, method="prune", router_init="host", notes=notes)


def plan_attn_prune(n_layer: int, removed: list[int]) -> FusionPlan:
    blocks = tuple(BlockPlan(None if i in set(removed) else i, (i,), False) for i in range(n_layer))
    return FusionPlan(blocks, n_layer, method="attn-prune", router_init="host", notes={"attention_removed": removed})


def plan_upcycle(n_layer: int, n_saved: int, split: int, router_init: str) -> FusionPlan:
    middle = list(range(1, n_layer - 1))
    slots = n_saved * split                          # expert slots to deactivate in total
    per_layer, extra = divmod(slots, len(middle))
    if per_layer + (extra > 0) >= split:
        raise D2MError(f"upcycle cannot save {n_saved} MLPs with split {split} over {len(middle)} layers")
    blocks = []
    for i in range(n_layer):
        if i in middle:
            k = split - per_layer - (1 if middle.index(i) < extra else 0)
            blocks.append(BlockPlan(i, (i,), True, k, split))
        else:
            blocks.append(BlockPlan(i, (i,), False))
    return FusionPlan(tuple(blocks), n_layer, router_init=router_init, method="upcycle", notes={"mlps_saved": n_saved})


# lfuc: whole MLPs as experts, top-1 (llama.cpp then takes the router's argmax, no weights); at the default
# healing budget whole MLPs healed better than halves or quarters (docs/results.md). Plain upcycling needs
# slices to lower top-k at all.
DEFAULT_SPLIT = {"lfuc": 1, "upcycle": 6}


def build_plan(spec: DenseSpec, scores: LayerScores, req: PlanRequest, n: int) -> FusionPlan:
    """The plan of `req.method` removing `n` layers (or attentions / MLPs' worth of experts)."""
    split = req.split or DEFAULT_SPLIT.get(req.method, 1)
    top_k = req.top_k or split
    if req.method in ("lfuc", "prune"):
        # one choice of layers (and, depth-aware, attentions alone) for both: prune drops what lfuc routes
        removed, attn_only = (_depth_aware_choice(spec, scores, req, n) if req.depth_aware
                              else (fused_layers(scores, n), []))
        plan = (plan_lfuc(spec.n_layer, removed, attn_only, split, top_k, req.router_init, req.attach)
                if req.method == "lfuc" else plan_prune(spec.n_layer, removed, attn_only))
    elif req.method == "attn-prune":
        plan = plan_attn_prune(spec.n_layer, sorted(_removable(scores, "attention_influence")[:n]))
    elif req.method == "upcycle":
        plan = plan_upcycle(spec.n_layer, n, split, req.router_init)
    else:
        raise D2MError(f"unknown method {req.method!r} (one of {', '.join(METHODS)})")
    validate_plan(plan, n_layer=spec.n_layer, n_ff=spec.n_ff)
    return plan


def _depth_aware_choice(spec: DenseSpec, scores: LayerScores, req: PlanRequest, n: int) -> tuple[list[int], list[int]]:
    """The cheapest mix of fused layers (attention + MLP) and attentions dropped alone that saves at least the
    bytes of `n` fused layers at context depth `req.depth`; cost is the summed influence of what is removed.

    An exact 0/1 knapsack over the middle layers (each: keep, drop its attention, or fuse it) on bytes in
    units of 1/8 of the smallest attention: a greedy by cost per byte overshoots the target with its last pick
    (a whole layer where two attentions would do). Influence undervalues late attentions (docs/results.md),
    so depth-aware plans are for long contexts, where the KV cache pays."""
    dense = planned_cost(hybrid_config(spec, plan_prune(spec.n_layer, [])), req.weight_types, req.depth)
    layer_bytes = dense.per_layer
    mlp_bytes = 3 * spec.n_embd * spec.n_ff * _bpw(req.weight_types.ffn)
    candidates = range(1, spec.n_layer - 1)
    attn_bytes = {i: layer_bytes[i] - mlp_bytes - 2 * spec.n_embd * 4 for i in candidates}
    unit = min(attn_bytes.values()) / 8
    need = sum(round(layer_bytes[i] / unit) for i in fused_layers(scores, n))
    # best[s]: (cost, choices) of the cheapest way to save s units (s == need: at least need)
    best: list[tuple[float, tuple[tuple[str, int], ...]] | None] = [None] * (need + 1)
    best[0] = (0.0, ())
    for i in candidates:
        options = (("attn", scores.attention_influence[i], round(attn_bytes[i] / unit)),
                   ("fuse", scores.influence[i], round(layer_bytes[i] / unit)))
        nxt = list(best)
        for s, entry in enumerate(best):
            if entry is None:
                continue
            for kind, cost, units in options:
                t = min(need, s + units)
                candidate = (entry[0] + cost, entry[1] + ((kind, i),))
                if nxt[t] is None or candidate[0] < nxt[t][0]:
                    nxt[t] = candidate
        best = nxt
    choices = best[need][1] if best[need] is not None else ()
    return sorted(i for k, i in choices if k == "fuse"), sorted(i for k, i in choices if k == "attn")


def _bpw(qtype: str) -> float:
    from .costmodel import bytes_per_weight
    return bytes_per_weight(qtype)


@dataclass
class PlanChoice:
    plan: FusionPlan
    fuse: int
    dense_bytes: float
    plan_bytes: float
    predicted_speedup: float
    head_share: float = 0.0     # of the dense model's bytes per token: the LM head (and the embedding row)
    ceiling: float = math.inf   # the speedup of removing every block: what no plan can reach

    def bound(self) -> str:
        """The LM-head bound in words, for a user choosing a target."""
        return (f"the LM head is {self.head_share:.0%} of the bytes a token reads: removing every layer would be "
                f"x{self.ceiling:.2f} at most")


def choose_plan(spec: DenseSpec, scores: LayerScores, req: PlanRequest, device: Device) -> PlanChoice:
    """The plan for `req`: `fuse` given, or the smallest one meeting the speed/bytes target."""
    dense_cfg = hybrid_config(spec, plan_prune(spec.n_layer, []))
    dense = planned_cost(dense_cfg, req.weight_types, req.depth)
    head = planned_cost(dense_cfg.with_blocks(()), req.weight_types, req.depth)
    ceiling = head.tokens_per_s(device) / dense.tokens_per_s(device)

    def evaluate(n: int) -> PlanChoice:
        plan = build_plan(spec, scores, req, n)
        cost = planned_cost(hybrid_config(spec, plan), req.weight_types, req.depth)
        return PlanChoice(plan, n, dense.total_bytes, cost.total_bytes,
                          cost.tokens_per_s(device) / dense.tokens_per_s(device),
                          head.total_bytes / dense.total_bytes, ceiling)

    if req.fuse is not None:
        if not 0 <= req.fuse <= spec.n_layer - 2:
            raise D2MError(f"--fuse {req.fuse}: must be between 0 and {spec.n_layer - 2} for a {spec.n_layer}-layer model")
        return evaluate(req.fuse)
    if req.target_speedup is None and req.max_bytes_per_token is None:
        raise D2MError("give --fuse N, --target-speedup X or --max-bytes-per-token B")
    for n in range(0, spec.n_layer - 1):
        choice = evaluate(n)
        if ((req.target_speedup is None or choice.predicted_speedup >= req.target_speedup)
                and (req.max_bytes_per_token is None or choice.plan_bytes <= req.max_bytes_per_token)):
            return choice
    why = f" ({choice.bound()})" if req.target_speedup is not None and req.target_speedup >= ceiling else ""
    raise D2MError(f"no plan of this model meets the target{why}; lower --target-speedup or raise "
                   f"--max-bytes-per-token")
