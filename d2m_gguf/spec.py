"""The dense source model, described once: what every later stage needs from config.json.

`DenseSpec` is the typed boundary between "some HF checkpoint directory" and the
rest of the pipeline. Family differences (qkv bias, q/k norm, tied embeddings,
RoPE layout, Gemma's norms, activation and sliding window) are fields here, so the
planner, the reference model and the writers never look at config.json themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import D2MError

# HF architecture class -> (family, the standard llama.cpp architecture of its dense export)
FAMILIES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("mistral", "llama"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
    "Gemma3ForCausalLM": ("gemma3", "gemma3"),
}
# HF's name of the norm before the MLP (Gemma's `post_attention_layernorm` norms the attention's output)
_FFN_NORM = {"gemma3": "pre_feedforward_layernorm"}


@dataclass(frozen=True)
class DenseSpec:
    """Hyperparameters of a dense decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3 / Gemma 3)."""

    family: str
    hf_architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    rope_scaling: dict[str, Any] | None = None
    # Gemma 3 (the defaults are Llama's; model.HybridConfig carries the same fields)
    ffn_activation: str = "silu"              # "gelu": GeGLU with tanh GELU
    embedding_scale: float = 1.0              # sqrt(n_embd)
    post_norms: bool = False                  # RMSNorm on the attention's and the MLP's outputs
    norm_offset: float = 0.0                  # the checkpoint stores norm gains minus this (Gemma: 1)
    sliding_window: int = 0                   # window of the layers in swa_layers
    swa_layers: tuple[bool, ...] = ()         # per layer: sliding-window attention (empty: none)
    rope_theta_swa: float = 0.0               # their RoPE base
    attention_scale: float = 0.0              # q.k scale (0: 1/sqrt(head_dim))
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ffn_norm(self) -> str:
        """HF's name of a layer's norm before its MLP."""
        return _FFN_NORM.get(self.family, "post_attention_layernorm")

    def is_sliding(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]

    @property
    def dense_gguf_arch(self) -> str:
        return FAMILIES[self.hf_architecture][1]

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    def hf_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor an HF checkpoint of this spec must hold, with its shape."""
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, self.n_embd),
            "model.norm.weight": (self.n_embd,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.n_embd)
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (self.n_embd,),
                p + self.ffn_norm + ".weight": (self.n_embd,),
                p + "self_attn.q_proj.weight": (self.n_embd_q, self.n_embd),
                p + "self_attn.k_proj.weight": (self.n_embd_kv, self.n_embd),
                p + "self_attn.v_proj.weight": (self.n_embd_kv, self.n_embd),
                p + "self_attn.o_proj.weight": (self.n_embd, self.n_embd_q),
                p + "mlp.gate_proj.weight": (self.n_ff, self.n_embd),
                p + "mlp.up_proj.weight": (self.n_ff, self.n_embd),
                p + "mlp.down_proj.weight": (self.n_embd, self.n_ff),
            })
            if self.qkv_bias:
                shapes[p + "self_attn.q_proj.bias"] = (self.n_embd_q,)
                shapes[p + "self_attn.k_proj.bias"] = (self.n_embd_kv,)
                shapes[p + "self_attn.v_proj.bias"] = (self.n_embd_kv,)
            if self.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (self.n_embd,)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (self.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (self.head_dim,)
            if self.post_norms:
                shapes[p + "post_attention_layernorm.weight"] = (self.n_embd,)
                shapes[p + "post_feedforward_layernorm.weight"] = (self.n_embd,)
        return shapes


def _require(config: dict[str, Any], key: str, where: Path) -> Any:
    if key not in config:
        raise D2MError(f"{where}: missing required key '{key}'")
    return config[key]


def load_config(hf_dir: Path) -> dict[str, Any]:
    hf_dir = Path(hf_dir)
    if not hf_dir.exists():
        raise D2MError(f"{hf_dir}: no such directory")
    if not hf_dir.is_dir():
        raise D2MError(f"{hf_dir}: not a directory (expected a Hugging Face checkpoint directory)")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise D2MError(f"{path}: missing (not a Hugging Face checkpoint directory?)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise D2MError(f"{path}: cannot read: {e}") from e
    except json.JSONDecodeError as e:
        raise D2MError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(config, dict):
        raise D2MError(f"{path}: expected a JSON object")
    return config


SOURCE_CONFIG_KEY = "d2m_source_config"   # a dense2moe config.json keeps its source's config under this key


def load_dense_spec(hf_dir: Path) -> DenseSpec:
    """Read config.json of an HF checkpoint and describe it, or say clearly why not."""
    hf_dir = Path(hf_dir)
    config = load_config(hf_dir)
    where = hf_dir / "config.json"
    if _architecture(config) == "Dense2MoEForCausalLM":   # an upcycled checkpoint: the spec of its source
        if not isinstance(config.get(SOURCE_CONFIG_KEY), dict):
            raise D2MError(f"{where}: a dense2moe checkpoint without {SOURCE_CONFIG_KEY}: write it with `convert.py "
                           f"SOURCE_DIR OUT.gguf --from-checkpoint {hf_dir}` (SOURCE_DIR: the dense model it came from)")
        return dense_spec(config[SOURCE_CONFIG_KEY], f"{where} {SOURCE_CONFIG_KEY}")
    return dense_spec(config, where)


def _architecture(config: dict[str, Any]) -> str | None:
    archs = config.get("architectures") or []
    return archs[0] if isinstance(archs, list) and archs else None


def dense_spec(config: dict[str, Any], where) -> DenseSpec:
    """The DenseSpec of a dense model's config.json contents (`where`: for messages)."""
    arch = _architecture(config)
    if arch not in FAMILIES:
        supported = ", ".join(FAMILIES)
        raise D2MError(f"{where}: architecture {arch!r} is not supported (supported: {supported})")
    family = FAMILIES[arch][0]

    n_embd = int(_require(config, "hidden_size", where))
    n_head = int(_require(config, "num_attention_heads", where))
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    for key, value in (("hidden_size", n_embd), ("num_attention_heads", n_head), ("num_key_value_heads", n_head_kv)):
        if value <= 0:
            raise D2MError(f"{where}: '{key}' must be positive, got {value}")
    if n_head % n_head_kv:
        raise D2MError(f"{where}: num_attention_heads ({n_head}) is not a multiple of num_key_value_heads ({n_head_kv})")
    if family == "mistral" and config.get("sliding_window") not in (None, 0):
        max_pos = int(config.get("max_position_embeddings", 0))
        if int(config["sliding_window"]) < max_pos:
            raise D2MError(f"{where}: sliding-window attention (sliding_window={config['sliding_window']}) is not supported")

    rope_scaling = config.get("rope_scaling") or None
    if rope_scaling is not None:
        raise D2MError(f"{where}: rope_scaling {rope_scaling!r} is not supported yet (only plain RoPE)")
    if config.get("mlp_bias"):
        raise D2MError(f"{where}: mlp_bias=true is not supported")
    attention_bias = bool(config.get("attention_bias", False))
    gemma = _gemma3_fields(config, where, n_embd, n_layer=int(_require(config, "num_hidden_layers", where))) \
        if family == "gemma3" else {}
    return DenseSpec(
        family=family,
        hf_architecture=arch,
        n_layer=int(_require(config, "num_hidden_layers", where)),
        n_embd=n_embd,
        n_ff=int(_require(config, "intermediate_size", where)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        vocab_size=int(_require(config, "vocab_size", where)),
        n_ctx_train=int(config.get("max_position_embeddings", 2048)),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", 1e6 if family == "gemma3" else 10000.0)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias or family == "qwen2",
        o_bias=attention_bias and family != "qwen2",
        qk_norm=family in ("qwen3", "gemma3"),
        rope_scaling=rope_scaling,
        config=config,
        **gemma,
    )


GEMMA3_GLOBAL_EVERY = 6            # a period without a per-layer list: every 6th layer attends globally
GEMMA3_ROPE_BASE_LOCAL = 10000.0   # the sliding layers' RoPE base where a file or config leaves it out


def every_nth_global(n_layer: int, every: int = GEMMA3_GLOBAL_EVERY) -> tuple[bool, ...]:
    """Sliding flags from a period (older transformers configs, llama.cpp's scalar pattern): layer i is global
    when (i + 1) % every == 0."""
    if every <= 0:
        raise D2MError(f"a sliding-window pattern of {every}: every n-th layer is global, n must be positive")
    return tuple((i + 1) % every != 0 for i in range(n_layer))


def _gemma3_fields(config: dict[str, Any], where, n_embd: int, n_layer: int) -> dict[str, Any]:
    """Gemma 3's differences from Llama, read as transformers' Gemma3TextConfig reads them; what the
    toolchain does not compute is refused by name."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(key) is not None:
            raise D2MError(f"{where}: {key}={config[key]} is not supported")
    if config.get("use_bidirectional_attention"):
        raise D2MError(f"{where}: use_bidirectional_attention=true (an embedding model) is not supported")
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise D2MError(f"{where}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
    layer_types = config.get("layer_types")
    if layer_types is None:   # older configs: a period
        every = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern")
                    or GEMMA3_GLOBAL_EVERY)
        layer_types = ["sliding_attention" if s else "full_attention" for s in every_nth_global(n_layer, every)]
    if len(layer_types) != n_layer or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise D2MError(f"{where}: layer_types must list sliding_attention or full_attention for each of the "
                       f"{n_layer} layers")
    window = int(config.get("sliding_window") or 0)
    swa = tuple(t == "sliding_attention" for t in layer_types) if window > 0 else ()
    return dict(ffn_activation="gelu", embedding_scale=n_embd ** 0.5, post_norms=True, norm_offset=1.0,
                sliding_window=window, swa_layers=swa,
                rope_theta_swa=float(config.get("rope_local_base_freq", GEMMA3_ROPE_BASE_LOCAL)),
                attention_scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5)
