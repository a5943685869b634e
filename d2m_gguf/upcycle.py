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
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .checkpoint import Checkpoint
from .errors import D2MError
from .model import BlockConfig, HybridConfig, HybridModel
from .plan import BlockPlan, FusionPlan, trained_blocks, validate_plan
from .spec import DenseSpec


def hybrid_config(spec: DenseSpec, plan: FusionPlan) -> HybridConfig:
    """The architecture a plan produces from a dense model."""
    blocks = tuple(
        BlockConfig(attention=b.attention is not None,
                    n_ff=spec.n_ff // b.split if b.moe else spec.n_ff * len(b.mlp),
                    n_expert=b.n_expert, n_expert_used=b.top_k if b.moe else 0)
        for b in plan.blocks)
    return HybridConfig(
        vocab_size=spec.vocab_size, n_embd=spec.n_embd, n_head=spec.n_head, n_head_kv=spec.n_head_kv,
        head_dim=spec.head_dim, n_ctx_train=spec.n_ctx_train, rms_eps=spec.rms_eps, rope_theta=spec.rope_theta,
        qkv_bias=spec.qkv_bias, o_bias=spec.o_bias, qk_norm=spec.qk_norm,
        tie_word_embeddings=spec.tie_word_embeddings, normalize_topk=plan.normalize_topk, blocks=blocks)


class _Source:
    """Float32 torch views of the dense checkpoint, by layer."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def get(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.ckpt.get(name)).to(torch.float32)

    def layer(self, i: int, name: str) -> torch.Tensor:
        return self.get(f"model.layers.{i}.{name}")

    def mlp(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) of layer i with its FFN norm gain folded into gate and up."""
        gain = self.layer(i, "post_attention_layernorm.weight")
        return (self.layer(i, "mlp.gate_proj.weight") * gain,
                self.layer(i, "mlp.up_proj.weight") * gain,
                self.layer(i, "mlp.down_proj.weight"))


def _copy_attention(dst, src: _Source, i: int) -> None:
    """Source layer i's attention and its norm into block `dst` (the same names on both sides)."""
    for key, param in dst.named_parameters():
        if key.startswith(("input_layernorm.", "self_attn.")):
            param.copy_(src.layer(i, key))


def init_router(moe, plan: FusionPlan, split: int, generator: torch.Generator) -> None:
    """`random`: logits ~ N(0, 1) on unit-RMS input. `host`: always the first source's experts, so the
    block computes exactly what pruning the other sources computes. `fit` starts as `host` (an unhealed
    LF-UC model is the pruned model, never worse) and is fitted by the healing stage (heal.py)."""
    weight, bias = moe.router.weight, moe.router.bias
    bias.zero_()
    if plan.router_init in ("host", "fit"):
        weight.zero_()
        bias[:split] = 1.0  # any margin selects the host; a small one leaves the router free to learn
    else:
        weight.copy_(torch.randn(weight.shape, generator=generator) / weight.shape[1] ** 0.5)


@torch.no_grad()
def upcycle(spec: DenseSpec, ckpt: Checkpoint, plan: FusionPlan, seed: int = 0) -> HybridModel:
    """Build the dense2moe model of `plan` from a dense checkpoint."""
    validate_plan(plan, n_layer=spec.n_layer, n_ff=spec.n_ff)
    model = HybridModel(hybrid_config(spec, plan))
    src = _Source(ckpt)
    generator = torch.Generator().manual_seed(seed)

    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):   # the same names
        if key in model.state_dict():
            model.get_parameter(key).copy_(src.get(key))

    try:
        healed = set(trained_blocks(plan))
    except D2MError:   # sources not monotonic: block-local healing refuses the plan, so nothing is trained
        healed = set()
    for j, (block, b) in enumerate(zip(model.layers, plan.blocks)):
        if b.attention is not None:
            _copy_attention(block, src, b.attention)
        ffn = block.mlp
        if not b.moe and len(b.mlp) == 1 and j not in healed:
            s = b.mlp[0]
            block.post_attention_layernorm.weight.copy_(src.layer(s, "post_attention_layernorm.weight"))
            ffn.gate_proj.weight.copy_(src.layer(s, "mlp.gate_proj.weight"))
            ffn.up_proj.weight.copy_(src.layer(s, "mlp.up_proj.weight"))
            ffn.down_proj.weight.copy_(src.layer(s, "mlp.down_proj.weight"))
            continue
        block.post_attention_layernorm.weight.fill_(1.0)
        mlps = [src.mlp(s) for s in b.mlp]
        if b.moe:
            # source m's neurons [c*w, (c+1)*w) become expert m*split + c; scaling its down projection by
            # `split` makes the `split` experts of one MLP, equally weighted, sum back to that MLP
            w = spec.n_ff // b.split
            for m, (gate, up, down) in enumerate(mlps):
                for c in range(b.split):
                    e, rows = m * b.split + c, slice(c * w, (c + 1) * w)
                    ffn.experts.gate_proj[e].copy_(gate[rows])
                    ffn.experts.up_proj[e].copy_(up[rows])
                    ffn.experts.down_proj[e].copy_(down[:, rows] * b.split)
            init_router(ffn, plan, b.split, generator)
        else:  # one wide dense FFN = the sum of the source MLPs
            ffn.gate_proj.weight.copy_(torch.cat([m[0] for m in mlps], dim=0))
            ffn.up_proj.weight.copy_(torch.cat([m[1] for m in mlps], dim=0))
            ffn.down_proj.weight.copy_(torch.cat([m[2] for m in mlps], dim=1))
    return model


_EXPERT_TENSORS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj", "router.weight", "router.bias")


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
                state[prefix + name] = state[prefix + name][keep]
            continue
        blocks[j] = BlockPlan(b.attention, (b.mlp[keep[0]],), moe=False)
        for name in ("gate", "up", "down"):
            state[f"{prefix}{name}_proj.weight"] = state.pop(f"{prefix}experts.{name}_proj")[keep[0]]
        for name in ("router.weight", "router.bias"):
            del state[prefix + name]
    if not dropped:
        return model, plan
    earlier = plan.notes.get("idle_experts_dropped", {})   # dropped by an earlier call (host-first healing)
    dropped = {j: sorted(earlier.get(j, []) + dropped.get(j, [])) for j in sorted({*earlier, *dropped}, key=int)}
    pruned = replace(plan, blocks=tuple(blocks), notes={**plan.notes, "idle_experts_dropped": dropped})
    validate_plan(pruned, n_layer=spec.n_layer, n_ff=spec.n_ff)
    out = HybridModel(hybrid_config(spec, pruned))
    out.load_state_dict(state)
    return out, pruned
