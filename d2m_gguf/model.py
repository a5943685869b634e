"""The dense2moe architecture in plain PyTorch: the reference every llama.cpp number is held against.

A decoder stack whose blocks vary per layer:

    x = x + attention(rms_norm(x))          if the block has attention
    x = x + ffn(rms_norm(x))                a dense SwiGLU MLP, or a mixture of experts:
        p = softmax(router(h));  top-k of p;  optional renormalisation;  sum_k w_k * expert_k(h)

RMSNorm, RoPE in the rotate-half (NEOX) layout, GQA, optional q/k/v bias and q/k
norm. Module attribute names are the GGUF tensor names (`blocks.3.attn_q.weight`
is `blk.3.attn_q.weight`), so a state dict and a GGUF file map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

# llama.cpp clamps the sum of the top-k weights before renormalising (smallest f16 normal)
_TOPK_SUM_MIN = 6.103515625e-5


@dataclass(frozen=True)
class BlockConfig:
    attention: bool
    n_ff: int               # dense FFN width, or the width of each expert
    n_expert: int = 0       # 0: dense FFN
    n_expert_used: int = 0

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0


@dataclass(frozen=True)
class HybridConfig:
    vocab_size: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    normalize_topk: bool
    blocks: tuple[BlockConfig, ...]

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    def with_blocks(self, blocks) -> "HybridConfig":
        return replace(self, blocks=tuple(blocks))


def round_activations(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """The input llama.cpp's CPU kernels multiply by a weight of a given GGML type: Q8_0 weights meet
    activations quantized to int8 in blocks of 32 (ggml's quantize_row_q8_0), F16/BF16 weights meet
    activations rounded to that type. `None`: exact float32 (F32 weights, and training)."""
    if kind is None:
        return x
    if kind in ("f16", "bf16"):
        return x.to(torch.float16 if kind == "f16" else torch.bfloat16).to(x.dtype)
    if kind == "q8_0":
        blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        q = torch.round(blocks * torch.where(d > 0, 1.0 / d, torch.zeros_like(d)))
        return (q * d.to(torch.float16).to(x.dtype)).reshape(x.shape)
    raise ValueError(f"no activation rounding for {kind!r}")


class Linear(nn.Linear):
    """nn.Linear whose input can be rounded as llama.cpp rounds it for the weight's type (`act`)."""

    act: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(round_activations(x, self.act))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotate-half RoPE (llama.cpp's NEOX mode)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.n_embd, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_eps)
        self.attn_q = Linear(d, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.attn_k = Linear(d, cfg.n_head_kv * hd, bias=cfg.qkv_bias)
        self.attn_v = Linear(d, cfg.n_head_kv * hd, bias=cfg.qkv_bias)
        self.attn_output = Linear(cfg.n_head * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.attn_q_norm = RMSNorm(hd, cfg.rms_eps)
            self.attn_k_norm = RMSNorm(hd, cfg.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.attn_q(h).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.attn_k(h).view(B, T, cfg.n_head_kv, cfg.head_dim)
        v = self.attn_v(h).view(B, T, cfg.n_head_kv, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.n_head != cfg.n_head_kv)
        return self.attn_output(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class DenseFFN(nn.Module):
    def __init__(self, n_embd: int, n_ff: int):
        super().__init__()
        self.ffn_gate = Linear(n_embd, n_ff, bias=False)
        self.ffn_up = Linear(n_embd, n_ff, bias=False)
        self.ffn_down = Linear(n_ff, n_embd, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h))


def load_balance(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balance loss: E * sum_e (share of routed slots to e) * (mean probability of e).
    1.0 when routing is uniform; larger when a few experts take the tokens."""
    n_expert, k = probs.shape[-1], selected.shape[-1]
    routed = torch.zeros_like(probs).scatter_(-1, selected, 1.0).mean(0) / k
    return n_expert * (routed * probs.mean(0)).sum()


class MoEFFN(nn.Module):
    """Softmax router over SwiGLU experts, top-k, llama.cpp's `build_moe_ffn` semantics."""

    def __init__(self, n_embd: int, n_ff: int, n_expert: int, n_expert_used: int, normalize: bool):
        super().__init__()
        self.n_expert_used = n_expert_used
        self.normalize = normalize
        self.ffn_gate_inp = nn.Linear(n_embd, n_expert, bias=True)
        self.ffn_gate_exps = nn.Parameter(torch.zeros(n_expert, n_ff, n_embd))
        self.ffn_up_exps = nn.Parameter(torch.zeros(n_expert, n_ff, n_embd))
        self.ffn_down_exps = nn.Parameter(torch.zeros(n_expert, n_embd, n_ff))
        self.last_selection: torch.Tensor | None = None  # [tokens, k] expert ids of the last forward
        self.last_balance: torch.Tensor | None = None    # load-balance loss of the last training forward
        self.act: dict[str, str | None] = {}              # activation rounding per expert tensor (round_activations)

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        g = round_activations(h, self.act.get("ffn_gate_exps")) @ self.ffn_gate_exps[e].T
        u = round_activations(h, self.act.get("ffn_up_exps")) @ self.ffn_up_exps[e].T
        return round_activations(F.silu(g) * u, self.act.get("ffn_down_exps")) @ self.ffn_down_exps[e].T

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities [N, E], selected experts [N, k], their weights [N, k]) for tokens h [N, D].

        Top-1 with renormalisation always weighs the chosen expert 1, so the loss would send the
        router no gradient; in training the weight is p / stop_grad(p): still 1, with the
        gradient of log p (straight through), so distillation can teach the router too. A frozen
        router (heal.frozen_routers) learns nothing, so it sends no such gradient into h either."""
        probs = torch.softmax(self.ffn_gate_inp(h).float(), dim=-1)
        picked, selected = torch.topk(probs, self.n_expert_used, dim=-1)
        weights = picked
        if self.normalize:
            weights = picked / picked.sum(-1, keepdim=True).clamp_min(_TOPK_SUM_MIN)
            if self.training and self.n_expert_used == 1 and self.ffn_gate_inp.weight.requires_grad:
                weights = weights * picked / picked.detach()
        return probs, selected, weights

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        h = h.reshape(-1, shape[-1])
        probs, selected, weights = self.route(h)
        self.last_selection = selected.detach()
        if self.training:
            self.last_balance = load_balance(probs, selected)
        out = torch.zeros_like(h)
        for e in range(self.ffn_gate_exps.shape[0]):
            rows, slot = torch.nonzero(selected == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, (weights[rows, slot, None] * self.expert(e, h[rows])).to(out.dtype))
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, cfg: HybridConfig, bc: BlockConfig):
        super().__init__()
        self.has_attention = bc.attention
        if bc.attention:
            self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        if bc.is_moe:
            self.ffn = MoEFFN(cfg.n_embd, bc.n_ff, bc.n_expert, bc.n_expert_used, cfg.normalize_topk)
        else:
            self.ffn = DenseFFN(cfg.n_embd, bc.n_ff)

    def contributions(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What the block adds to the residual stream: (attention output or None, FFN output)."""
        a = self.attn(x, cos, sin) if self.has_attention else None
        h = x if a is None else x + a
        return a, self.ffn(self.ffn_norm(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a, f = self.contributions(x, cos, sin)
        return (x if a is None else x + a) + f


class HybridModel(nn.Module):
    """A dense2moe decoder. `forward(tokens [B, T]) -> logits [B, T, vocab]` (float32)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embd = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, bc) for bc in cfg.blocks)
        self.output_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        if not cfg.tie_word_embeddings:
            self.output = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head_act: str | None = None  # activation rounding of the LM head (round_activations)

    def lm_head(self) -> torch.Tensor:
        return self.token_embd.weight if self.cfg.tie_word_embeddings else self.output.weight

    def hidden_states(self, tokens: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Residual stream before block 0, after each block (up to block `upto`, exclusive)."""
        x = self.token_embd(tokens)
        cos, sin = rope_cos_sin(torch.arange(tokens.shape[1]), self.cfg.head_dim, self.cfg.rope_theta)
        states = [x]
        for block in self.blocks[:upto]:
            x = block(x, cos, sin)
            states.append(x)
        return states

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.hidden_states(tokens)[-1]
        return round_activations(self.output_norm(x), self.lm_head_act) @ self.lm_head().T

    @torch.no_grad()
    def generate(self, tokens: list[int], n_new: int, eos: int | None = None) -> list[int]:
        """Greedy decoding (recomputes the prefix: a reference, not a server)."""
        out = list(tokens)
        for _ in range(n_new):
            nxt = int(self(torch.tensor([out]))[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
        return out


# -- state dict <-> GGUF tensor names -------------------------------------------------------

def gguf_name(key: str) -> str:
    """'blocks.3.attn.attn_q.weight' -> 'blk.3.attn_q.weight'; 'blocks.3.ffn.ffn_gate_exps' -> '...ffn_gate_exps.weight'."""
    parts = key.split(".")
    if parts[0] == "blocks":
        parts = ["blk", parts[1], *[p for p in parts[2:] if p not in ("attn", "ffn")]]
    name = ".".join(parts)
    return name if name.endswith((".weight", ".bias")) else name + ".weight"


def state_key(model: HybridModel) -> dict[str, str]:
    """GGUF name -> state-dict key, for every tensor of `model`."""
    return {gguf_name(k): k for k in model.state_dict()}
