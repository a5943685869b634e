"""The `dense2moe` GGUF contract: one vocabulary of names for the writer, the reader and the validator.

The llama.cpp patch (patches/) implements the same names; docs/gguf-format.md
explains them. Standard llama.cpp names are used wherever one fits: the per-layer
arrays reuse `expert_count` / `expert_used_count` / `feed_forward_length` (llama.cpp
already reads those either as a scalar or as one value per layer); only
`attention.present` is new.
"""

from __future__ import annotations

import gguf

ARCH = "dense2moe"
FORMAT_VERSION = 1

# the stock llama.cpp architectures d2m writes where they compute the model exactly (stock_export.py)
DECI = "deci"
STOCK_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", DECI)
INTERLEAVED_ROPE_ARCHS = ("llama", DECI)   # llama.cpp's NORM RoPE: q/k rows permuted from HF's rotate-half
STOCK_RUNTIME = "stock llama.cpp"
PATCHED_RUNTIME = "the patched llama.cpp"


def runtime_of(arch: str) -> str:
    """Which llama.cpp runs a file whose `general.architecture` is `arch`."""
    return PATCHED_RUNTIME if arch == ARCH else STOCK_RUNTIME

T = gguf.MODEL_TENSOR


class Keys:
    """Metadata keys (with `{arch}` filled in for the dense2moe ones)."""

    BLOCK_COUNT = gguf.Keys.LLM.BLOCK_COUNT.format(arch=ARCH)
    FEED_FORWARD_LENGTH = gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH)        # u32[n_layer]
    EXPERT_COUNT = gguf.Keys.LLM.EXPERT_COUNT.format(arch=ARCH)                      # u32[n_layer], 0 = dense FFN
    EXPERT_USED_COUNT = gguf.Keys.LLM.EXPERT_USED_COUNT.format(arch=ARCH)            # u32[n_layer], 0 = dense FFN
    EXPERT_WEIGHTS_NORM = gguf.Keys.LLM.EXPERT_WEIGHTS_NORM.format(arch=ARCH)        # bool
    EXPERT_GATING_FUNC = gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch=ARCH)          # u32, 1 = softmax
    ATTENTION_PRESENT = f"{ARCH}.attention.present"                                  # bool[n_layer]
    HEAD_COUNT = gguf.Keys.Attention.HEAD_COUNT.format(arch=ARCH)
    HEAD_COUNT_KV = gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=ARCH)
    KEY_LENGTH = gguf.Keys.Attention.KEY_LENGTH.format(arch=ARCH)
    VALUE_LENGTH = gguf.Keys.Attention.VALUE_LENGTH.format(arch=ARCH)
    RMS_EPS = gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=ARCH)
    EMBEDDING_LENGTH = gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=ARCH)
    CONTEXT_LENGTH = gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=ARCH)
    VOCAB_SIZE = gguf.Keys.LLM.VOCAB_SIZE.format(arch=ARCH)
    ROPE_FREQ_BASE = gguf.Keys.Rope.FREQ_BASE.format(arch=ARCH)
    ROPE_DIMENSION_COUNT = gguf.Keys.Rope.DIMENSION_COUNT.format(arch=ARCH)
    # Gemma-style blocks (each absent from a Llama-style file)
    EMBEDDING_SCALE = gguf.Keys.LLM.EMBEDDING_SCALE.format(arch=ARCH)                # f32
    FFN_ACTIVATION = f"{ARCH}.feed_forward_activation"                               # "silu" | "gelu"
    SLIDING_WINDOW = gguf.Keys.Attention.SLIDING_WINDOW.format(arch=ARCH)            # u32
    SLIDING_WINDOW_PATTERN = gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=ARCH)  # bool[n_layer]
    ROPE_FREQ_BASE_SWA = gguf.Keys.Rope.FREQ_BASE_SWA.format(arch=ARCH)              # f32
    ATTENTION_SCALE = gguf.Keys.Attention.SCALE.format(arch=ARCH)                    # f32

    # provenance: where the model came from and how it was made
    FORMAT = "d2m.format_version"
    SOURCE_MODEL = "d2m.source.model"
    SOURCE_ARCH = "d2m.source.architecture"
    SOURCE_LAYERS = "d2m.source.block_count"
    PLAN = "d2m.plan"               # the fusion plan, JSON
    METHOD = "d2m.method"           # lfuc | prune | attn-prune | upcycle | manual
    HEALING = "d2m.healing"         # what healing ran, JSON


# each expert's output norm in a Gemma-style MoE block, [n_expert, n_embd]: new in the patch (gguf-py lacks it)
FFN_POST_NORM_EXPS = "blk.{bid}.post_ffw_norm_exps"


def tensor_name(kind: gguf.MODEL_TENSOR | str, bid: int | None = None, suffix: str = "weight") -> str:
    """GGUF name of a tensor, e.g. tensor_name(T.FFN_GATE_EXP, 3) == 'blk.3.ffn_gate_exps.weight'."""
    base = kind if isinstance(kind, str) else gguf.TENSOR_NAMES[kind]
    return f"{base.format(bid=bid) if bid is not None else base}.{suffix}"


# tensors of an attention sub-block; none may exist in a layer flagged attention-free
ATTENTION_TENSORS = (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.ATTN_Q_NORM, T.ATTN_K_NORM,
                     T.ATTN_POST_NORM)
DENSE_FFN_TENSORS = (T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)
MOE_FFN_TENSORS = (T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP)
