"""Apply a fusion plan to dense weights: copy attentions, fold norm gains, stack experts, init routers.

Every expert may come from a different source layer with its own FFN norm gain.
The gain is folded into the expert's gate/up columns (W diag(g)), so one block
norm serves all experts: a routed block, or a dense block fusing several MLPs,
gets a unit norm gain. A dense block that healing trains (it stands for pruned
layers too) is folded the same way, so pruning heals in the parametrisation
LF-UC heals in: AdamW is not invariant to that change of variables, and the
folded baseline heals better (docs/results.md).
A dense copy of one layer keeps its source norm untouched, so the identity plan
reproduces the dense model bit for bit.

Gemma-style models norm each MLP's output too; that norm is not linear, so it cannot be folded: an expert
keeps its source layer's output norm (Experts.post_norm), and a block can only hold whole MLPs (no wide
dense block summing several MLPs, no MLP split into several experts).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .checkpoint import Checkpoint
from .errors import D2MError
from .model import BlockConfig, HybridConfig, HybridModel
from .plan import BlockPlan, FusionPlan, trained_blocks, validate_plan
from .spec import DenseSpec
from .weights import Weights, layer_of, state_shapes


def hybrid_config(spec: DenseSpec, plan: FusionPlan) -> HybridConfig:
    """The architecture a plan produces from a dense model."""
    if spec.post_norms:
        for j, b in enumerate(plan.blocks):
            if b.split > 1 or (not b.moe and len(b.mlp) > 1):
                raise D2MError(f"block {j}: {spec.family} norms each MLP's output, so a block holds whole MLPs: "
                               f"no split experts, no dense block of several MLPs (use \"ffn\": \"moe\")")
    blocks = tuple(
        BlockConfig(attention=b.attention is not None,
                    n_ff=spec.n_ff // b.split if b.moe else spec.n_ff * len(b.mlp),
                    n_expert=b.n_expert, n_expert_used=b.top_k if b.moe else 0,
                    sliding=b.attention is not None and spec.is_sliding(b.attention))
        for b in plan.blocks)
    return HybridConfig(
        vocab_size=spec.vocab_size, n_embd=spec.n_embd, n_head=spec.n_head, n_head_kv=spec.n_head_kv,
        head_dim=spec.head_dim, n_ctx_train=spec.n_ctx_train, rms_eps=spec.rms_eps, rope_theta=spec.rope_theta,
        qkv_bias=spec.qkv_bias, o_bias=spec.o_bias, qk_norm=spec.qk_norm,
        tie_word_embeddings=spec.tie_word_embeddings, normalize_topk=plan.normalize_topk, blocks=blocks,
        ffn_activation=spec.ffn_activation, embedding_scale=spec.embedding_scale, post_norms=spec.post_norms,
        sliding_window=spec.sliding_window if spec.swa_layers else 0, rope_theta_swa=spec.rope_theta_swa,
        attention_scale=spec.attention_scale)


class _Source:
    """Float32 torch views of the dense checkpoint, by layer; norm gains as the multiplier itself (Gemma's
    checkpoints store gain - 1)."""

    def __init__(self, spec: DenseSpec, ckpt: Checkpoint):
        self.spec, self.ckpt = spec, ckpt

    def get(self, name: str) -> torch.Tensor:
        t = torch.from_numpy(self.ckpt.get(name)).to(torch.float32)
        return t + self.spec.norm_offset if self.spec.norm_offset and name.endswith("norm.weight") else t

    def layer(self, i: int, name: str) -> torch.Tensor:
        return self.get(f"model.layers.{i}.{name}")

    def ffn_norm(self, i: int) -> torch.Tensor:
        return self.layer(i, self.spec.ffn_norm + ".weight")

    def folded(self, i: int, proj: str) -> torch.Tensor:
        """Layer i's gate, up or down projection, with its FFN norm gain folded into gate and up."""
        weight = self.layer(i, f"mlp.{proj}_proj.weight")
        return weight if proj == "down" else weight * self.ffn_norm(i)


