"""The dense2moe architecture in plain PyTorch: the reference every llama.cpp number is held against, and
the layers of the transformers class (modeling_dense2moe.py) that `--save-hf` ships beside the weights.

A decoder stack whose blocks vary per layer:

    x = x + attention(rms_norm(x))          if the block has attention
    x = x + mlp(rms_norm(x))                a dense SwiGLU MLP, or a mixture of experts:
        p = softmax(router(h));  top-k of p;  optional renormalisation;  sum_k w_k * expert_k(h)

RMSNorm, RoPE in the rotate-half (NEOX) layout, GQA, optional q/k/v bias and q/k norm. Gemma-style blocks
add what Gemma 3 has: embeddings scaled by `embedding_scale`, GeGLU (tanh GELU) instead of SwiGLU, an RMSNorm
on the attention's output and on the MLP's output (in a mixture, on each expert's output, with the gain of
its source layer), per-block sliding-window attention with its own RoPE base, and a set attention scale.
Norm gains are stored as the multiplier itself (Gemma's `1 + w`, as llama.cpp stores it). Parameter names
are transformers' (`model.layers.3.self_attn.q_proj.weight`, `model.layers.3.mlp.router.weight`,
`model.layers.3.mlp.experts.gate_proj`); tensor_names.py maps them to GGUF names one to one.

This file imports nothing but torch: it is copied into every dense2moe checkpoint, where it runs
without d2m_gguf.
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
    sliding: bool = False   # the attention sees the last `sliding_window` positions only (HybridConfig)

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
    # Gemma-style blocks (the defaults are Llama's)
    ffn_activation: str = "silu"      # "silu": SwiGLU; "gelu": GeGLU with tanh-approximated GELU
    embedding_scale: float = 1.0      # token embeddings are multiplied by it (Gemma: sqrt(n_embd))
    post_norms: bool = False          # RMSNorm on the attention output and on each MLP's (expert's) output
    sliding_window: int = 0           # window of the blocks whose BlockConfig says `sliding`
    rope_theta_swa: float = 0.0       # RoPE base of those blocks (0: rope_theta)
    attention_scale: float = 0.0      # softmax scale of q.k (0: 1/sqrt(head_dim))

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


def activation(name: str):
    """The gate's nonlinearity of a gated MLP: SwiGLU's SiLU or GeGLU's tanh-approximated GELU (Gemma);
    `gelu_ggml` is the GELU llama.cpp's CPU backend computes (gelu_f16_table)."""
    if name == "silu":
        return F.silu
    if name == "gelu":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu_ggml":
        return gelu_f16_table
    raise ValueError(f"unknown FFN activation {name!r} (silu or gelu)")


