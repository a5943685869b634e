"""The reference's parameter names (transformers') and GGUF tensor names, one table both ways.

    model.embed_tokens.weight                  token_embd.weight
    model.layers.3.self_attn.q_proj.weight     blk.3.attn_q.weight
    model.layers.3.mlp.router.bias             blk.3.ffn_gate_inp.bias
    model.layers.3.mlp.experts.gate_proj       blk.3.ffn_gate_exps.weight
    model.layers.3.mlp.experts.post_norm       blk.3.post_ffw_norm_exps.weight   (Gemma-style blocks)
"""

from __future__ import annotations

from collections.abc import Iterable

_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.router": "ffn_gate_inp",
          "mlp.experts.gate_proj": "ffn_gate_exps", "mlp.experts.up_proj": "ffn_up_exps",
          "mlp.experts.down_proj": "ffn_down_exps", "self_attn.post_norm": "post_attention_norm",
          "mlp.post_norm": "post_ffw_norm", "mlp.experts.post_norm": "post_ffw_norm_exps"}
_LAYERS = "model.layers."


def gguf_name(key: str) -> str:
    """A state-dict key of the reference -> its GGUF tensor name (KeyError for a key with none)."""
    suffix = ""
    if key.endswith((".weight", ".bias")):
        key, suffix = key.rsplit(".", 1)
        suffix = "." + suffix
    if key.startswith(_LAYERS):
        layer, rest = key[len(_LAYERS):].split(".", 1)
        return f"blk.{int(layer)}.{_BLOCK[rest]}{suffix or '.weight'}"
    return _TOP[key] + (suffix or ".weight")


def state_key(model_or_keys) -> dict[str, str]:
    """GGUF name -> state-dict key, for every tensor of a model (or of an iterable of state-dict keys)."""
    keys: Iterable[str] = model_or_keys.state_dict() if hasattr(model_or_keys, "state_dict") else model_or_keys
    return {gguf_name(k): k for k in keys}
