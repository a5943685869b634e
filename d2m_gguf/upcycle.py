"""Apply a fusion plan to dense weights: copy attentions, fold norm gains, stack experts, init routers.

Every expert may come from a different source layer with its own FFN norm gain.
The gain is folded into the expert's gate/up columns (W diag(g)), so one block
norm serves all experts: a routed block, or a dense block fusing several MLPs,
gets a unit norm gain. A dense block with a single source keeps its source norm
untouched, so the identity plan reproduces the dense model bit for bit.
"""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .model import BlockConfig, HybridConfig, HybridModel
from .plan import FusionPlan, validate_plan
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


def _copy_attention(dst, src: _Source, i: int, spec: DenseSpec) -> None:
    dst.attn_norm.weight.copy_(src.layer(i, "input_layernorm.weight"))
    for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
        lin = getattr(dst, ours)
        lin.weight.copy_(src.layer(i, f"self_attn.{theirs}.weight"))
        if lin.bias is not None:
            lin.bias.copy_(src.layer(i, f"self_attn.{theirs}.bias"))
    if spec.qk_norm:
        dst.attn_q_norm.weight.copy_(src.layer(i, "self_attn.q_norm.weight"))
        dst.attn_k_norm.weight.copy_(src.layer(i, "self_attn.k_norm.weight"))


def init_router(moe, plan: FusionPlan, split: int, generator: torch.Generator) -> None:
    """`random`: logits ~ N(0, 1) on unit-RMS input. `host`: always the first source's experts, so the
    block computes exactly what pruning the other sources computes. `fit` starts as `host` (an unhealed
    LF-UC model is the pruned model, never worse) and is fitted by the healing stage (heal.py)."""
    weight, bias = moe.ffn_gate_inp.weight, moe.ffn_gate_inp.bias
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

    model.token_embd.weight.copy_(src.get("model.embed_tokens.weight"))
    model.output_norm.weight.copy_(src.get("model.norm.weight"))
    if not spec.tie_word_embeddings:
        model.output.weight.copy_(src.get("lm_head.weight"))

    for block, b in zip(model.blocks, plan.blocks):
        if b.attention is not None:
            _copy_attention(block.attn, src, b.attention, spec)
        ffn = block.ffn
        if not b.moe and len(b.mlp) == 1:
            s = b.mlp[0]
            block.ffn_norm.weight.copy_(src.layer(s, "post_attention_layernorm.weight"))
            ffn.ffn_gate.weight.copy_(src.layer(s, "mlp.gate_proj.weight"))
            ffn.ffn_up.weight.copy_(src.layer(s, "mlp.up_proj.weight"))
            ffn.ffn_down.weight.copy_(src.layer(s, "mlp.down_proj.weight"))
            continue
        block.ffn_norm.weight.fill_(1.0)
        mlps = [src.mlp(s) for s in b.mlp]
        if b.moe:
            # source m's neurons [c*w, (c+1)*w) become expert m*split + c; scaling its down projection by
            # `split` makes the `split` experts of one MLP, equally weighted, sum back to that MLP
            w = spec.n_ff // b.split
            for m, (gate, up, down) in enumerate(mlps):
                for c in range(b.split):
                    e, rows = m * b.split + c, slice(c * w, (c + 1) * w)
                    ffn.ffn_gate_exps[e].copy_(gate[rows])
                    ffn.ffn_up_exps[e].copy_(up[rows])
                    ffn.ffn_down_exps[e].copy_(down[:, rows] * b.split)
            init_router(ffn, plan, b.split, generator)
        else:  # one wide dense FFN = the sum of the source MLPs
            ffn.ffn_gate.weight.copy_(torch.cat([m[0] for m in mlps], dim=0))
            ffn.ffn_up.weight.copy_(torch.cat([m[1] for m in mlps], dim=0))
            ffn.ffn_down.weight.copy_(torch.cat([m[2] for m in mlps], dim=1))
    return model