def router_init(plan: FusionPlan, split: int, shape: tuple[int, int],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a router. `random`: logits ~ N(0, 1) on unit-RMS input. `host`: always the first
    source's experts, so the block computes exactly what pruning the other sources computes. `fit` starts as
    `host` (an unhealed LF-UC model is the pruned model, never worse) and is fitted by the healing stage
    (heal.py)."""
    bias = torch.zeros(shape[0])
    if plan.router_init in ("host", "fit"):
        bias[:split] = 1.0  # any margin selects the host; a small one leaves the router free to learn
        return torch.zeros(shape), bias
    return torch.randn(shape, generator=generator) / shape[1] ** 0.5, bias


def plan_weights(spec: DenseSpec, ckpt: Checkpoint, plan: FusionPlan, seed: int = 0) -> Weights:
    """The dense2moe model of `plan`, each tensor computed from the dense checkpoint when it is loaded.

    Copies attentions, folds norm gains, stacks experts, initialises routers (module docstring); a router's
    random draws come from a generator of (seed, block), so any tensor can be made alone, in any order."""
    validate_plan(plan, n_layer=spec.n_layer, n_ff=spec.n_ff)
    cfg = hybrid_config(spec, plan)
    shapes = state_shapes(cfg)
    src = _Source(spec, ckpt)
    try:
        healed = set(trained_blocks(plan))
    except D2MError:   # sources not monotonic: block-local healing refuses the plan, so nothing is trained
        healed = set()

    def load(key: str) -> torch.Tensor:
        j = layer_of(key)
        if j is None:
            return src.get(key)     # embeddings, final norm, LM head: the same names
        b, rest = plan.blocks[j], key.split(".", 3)[3]
        if rest == "self_attn.post_norm.weight":
            return src.layer(b.attention, "post_attention_layernorm.weight")
        if rest.startswith(("input_layernorm.", "self_attn.")):
            return src.layer(b.attention, rest)
        if rest == "mlp.post_norm.weight":           # a dense block holds one MLP here (hybrid_config)
            return src.layer(b.mlp[0], "post_feedforward_layernorm.weight")
        if rest == "mlp.experts.post_norm":
            return torch.stack([src.layer(s, "post_feedforward_layernorm.weight") for s in b.mlp])
        copy = not b.moe and len(b.mlp) == 1 and j not in healed     # an exact copy of one layer, unfolded
        if rest.startswith("post_attention_layernorm."):
            return src.ffn_norm(b.mlp[0]) if copy else torch.ones(shapes[key])
        if copy:
            return src.layer(b.mlp[0], rest)
        if rest.startswith("mlp.router."):
            g = torch.Generator().manual_seed(seed * 1_000_003 + j)
            weight, bias = router_init(plan, b.split, shapes[f"model.layers.{j}.mlp.router.weight"], g)
            return weight if rest.endswith("weight") else bias
        proj = rest.split(".")[-2 if rest.endswith(".weight") else -1][:-len("_proj")]
        if b.moe:
            # source m's neurons [c*w, (c+1)*w) become expert m*split + c; scaling its down projection by
            # `split` makes the `split` experts of one MLP, equally weighted, sum back to that MLP
            w = spec.n_ff // b.split
            parts = []
            for s in b.mlp:
                full = src.folded(s, proj)
                parts += [full[:, c * w:(c + 1) * w] * b.split if proj == "down" else full[c * w:(c + 1) * w]
                          for c in range(b.split)]
            return torch.stack(parts)
        # one wide dense FFN = the sum of the source MLPs
        return torch.cat([src.folded(s, proj) for s in b.mlp], dim=1 if proj == "down" else 0)

    return Weights(cfg, shapes, load)


@torch.no_grad()
def upcycle(spec: DenseSpec, ckpt: Checkpoint, plan: FusionPlan, seed: int = 0,
            blocks: list[int] | None = None) -> HybridModel:
    """The dense2moe model of `plan` from a dense checkpoint, in memory: whole, or (`blocks`) only those
    blocks, the rest on the `meta` device (`Weights.materialize`)."""
    return plan_weights(spec, ckpt, plan, seed).materialize(blocks)


_EXPERT_TENSORS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj", "experts.post_norm", "router.weight",
                   "router.bias")


def drop_idle_experts(model: HybridModel, plan: FusionPlan, spec: DenseSpec, usage: dict[int, list[float]],
                      min_share: float) -> tuple[HybridModel, FusionPlan]:
    """Remove the experts a healed top-1 router picks for fewer than `min_share` of the tokens (`usage`: share
    per expert, per MoE block, measured on calibration text) from blocks of whole-MLP experts; the most used
    expert always stays.

    Every token the router sent to a kept expert gets the same output (top-1 with renormalised weights: the
    chosen expert's weight is 1 whatever the other logits are). A block left with one expert (with frozen
    guests, its host) becomes a dense block (the norm gain stays folded): it decodes without the router and
    the expert lookup, as pruning's block does, so LF-UC costs no decode speed where healing found no use for
    the guests. Returns the model and plan unchanged when nothing is idle; otherwise new ones, the plan noting
    which source layers' experts were dropped."""
    blocks, state, dropped = list(plan.blocks), model.state_dict(), {}
    for j, b in enumerate(plan.blocks):
        shares = usage.get(j)
        if not (shares and b.moe and b.top_k == 1 and b.split == 1):
            continue
        keep = [e for e, share in enumerate(shares) if share >= min_share] or [int(torch.tensor(shares).argmax())]
        if len(keep) == len(b.mlp):
            continue
        dropped[str(j)] = [s for e, s in enumerate(b.mlp) if e not in keep]
        prefix = f"model.layers.{j}.mlp."
        if len(keep) > 1:
            blocks[j] = replace(b, mlp=tuple(b.mlp[e] for e in keep))
            for name in _EXPERT_TENSORS:
                if prefix + name in state:
                    state[prefix + name] = state[prefix + name][keep]
            continue
        blocks[j] = BlockPlan(b.attention, (b.mlp[keep[0]],), moe=False)
        for name in ("gate", "up", "down"):
            state[f"{prefix}{name}_proj.weight"] = state.pop(f"{prefix}experts.{name}_proj")[keep[0]]
        if prefix + "experts.post_norm" in state:    # Gemma-style: the kept expert's output norm
            state[f"{prefix}post_norm.weight"] = state.pop(f"{prefix}experts.post_norm")[keep[0]]
        for name in ("router.weight", "router.bias"):
            del state[prefix + name]
    if not dropped:
        return model, plan
    earlier = plan.notes.get("idle_experts_dropped", {})   # dropped by an earlier call (host-first healing)
    dropped = {j: sorted(earlier.get(j, []) + dropped.get(j, [])) for j in sorted({*earlier, *dropped}, key=int)}
    pruned = replace(plan, blocks=tuple(blocks), notes={**plan.notes, "idle_experts_dropped": dropped})
    validate_plan(pruned, n_layer=spec.n_layer, n_ff=spec.n_ff)
    with torch.device("meta"):     # the tensors are the model's own (a partial model's unloaded ones stay meta)
        out = HybridModel(hybrid_config(spec, pruned))
    out.load_state_dict(state, assign=True)
    return out.train(model.training), pruned
