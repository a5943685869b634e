"""Dense HF checkpoint -> standard llama.cpp GGUF (`llama`, `qwen2`, `qwen3`, `gemma3`).

The same file llama.cpp's `convert_hf_to_gguf.py` writes (tests hold the two side
by side), but streamed: tensors are memory-mapped and converted one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from .checkpoint import Checkpoint
from .ggufout import OutType, TensorOut, tensor_qtype, write_gguf
from .metadata import add_general, add_transformer_hparams
from .spec import DenseSpec, load_dense_spec
from .vocab import add_vocab


def rope_interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> the interleaved pairs llama.cpp's `llama` RoPE expects."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_uninterleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `rope_interleave`: llama.cpp's interleaved q/k rows -> HF rotate-half."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _loader(ckpt: Checkpoint, hf_name: str, n_head_permute: int = 0, add: float = 0.0, rows: int | None = None):
    """Load one tensor: RoPE rows interleaved (`n_head_permute`), `add` added (Gemma's norm gain - 1 -> gain),
    the first `rows` rows kept (Gemma's embedding without the rows its tokenizer never uses), as upstream."""
    def load() -> np.ndarray:
        data = ckpt.get(hf_name)
        if rows is not None:
            data = data[:rows]
        if add:
            data = data + np.asarray(add, dtype=data.dtype)
        return rope_interleave(data, n_head_permute) if n_head_permute else data
    return load


def tokenizer_rows(hf_dir: Path) -> int:
    """How many embedding rows upstream's Gemma 3 converter keeps: the tokenizer's tokens (tokenizer.model's
    pieces, else tokenizer.json's vocabulary plus its added tokens, counted as upstream counts them)."""
    if (hf_dir / "tokenizer.model").is_file():
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(hf_dir / "tokenizer.model"))
        return sp.vocab_size()
    with open(hf_dir / "tokenizer.json", encoding="utf-8") as f:
        tok = json.load(f)
    return len(tok["model"]["vocab"]) + len(tok["added_tokens"])


def gguf_names(spec: DenseSpec) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, for every tensor of a checkpoint of `spec` (gguf-py's map, which
    upstream's converter uses)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.dense_gguf_arch.upper()], spec.n_layer)
    return {hf: names.get_name(hf, try_suffixes=(".weight", ".bias")) for hf in spec.hf_tensor_shapes()}


def dense_tensors(spec: DenseSpec, ckpt: Checkpoint, outtype: OutType) -> list[TensorOut]:
    """Every GGUF tensor of the dense export, in checkpoint order, not yet loaded."""
    arch = gguf.MODEL_ARCH[spec.dense_gguf_arch.upper()]
    names = gguf.get_tensor_name_map(arch, spec.n_layer)
    permute = spec.dense_gguf_arch == "llama"  # llama.cpp's llama uses interleaved (NORM) RoPE
    embed_rows = None
    if spec.family == "gemma3":
        embed_rows = min(tokenizer_rows(ckpt.dir), spec.vocab_size)
    out = []
    for hf_name in ckpt.names():
        if spec.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AssertionError(f"no GGUF name for {hf_name}")  # Checkpoint.check() let it through
        n_head = 0
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            n_head = spec.n_head
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            n_head = spec.n_head_kv
        shape = ckpt.shape(hf_name)
        add = spec.norm_offset if hf_name.endswith("norm.weight") else 0.0
        rows = embed_rows if hf_name == "model.embed_tokens.weight" and embed_rows is not None else None
        if rows is not None:
            shape = (rows, *shape[1:])
        out.append(TensorOut(name, shape, tensor_qtype(name, shape, outtype),
                             _loader(ckpt, hf_name, n_head, add, rows)))
    return out


def export_dense(hf_dir: Path, out_path: Path, outtype: OutType = OutType.F16,
                 pre_tokenizer: str | None = None, progress: bool = True) -> None:
    """Convert a dense HF checkpoint to a standard llama.cpp GGUF at `out_path` (atomically)."""
    hf_dir = Path(hf_dir)
    spec = load_dense_spec(hf_dir)
    ckpt = Checkpoint(hf_dir)
    ckpt.check(spec)
    tensors = dense_tensors(spec, ckpt, outtype)

    def metadata(writer: gguf.GGUFWriter) -> None:
        add_dense_metadata(writer, spec, hf_dir, outtype, pre_tokenizer)

    write_gguf(out_path, spec.dense_gguf_arch, tensors, metadata, progress=progress, desc="dense export")


def add_dense_metadata(writer: gguf.GGUFWriter, spec: DenseSpec, hf_dir: Path, outtype: OutType,
                       pre_tokenizer: str | None = None) -> None:
    """The KV section upstream's converter writes for a dense model of `spec` (its depth and FFN width)."""
    add_general(writer, hf_dir, outtype)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    add_transformer_hparams(writer, spec)
    if spec.dense_gguf_arch == "llama":
        writer.add_vocab_size(spec.vocab_size)
        writer.add_rope_dimension_count(spec.head_dim)
    if spec.family == "gemma3":
        # what upstream's Gemma 3 converter adds: the window (the 5:1 pattern and the local RoPE base 10000
        # are llama.cpp's gemma3 defaults, which upstream leaves out of the file; stock_export.py writes them)
        if "rms_norm_eps" not in spec.config:
            writer.add_layer_norm_rms_eps(spec.rms_eps)
        if "rope_theta" not in spec.config:
            writer.add_rope_freq_base(spec.rope_theta)
        if spec.config.get("head_dim") is None:
            writer.add_key_length(spec.head_dim)
            writer.add_value_length(spec.head_dim)
        if "rope_local_base_freq" in spec.config:
            writer.add_rope_freq_base_swa(spec.rope_theta_swa)
        if spec.sliding_window:
            writer.add_sliding_window(spec.sliding_window)
    add_vocab(writer, hf_dir, spec.vocab_size, pre_tokenizer, spec.family)
