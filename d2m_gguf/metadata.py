"""GGUF metadata shared by every model this project writes (dense or dense2moe).

The values are those llama.cpp's own converter writes for the same checkpoint, so
that a dense export can be held against upstream key by key; the writers add only
what their architecture needs on top (block counts, per-layer arrays).
"""

from __future__ import annotations

from pathlib import Path

import gguf

from .ggufout import OutType
from .spec import DenseSpec


def add_general(writer: gguf.GGUFWriter, hf_dir: Path, outtype: OutType, name: str | None = None) -> None:
    """general.*: name, size label, authorship from the model card, sampling defaults, file type."""
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, Path(hf_dir), name, total)
    if meta.name is None:
        meta.name = Path(hf_dir).name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    writer.add_file_type(outtype.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_transformer_hparams(writer: gguf.GGUFWriter, spec: DenseSpec) -> None:
    """The hyperparameters every block shares: widths, heads, RoPE, norm epsilon."""
    config = spec.config
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    if "rope_theta" in config:
        writer.add_rope_freq_base(spec.rope_theta)
    if "rms_norm_eps" in config:
        writer.add_layer_norm_rms_eps(spec.rms_eps)
    if config.get("head_dim") is not None:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
