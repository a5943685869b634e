"""A dense2moe model (HybridModel + its plan) -> GGUF, as specified in docs/gguf-format.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from .constants import ARCH, FORMAT_VERSION, Keys
from .ggufout import OutType, TensorOut, tensor_qtype, write_gguf
from .metadata import add_general
from .model import HybridConfig, HybridModel
from .tensor_names import gguf_name
from .plan import FusionPlan
from .spec import DenseSpec
from .weights import Weights, as_weights
from .vocab import add_vocab


def add_shared_hparams(writer: gguf.GGUFWriter, cfg: HybridConfig, n_head: int | list[int],
                       n_head_kv: int | list[int]) -> None:
    """The hyperparameters of `cfg` that dense2moe and deci write alike (heads: one value, or one per layer)."""
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_ctx_train)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)


def add_hybrid_hparams(writer: gguf.GGUFWriter, cfg: HybridConfig) -> None:
    """Shared hyperparameters plus the per-layer arrays that say what each block is."""
    u32 = gguf.GGUFValueType.UINT32
    add_shared_hparams(writer, cfg, cfg.n_head, cfg.n_head_kv)
    writer.add_key_value(Keys.FEED_FORWARD_LENGTH, [b.n_ff for b in cfg.blocks], gguf.GGUFValueType.ARRAY, u32)
    writer.add_key_value(Keys.ATTENTION_PRESENT, [b.attention for b in cfg.blocks],
                         gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)
    writer.add_key_value(Keys.EXPERT_COUNT, [b.n_expert for b in cfg.blocks], gguf.GGUFValueType.ARRAY, u32)
    writer.add_key_value(Keys.EXPERT_USED_COUNT, [b.n_expert_used for b in cfg.blocks], gguf.GGUFValueType.ARRAY, u32)
    writer.add_expert_weights_norm(cfg.normalize_topk)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    add_gemma_hparams(writer, cfg)


def add_gemma_hparams(writer: gguf.GGUFWriter, cfg: HybridConfig) -> None:
    """What Gemma-style blocks add (nothing for a Llama-style model; the output norms are tensors)."""
    if cfg.embedding_scale != 1.0:
        writer.add_embedding_scale(cfg.embedding_scale)
    if cfg.ffn_activation != "silu":
        writer.add_string(Keys.FFN_ACTIVATION, cfg.ffn_activation)
    if cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([b.sliding for b in cfg.blocks])
        writer.add_rope_freq_base_swa(cfg.rope_theta_swa or cfg.rope_theta)
    if cfg.attention_scale:
        writer.add_attention_scale(cfg.attention_scale)


def add_provenance(writer: gguf.GGUFWriter, plan: FusionPlan, spec: DenseSpec, hf_dir: Path,
                   healing: dict[str, Any] | None) -> None:
    """d2m.*: the source, the plan and the healing that made the model (runtimes ignore these keys)."""
    writer.add_uint32(Keys.FORMAT, FORMAT_VERSION)
    writer.add_string(Keys.SOURCE_MODEL, str(spec.config.get("_name_or_path") or Path(hf_dir).name))
    writer.add_string(Keys.SOURCE_ARCH, spec.hf_architecture)
    writer.add_uint32(Keys.SOURCE_LAYERS, plan.source_layers)
    writer.add_string(Keys.METHOD, plan.method)
    writer.add_string(Keys.PLAN, plan.dumps())
    if healing:
        writer.add_string(Keys.HEALING, json.dumps(healing, sort_keys=True))


def hybrid_tensors(model: HybridModel | Weights, outtype: OutType) -> list[TensorOut]:
    """The GGUF tensors of a model (in memory, or `Weights` loaded one at a time as they are written)."""
    weights = as_weights(model)
    out = []
    for key, shape in weights.shapes.items():
        name = gguf_name(key)
        out.append(TensorOut(name, shape, tensor_qtype(name, shape, outtype), lambda k=key: weights.numpy(k)))
    return out


def export_hybrid(model: HybridModel | Weights, plan: FusionPlan, spec: DenseSpec, hf_dir: Path, out_path: Path,
                  outtype: OutType = OutType.F16, pre_tokenizer: str | None = None,
                  healing: dict[str, Any] | None = None, progress: bool = True) -> None:
    """Write `model` as a dense2moe GGUF, with the source's tokenizer and the plan as provenance."""
    hf_dir = Path(hf_dir)

    def metadata(writer: gguf.GGUFWriter) -> None:
        add_general(writer, hf_dir, outtype)
        add_hybrid_hparams(writer, as_weights(model).cfg)
        add_vocab(writer, hf_dir, spec.vocab_size, pre_tokenizer, spec.family)
        add_provenance(writer, plan, spec, hf_dir, healing)

    write_gguf(out_path, ARCH, hybrid_tensors(model, outtype), metadata, progress=progress, desc="dense2moe export")