def gelu_f16_table(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU (GGML_GELU_FP16): a table of tanh-GELU over every f16 input, so the input is rounded to
    f16 and the output is f16; 0 below -10, identity above 10."""
    h = x.to(torch.float16).float()
    table = F.gelu(h, approximate="tanh").to(torch.float16).to(x.dtype)
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight


class ScaledEmbedding(nn.Embedding):
    """Token embedding times a constant (Gemma's sqrt(n_embd)); a tied LM head reads the unscaled table."""

    def __init__(self, vocab_size: int, n_embd: int, scale: float = 1.0):
        super().__init__(vocab_size, n_embd)
        self.scale = scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = super().forward(tokens)
        return x if self.scale == 1.0 else x * self.scale


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for positions [T] ([T, D]) or per sequence [B, T] ([B, 1, T, D], to meet q [B, H, T, D])."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim))
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    if positions.dim() == 2:
        angles = angles[:, None]
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotate-half RoPE (llama.cpp's NEOX mode)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class AttentionInputs:
    """RoPE tables and mask of one kind of attention. `mask`: boolean [B, 1, T, S] (True: attend), or None for
    plain causal attention over the block's input alone."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Positions:
    """What every block's attention needs besides its input: for full attention, and (models with
    sliding-window blocks) for the windowed kind, whose RoPE base and mask differ."""

    full: AttentionInputs
    sliding: AttentionInputs | None = None

    def of(self, sliding: bool) -> AttentionInputs:
        return self.sliding if sliding else self.full


def window_mask(mask: torch.Tensor | None, n_queries: int, window: int) -> torch.Tensor | None:
    """`mask` (None: causal over the queries) narrowed to the last `window` key positions of each query: the
    queries are the last n_queries of the keys (llama.cpp's standard sliding window: p_q - p_k < window)."""
    n_keys = n_queries if mask is None else mask.shape[-1]
    if mask is None and n_queries <= window:
        return None
    q = torch.arange(n_keys - n_queries, n_keys)[:, None]
    k = torch.arange(n_keys)[None, :]
    near = (q - k < window) & (k <= q) if mask is None else q - k < window
    return near[None, None] if mask is None else mask & near.to(mask.device)


class Attention(nn.Module):
    """Self-attention of one block; `cache_index` numbers the blocks that have attention (the KV cache
    holds entries for those alone)."""

    def __init__(self, cfg: HybridConfig, cache_index: int = 0, sliding: bool = False):
        super().__init__()
        self.cfg = cfg
        self.cache_index = cache_index
        self.sliding = sliding
        d, hd = cfg.n_embd, cfg.head_dim
        self.q_proj = Linear(d, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(d, cfg.n_head_kv * hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(d, cfg.n_head_kv * hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_head * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_eps)
        if cfg.post_norms:
            self.post_norm = RMSNorm(d, cfg.rms_eps)

    def forward(self, h: torch.Tensor, pos: Positions, cache=None) -> torch.Tensor:
        """h: the normed input [B, T, D]. `cache`: a transformers Cache (update(k, v, index) -> all keys,
        values)."""
        cfg = self.cfg
        inputs = pos.of(self.sliding)
        B, T, _ = h.shape
        q = self.q_proj(h).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.k_proj(h).view(B, T, cfg.n_head_kv, cfg.head_dim)
        v = self.v_proj(h).view(B, T, cfg.n_head_kv, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        cos, sin, mask = inputs.cos.to(q.dtype), inputs.sin.to(q.dtype), inputs.mask
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=cfg.attention_scale or None, enable_gqa=cfg.n_head != cfg.n_head_kv)
        out = self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))
        return self.post_norm(out) if cfg.post_norms else out


class DenseFFN(nn.Module):
    """A gated MLP (SwiGLU or GeGLU), its output RMS-normed in Gemma-style blocks (`post_norm`)."""

    def __init__(self, cfg: HybridConfig, n_ff: int):
        super().__init__()
        n_embd = cfg.n_embd
        self.act_fn = activation(cfg.ffn_activation)
        self.gate_proj = Linear(n_embd, n_ff, bias=False)
        self.up_proj = Linear(n_embd, n_ff, bias=False)
        self.down_proj = Linear(n_ff, n_embd, bias=False)
        if cfg.post_norms:
            self.post_norm = RMSNorm(n_embd, cfg.rms_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(self.act_fn(self.gate_proj(h)) * self.up_proj(h))
        return self.post_norm(out) if hasattr(self, "post_norm") else out


def load_balance(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balance loss: E * sum_e (share of routed slots to e) * (mean probability of e).
    1.0 when routing is uniform; larger when a few experts take the tokens."""
    n_expert, k = probs.shape[-1], selected.shape[-1]
    routed = torch.zeros_like(probs).scatter_(-1, selected, 1.0).mean(0) / k
    return n_expert * (routed * probs.mean(0)).sum()


class Experts(nn.Module):
    """The gated-MLP experts of one MoE block, stacked: gate_proj/up_proj [E, F, D], down_proj [E, D, F]; in
    Gemma-style blocks each expert's output is RMS-normed with its own gain, post_norm [E, D] (the expert
    computes what its source layer's MLP computed, post-norm included)."""

    def __init__(self, cfg: HybridConfig, n_ff: int, n_expert: int):
        super().__init__()
        n_embd = cfg.n_embd
        self.act_fn = activation(cfg.ffn_activation)
        self.eps = cfg.rms_eps
        self.gate_proj = nn.Parameter(torch.zeros(n_expert, n_ff, n_embd))
        self.up_proj = nn.Parameter(torch.zeros(n_expert, n_ff, n_embd))
        self.down_proj = nn.Parameter(torch.zeros(n_expert, n_embd, n_ff))
        if cfg.post_norms:
            self.post_norm = nn.Parameter(torch.ones(n_expert, n_embd))
        self.act: dict[str, str | None] = {}   # activation rounding per tensor (round_activations)

    def __len__(self) -> int:
        return self.gate_proj.shape[0]

    def forward(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e's output for tokens h [N, D]."""
        g = round_activations(h, self.act.get("gate_proj")) @ self.gate_proj[e].T
        u = round_activations(h, self.act.get("up_proj")) @ self.up_proj[e].T
        out = round_activations(self.act_fn(g) * u, self.act.get("down_proj")) @ self.down_proj[e].T
        return rms_normalize(out, self.eps) * self.post_norm[e] if hasattr(self, "post_norm") else out

    def every(self, h: torch.Tensor) -> torch.Tensor:
        """Every expert's output for tokens h [N, D] -> [N, E, D] (training: all experts, unrounded)."""
        g = torch.einsum("nd,efd->nef", h, self.gate_proj)
        u = torch.einsum("nd,efd->nef", h, self.up_proj)
        out = torch.einsum("nef,edf->ned", self.act_fn(g) * u, self.down_proj)
        return rms_normalize(out, self.eps) * self.post_norm if hasattr(self, "post_norm") else out


class MoEFFN(nn.Module):
    """Softmax router over SwiGLU experts, top-k, llama.cpp's `build_moe_ffn` semantics."""

    def __init__(self, cfg: HybridConfig, n_ff: int, n_expert: int, n_expert_used: int):
        super().__init__()
        self.n_expert_used = n_expert_used
        self.normalize = cfg.normalize_topk
        self.router = nn.Linear(cfg.n_embd, n_expert, bias=True)
        self.experts = Experts(cfg, n_ff, n_expert)
        self.last_selection: torch.Tensor | None = None  # [tokens, k] expert ids of the last forward
        self.last_balance: torch.Tensor | None = None    # load-balance loss of the last training forward

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities [N, E], selected experts [N, k], their weights [N, k]) for tokens h [N, D].

        Top-1 with renormalisation always weighs the chosen expert 1, so the loss would send the
        router no gradient; in training the weight is p / stop_grad(p): still 1, with the
        gradient of log p (straight through), so distillation can teach the router too. A frozen
        router (heal.frozen_routers) learns nothing, so it sends no such gradient into h either."""
        probs = torch.softmax(self.router(h).float(), dim=-1)
        picked, selected = torch.topk(probs, self.n_expert_used, dim=-1)
        weights = picked
        if self.normalize:
            weights = picked / picked.sum(-1, keepdim=True).clamp_min(_TOPK_SUM_MIN)
            if self.training and self.n_expert_used == 1 and self.router.weight.requires_grad:
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
        for e in range(len(self.experts)):
            rows, slot = torch.nonzero(selected == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, (weights[rows, slot, None] * self.experts(e, h[rows])).to(out.dtype))
        return out.reshape(shape)


class Block(nn.Module):
    """One decoder block: attention (optional) and an MLP (dense or MoE), each behind an RMSNorm."""

    def __init__(self, cfg: HybridConfig, bc: BlockConfig, cache_index: int = 0):
        super().__init__()
        self.has_attention = bc.attention
        if bc.attention:
            self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_eps)
            self.self_attn = Attention(cfg, cache_index, bc.sliding)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        if bc.is_moe:
            self.mlp = MoEFFN(cfg, bc.n_ff, bc.n_expert, bc.n_expert_used)
        else:
            self.mlp = DenseFFN(cfg, bc.n_ff)

    def attention(self, x: torch.Tensor, pos: Positions, cache=None):
        """What the attention adds to the residual stream x, or None in a block without attention."""
        return self.self_attn(self.input_layernorm(x), pos, cache) if self.has_attention else None

    def contributions(self, x: torch.Tensor, pos: Positions, cache=None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What the block adds to the residual stream: (attention output or None, MLP output)."""
        a = self.attention(x, pos, cache)
        h = x if a is None else x + a
        return a, self.mlp(self.post_attention_layernorm(h))

    def forward(self, x: torch.Tensor, pos: Positions, cache=None) -> torch.Tensor:
        a, f = self.contributions(x, pos, cache)
        return (x if a is None else x + a) + f


def attention_inputs(cfg: HybridConfig, positions: torch.Tensor, mask: torch.Tensor | None = None) -> Positions:
    """The Positions of tokens at `positions` ([T] or [B, T]) under `mask` for a model of `cfg`."""
    full = AttentionInputs(*rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta), mask)
    if not any(b.sliding and b.attention for b in cfg.blocks):
        return Positions(full)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta_swa or cfg.rope_theta)
    return Positions(full, AttentionInputs(cos, sin, window_mask(mask, positions.shape[-1], cfg.sliding_window)))


class Decoder(nn.Module):
    """Token embedding, the blocks and the final norm: the residual stream of a dense2moe model."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.n_embd, cfg.embedding_scale)
        cache_index = [sum(b.attention for b in cfg.blocks[:j]) for j in range(cfg.n_layer)]
        self.layers = nn.ModuleList(Block(cfg, bc, i) for bc, i in zip(cfg.blocks, cache_index))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.gradient_checkpointing = False   # transformers' gradient_checkpointing_enable() sets it

    def positions(self, positions: torch.Tensor, mask: torch.Tensor | None = None) -> Positions:
        return attention_inputs(self.cfg, positions, mask)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask=None, cache=None, upto: int | None = None,
                states: list | None = None) -> torch.Tensor:
        """The residual stream after blocks [0, upto) for input embeddings x [B, T, D] at `positions` ([T] or
        [B, T]); `mask`: boolean [B, 1, T, S] (True: attend) or None for causal attention over x alone; each
        block's output is appended to `states` when given."""
        pos = self.positions(positions, mask)
        for block in self.layers[:upto]:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(block.__call__, x, pos, cache)
            else:
                x = block(x, pos, cache)
            if states is not None:
                states.append(x)
        return x


class HybridModel(nn.Module):
    """A dense2moe decoder. `forward(tokens [B, T]) -> logits [B, T, vocab]` (float32)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head_act: str | None = None  # activation rounding of the LM head (round_activations)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def embed_tokens(self) -> ScaledEmbedding:
        return self.model.embed_tokens

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def hidden_states(self, tokens: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Residual stream before block 0, after each block (up to block `upto`, exclusive)."""
        states = [self.model.embed_tokens(tokens)]
        self.model(states[0], torch.arange(tokens.shape[1], device=tokens.device), upto=upto, states=states)
        return states

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.hidden_states(tokens)[-1]
        return round_activations(self.model.norm(x), self.lm_head_act) @ self.lm_head_weight().T

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


# -- the configuration in transformers' words ----------------------------------------------------

# HybridConfig field -> config.json key (Llama/Qwen names where transformers has one)
HF_KEYS = {"vocab_size": "vocab_size", "n_embd": "hidden_size", "n_head": "num_attention_heads",
           "n_head_kv": "num_key_value_heads", "head_dim": "head_dim", "n_ctx_train": "max_position_embeddings",
           "rms_eps": "rms_norm_eps", "rope_theta": "rope_theta", "qkv_bias": "attention_bias",
           "o_bias": "attention_output_bias", "qk_norm": "qk_norm", "tie_word_embeddings": "tie_word_embeddings",
           "normalize_topk": "norm_topk_prob", "ffn_activation": "ffn_activation",
           "embedding_scale": "embedding_scale", "post_norms": "post_norms", "sliding_window": "sliding_attention_window",
           "rope_theta_swa": "rope_local_base_freq", "attention_scale": "attention_scale"}
# BlockConfig field -> key of one entry of config.json's `layers`
HF_BLOCK_KEYS = {"attention": "attention", "n_ff": "intermediate_size", "n_expert": "num_experts",
                 "n_expert_used": "num_experts_per_tok", "sliding": "sliding_attention"}


def hf_config_dict(cfg: HybridConfig) -> dict:
    """`cfg` as the keys of a transformers config.json (Dense2MoEConfig's arguments)."""
    out = {hf: getattr(cfg, field) for field, hf in HF_KEYS.items()}
    out["layers"] = [{hf: getattr(b, field) for field, hf in HF_BLOCK_KEYS.items()} for b in cfg.blocks]
    return out


def hybrid_config_of(config) -> HybridConfig:
    """The HybridConfig of a Dense2MoEConfig."""
    blocks = tuple(BlockConfig(**{field: b[hf] for field, hf in HF_BLOCK_KEYS.items() if hf in b})
                   for b in config.layers)
    return HybridConfig(**{field: getattr(config, hf) for field, hf in HF_KEYS.items() if hasattr(config, hf)},
                        blocks=blocks)
