"""Reading GGUF files back: inspect any model; validate and load dense2moe ones and the stock ones d2m writes.

Uses the same names as the writer (constants.py), so a file the writer produces
and the checks the validator makes cannot drift apart.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from .constants import ARCH, ATTENTION_TENSORS, FFN_POST_NORM_EXPS, INTERLEAVED_ROPE_ARCHS, STOCK_ARCHS, Keys, T, runtime_of, tensor_name
from .errors import D2MError
from .model import BlockConfig, HybridConfig, HybridModel, activation
from .spec import GEMMA3_GLOBAL_EVERY, GEMMA3_ROPE_BASE_LOCAL, every_nth_global
from .tensor_names import state_key


class GGUFFileReader(gguf.GGUFReader):
    """gguf-py's reader, with a metadata array of numbers read as one view instead of a numpy view per element,
    and every view cut from a plain ndarray over the file mapping (np.memmap's slicing is several times slower).
    A Gemma 3 file (a 262k-token vocabulary: strings, scores, types, 1.3 M views) took 12 s to open, now 3.
    contents() gives the same values; a numeric array's `data` holds one index, not one per element."""

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dt, count = np.dtype(dtype), int(count)
        arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        scalar = None
        if raw_type == gguf.GGUFValueType.ARRAY:
            itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            scalar = self.gguf_scalar_to_np.get(gguf.GGUFValueType(int(itype[0])))
        if scalar is None:
            return super()._get_field_parts(orig_offs, raw_type)
        n = int(alen[0])
        if n > gguf.GGUF_MAX_ARRAY_ELEMENTS or orig_offs + 12 + n * np.dtype(scalar).itemsize > self.data.nbytes:
            raise ValueError(f"array of {n} elements at offset {orig_offs} runs past the file")
        values = self._get(orig_offs + 12, scalar, n)
        types = [gguf.GGUFValueType.ARRAY] + ([gguf.GGUFValueType(int(itype[0]))] if n else [])
        return 12 + int(values.nbytes), [itype, alen, values], [2] if n else [], types


def open_gguf(path: Path) -> GGUFFileReader:
    path = Path(path)
    if not path.is_file():
        raise D2MError(f"{path}: no such file")
    try:
        return GGUFFileReader(path)
    except (ValueError, OSError, IndexError, KeyError, struct.error) as e:
        raise D2MError(f"{path}: not a readable GGUF file ({e})") from e


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def _per_layer(value: Any, n: int) -> list:
    return list(value) if isinstance(value, list) else [value] * n


def layer_map(reader: gguf.GGUFReader) -> list[dict[str, Any]]:
    """Per layer: attention present, experts (0 = dense FFN), experts used, FFN width."""
    arch = field(reader, "general.architecture")
    n = int(field(reader, f"{arch}.block_count", 0))
    tensors = {t.name: t for t in reader.tensors}
    used = _per_layer(field(reader, f"{arch}.expert_used_count", 0), n)
    n_ff = _per_layer(field(reader, f"{arch}.feed_forward_length", 0), n)
    present = field(reader, Keys.ATTENTION_PRESENT) if arch == ARCH else None
    layers = []
    for i in range(n):
        router = tensors.get(tensor_name(T.FFN_GATE_INP, i))
        experts = int(router.shape[1]) if router is not None and len(router.shape) > 1 else 0
        has_attn = (bool(present[i]) if present is not None and i < len(present) else
                    tensor_name(T.ATTN_Q, i) in tensors or tensor_name(T.ATTN_QKV, i) in tensors)
        layers.append({"layer": i, "attention": has_attn, "experts": experts,
                       "experts_used": int(used[i]) if experts and i < len(used) else 0,
                       "ffn_length": int(n_ff[i]) if i < len(n_ff) else 0})
    return layers


def inspect_gguf(path: Path) -> dict[str, Any]:
    reader = open_gguf(path)
    by_type: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for t in reader.tensors:
        by_type[t.tensor_type.name] += int(t.n_bytes)
        count[t.tensor_type.name] += 1
    info = {
        "file": str(path),
        "architecture": field(reader, "general.architecture"),
        "runtime": runtime_of(field(reader, "general.architecture")),
        "name": field(reader, "general.name"),
        "file_type": field(reader, "general.file_type"),
        "tensor_count": len(reader.tensors),
        "size_bytes": Path(path).stat().st_size,
        "size_by_dtype": {k: {"tensors": count[k], "bytes": v} for k, v in sorted(by_type.items())},
        "layers": layer_map(reader),
    }
    plan = field(reader, Keys.PLAN)
    if plan:
        info["method"] = field(reader, Keys.METHOD)
        info["source_model"] = field(reader, Keys.SOURCE_MODEL)
        info["plan"] = json.loads(plan)
    return info


# -- dense2moe ------------------------------------------------------------------------------

def _expected_shapes(cfg: HybridConfig, i: int) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape for block i (what the writer writes and llama.cpp loads)."""
    b, d, hd = cfg.blocks[i], cfg.n_embd, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {tensor_name(T.FFN_NORM, i): (d,)}
    if b.attention:
        shapes.update({
            tensor_name(T.ATTN_NORM, i): (d,),
            tensor_name(T.ATTN_Q, i): (cfg.n_head * hd, d),
            tensor_name(T.ATTN_K, i): (cfg.n_head_kv * hd, d),
            tensor_name(T.ATTN_V, i): (cfg.n_head_kv * hd, d),
            tensor_name(T.ATTN_OUT, i): (d, cfg.n_head * hd),
        })
        if cfg.qkv_bias:
            shapes.update({tensor_name(T.ATTN_Q, i, "bias"): (cfg.n_head * hd,),
                           tensor_name(T.ATTN_K, i, "bias"): (cfg.n_head_kv * hd,),
                           tensor_name(T.ATTN_V, i, "bias"): (cfg.n_head_kv * hd,)})
        if cfg.o_bias:
            shapes[tensor_name(T.ATTN_OUT, i, "bias")] = (d,)
        if cfg.qk_norm:
            shapes.update({tensor_name(T.ATTN_Q_NORM, i): (hd,), tensor_name(T.ATTN_K_NORM, i): (hd,)})
        if cfg.post_norms:
            shapes[tensor_name(T.ATTN_POST_NORM, i)] = (d,)
    if cfg.post_norms:
        shapes[tensor_name(FFN_POST_NORM_EXPS, i) if b.is_moe else tensor_name(T.FFN_POST_NORM, i)] = \
            (b.n_expert, d) if b.is_moe else (d,)
    if b.is_moe:
        e, f = b.n_expert, b.n_ff
        shapes.update({
            tensor_name(T.FFN_GATE_INP, i): (e, d),
            tensor_name(T.FFN_GATE_INP, i, "bias"): (e,),
            tensor_name(T.FFN_GATE_EXP, i): (e, f, d),
            tensor_name(T.FFN_UP_EXP, i): (e, f, d),
            tensor_name(T.FFN_DOWN_EXP, i): (e, d, f),
        })
    else:
        shapes.update({tensor_name(T.FFN_GATE, i): (b.n_ff, d), tensor_name(T.FFN_UP, i): (b.n_ff, d),
                       tensor_name(T.FFN_DOWN, i): (d, b.n_ff)})
    return shapes


# Bounds of the pinned llama.cpp (LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS) and of sanity: no real model comes
# near them, so a larger value is a corrupt or hostile file, refused before anything is sized from it.
MAX_LAYERS = 512
MAX_EXPERTS = 1024
MAX_WIDTH = 1 << 20        # n_embd, n_ff, heads, head size
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 24

_PER_LAYER = ((Keys.ATTENTION_PRESENT, 1), (Keys.FEED_FORWARD_LENGTH, MAX_WIDTH), (Keys.EXPERT_COUNT, MAX_EXPERTS),
              (Keys.EXPERT_USED_COUNT, MAX_EXPERTS))
_REQUIRED = ((Keys.EMBEDDING_LENGTH, MAX_WIDTH), (Keys.HEAD_COUNT, MAX_WIDTH), (Keys.HEAD_COUNT_KV, MAX_WIDTH),
             (Keys.VOCAB_SIZE, MAX_VOCAB))
_OPTIONAL = ((Keys.KEY_LENGTH, MAX_WIDTH), (Keys.VALUE_LENGTH, MAX_WIDTH), (Keys.CONTEXT_LENGTH, MAX_CONTEXT))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(value: Any, bound: int) -> bool:
    return (_is_int(value) or isinstance(value, bool)) and 0 <= value <= bound


def _metadata_problems(reader: gguf.GGUFReader) -> tuple[list[str], int, bool]:
    """(every metadata problem, block count (0 if unusable), whether the metadata is complete enough to
    describe every layer)."""
    problems = []
    n = field(reader, Keys.BLOCK_COUNT)
    if not _is_int(n) or n <= 0:
        problems.append(f"{Keys.BLOCK_COUNT} missing or not a positive integer")
        n = 0
    elif n > MAX_LAYERS:
        problems.append(f"{Keys.BLOCK_COUNT} = {n} exceeds the maximum of {MAX_LAYERS} layers")
        n = 0
    complete = n > 0
    for key, bound in _PER_LAYER:
        value = field(reader, key)
        if not isinstance(value, list):
            problems.append(f"{key} missing or not a per-layer array")
            complete = False
            continue
        if n and len(value) != n:
            problems.append(f"{key} has {len(value)} entries, {Keys.BLOCK_COUNT} is {n}")
            complete = False
        bad = next(((i, v) for i, v in enumerate(value) if not _in_range(v, bound)), None)
        if bad is not None:
            problems.append(f"{key}[{bad[0]}] = {bad[1]!r} is out of range 0..{bound}")
            complete = False
    for key, bound in _REQUIRED + _OPTIONAL:
        value = field(reader, key)
        if value is None and (key, bound) in _OPTIONAL:
            continue
        if not _is_int(value):
            problems.append(f"{key} missing" if value is None else f"{key} is not an integer: {value!r}")
            complete = False
        elif not 0 < value <= bound:
            problems.append(f"{key} = {value} is out of range 1..{bound}")
            complete = False
    n_head, n_head_kv = field(reader, Keys.HEAD_COUNT), field(reader, Keys.HEAD_COUNT_KV)
    if _is_int(n_head) and _is_int(n_head_kv) and n_head > 0 and n_head_kv > 0 and n_head % n_head_kv:
        problems.append(f"{Keys.HEAD_COUNT} {n_head} is not a multiple of {Keys.HEAD_COUNT_KV} {n_head_kv}")
        complete = False
    window = field(reader, Keys.SLIDING_WINDOW)
    if window is not None and not (_is_int(window) and 0 <= window <= MAX_CONTEXT):
        problems.append(f"{Keys.SLIDING_WINDOW} = {window!r} is out of range 0..{MAX_CONTEXT}")
        complete = False
    elif window:
        pattern = field(reader, Keys.SLIDING_WINDOW_PATTERN)
        if not (isinstance(pattern, list) and len(pattern) == n and all(isinstance(v, bool) for v in pattern)):
            problems.append(f"{Keys.SLIDING_WINDOW_PATTERN} must be one bool per layer where "
                            f"{Keys.SLIDING_WINDOW} is set")
            complete = False
    experts, used = field(reader, Keys.EXPERT_COUNT), field(reader, Keys.EXPERT_USED_COUNT)
    if isinstance(experts, list) and isinstance(used, list):
        for i, (e, k) in enumerate(zip(experts, used)):
            if not (_is_int(e) and _is_int(k)):
                continue
            if k > e:
                problems.append(f"layer {i}: {k} experts used > {e} experts")
            elif e > 0 and k == 0:
                problems.append(f"layer {i}: {e} experts but none used")
    return problems, n, complete


def hybrid_config_from_gguf(reader: gguf.GGUFReader, strict: bool = True) -> HybridConfig:
    arch = field(reader, "general.architecture")
    if arch in STOCK_ARCHS:
        cfg, problems = _stock_config(reader)
        if problems:
            raise D2MError(f"{reader.data.filename}: {problems[0]}")
        return cfg
    if arch != ARCH:
        raise D2MError(f"{reader.data.filename}: architecture {arch!r}, expected {ARCH!r}")
    problems, n, usable = _metadata_problems(reader)
    if problems and (strict or not usable):
        raise D2MError(f"{reader.data.filename}: {problems[0]}")
    names = {t.name for t in reader.tensors}
    present = field(reader, Keys.ATTENTION_PRESENT)
    experts = field(reader, Keys.EXPERT_COUNT)
    used = field(reader, Keys.EXPERT_USED_COUNT)
    n_ff = field(reader, Keys.FEED_FORWARD_LENGTH)
    first_attn = next((i for i in range(n) if present[i]), None)
    sliding = field(reader, Keys.SLIDING_WINDOW_PATTERN) if field(reader, Keys.SLIDING_WINDOW, 0) else None
    n_embd = int(field(reader, Keys.EMBEDDING_LENGTH))
    n_head = int(field(reader, Keys.HEAD_COUNT))
    return HybridConfig(
        vocab_size=int(field(reader, Keys.VOCAB_SIZE)), n_embd=n_embd, n_head=n_head,
        n_head_kv=int(field(reader, Keys.HEAD_COUNT_KV)),
        head_dim=int(field(reader, Keys.KEY_LENGTH, n_embd // n_head)),
        n_ctx_train=int(field(reader, Keys.CONTEXT_LENGTH, 2048)),
        rms_eps=float(field(reader, Keys.RMS_EPS, 1e-6)),
        rope_theta=float(field(reader, Keys.ROPE_FREQ_BASE, 10000.0)),
        qkv_bias=first_attn is not None and tensor_name(T.ATTN_Q, first_attn, "bias") in names,
        o_bias=first_attn is not None and tensor_name(T.ATTN_OUT, first_attn, "bias") in names,
        qk_norm=first_attn is not None and tensor_name(T.ATTN_Q_NORM, first_attn) in names,
        tie_word_embeddings=tensor_name(T.OUTPUT) not in names,
        normalize_topk=bool(field(reader, Keys.EXPERT_WEIGHTS_NORM, False)),
        blocks=tuple(BlockConfig(bool(present[i]), int(n_ff[i]), int(experts[i]), int(used[i]),
                                 bool(sliding[i]) if sliding else False) for i in range(n)),
        **_gemma_fields(reader, ARCH, names),
    )


def _has_post_norms(names: set[str]) -> bool:
    """Gemma-style output norms: the model has them where its tensors do."""
    return any(n.endswith((".post_attention_norm.weight", ".post_ffw_norm.weight", "_norm_exps.weight")) for n in names)


def _gemma_fields(reader: gguf.GGUFReader, arch: str, names: set[str]) -> dict[str, Any]:
    """HybridConfig's Gemma-style fields from the keys of a file of `arch` (absent: Llama's); a model has
    output norms where its tensors do."""
    def key(name: str, default: Any) -> Any:
        return field(reader, getattr(Keys, name).replace(ARCH, arch, 1), default)

    return dict(
        embedding_scale=float(key("EMBEDDING_SCALE", 1.0)), ffn_activation=str(key("FFN_ACTIVATION", "silu")),
        post_norms=_has_post_norms(names),
        sliding_window=int(key("SLIDING_WINDOW", 0)), rope_theta_swa=float(key("ROPE_FREQ_BASE_SWA", 0.0)),
        attention_scale=float(key("ATTENTION_SCALE", 0.0)))


def _partial_config(reader: gguf.GGUFReader, n: int) -> tuple[HybridConfig, int, bool]:
    """A config for the layers the metadata describes, how many those are (a prefix of the n layers), and
    whether its model-wide sizes are usable (if not, tensor names are checked but not shapes)."""
    arrays = [field(reader, key) for key, _ in _PER_LAYER]
    covered = min([n] + [len(a) if isinstance(a, list) else 0 for a in arrays])
    present, n_ff, experts, used = (a[:covered] if isinstance(a, list) else [] for a in arrays)
    blocks = []
    for i in range(covered):
        if not all(_in_range(v, bound) for v, (_, bound) in zip((present[i], n_ff[i], experts[i], used[i]), _PER_LAYER)):
            covered = i
            break
        blocks.append(BlockConfig(bool(present[i]), int(n_ff[i]), int(experts[i]), int(used[i])))
    sizes = [field(reader, key) for key, _ in _REQUIRED]
    sizes_ok = all(_is_int(v) and 0 < v <= bound for v, (_, bound) in zip(sizes, _REQUIRED))
    n_embd, n_head, n_head_kv, vocab = sizes if sizes_ok else (1, 1, 1, 1)
    head_dim = field(reader, Keys.KEY_LENGTH, n_embd // n_head)
    if not _is_int(head_dim) or not 0 < head_dim <= MAX_WIDTH:
        sizes_ok, head_dim = False, 1
    names = {t.name for t in reader.tensors}
    first_attn = next((i for i, b in enumerate(blocks) if b.attention), None)
    cfg = HybridConfig(
        vocab_size=vocab, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ctx_train=2048, rms_eps=1e-6, rope_theta=10000.0,
        qkv_bias=first_attn is not None and tensor_name(T.ATTN_Q, first_attn, "bias") in names,
        o_bias=first_attn is not None and tensor_name(T.ATTN_OUT, first_attn, "bias") in names,
        qk_norm=first_attn is not None and tensor_name(T.ATTN_Q_NORM, first_attn) in names,
        tie_word_embeddings=tensor_name(T.OUTPUT) not in names, normalize_topk=True, blocks=tuple(blocks),
        post_norms=_has_post_norms(names))
    return cfg, covered, sizes_ok


# -- the stock architectures d2m writes (stock_export.py) ------------------------------------------------------

def _stock_config(reader: gguf.GGUFReader) -> tuple[HybridConfig, list[str]]:
    """The model a llama/qwen2/qwen3/deci file describes, as a HybridConfig (a block has attention where its
    head count is not 0), and the problems of its metadata (the config is unusable when there are any)."""
    arch = field(reader, "general.architecture")
    problems: list[str] = []

    def key(name: str, default: Any = None, bound: int = MAX_WIDTH) -> Any:
        value = field(reader, f"{arch}.{name}", default)
        values = value if isinstance(value, list) else [value]
        if not values or not all(_is_int(v) and 0 <= v <= bound for v in values):
            problems.append(f"{arch}.{name} missing or out of range: {value!r}")
            return [1] if isinstance(value, list) else 1
        return value

    n = key("block_count", bound=MAX_LAYERS)
    n = n if _is_int(n) else 1
    heads = _per_layer(key("attention.head_count"), n)
    kv_heads = _per_layer(key("attention.head_count_kv", heads), n)
    n_ff = _per_layer(key("feed_forward_length"), n)
    n_embd = key("embedding_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")   # qwen2/qwen3 write no vocab_size: count the tokens
    vocab = key("vocab_size", len(tokens.data) if tokens is not None else None, MAX_VOCAB)
    if len({len(heads), len(kv_heads), len(n_ff), n}) > 1:
        problems.append(f"per-layer arrays of {arch} do not all have {n} entries")
    n_head, n_head_kv = max(heads, default=1) or 1, max(kv_heads, default=1) or 1
    head_dim = key("attention.key_length", n_embd // n_head if n_embd >= n_head else 1)
    names = {t.name for t in reader.tensors}
    first = next((i for i in range(min(n, len(heads))) if heads[i]), 0)
    cfg = HybridConfig(
        vocab_size=vocab, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ctx_train=int(field(reader, f"{arch}.context_length", 2048)),
        rms_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        qkv_bias=tensor_name(T.ATTN_Q, first, "bias") in names, o_bias=tensor_name(T.ATTN_OUT, first, "bias") in names,
        qk_norm=tensor_name(T.ATTN_Q_NORM, first) in names, tie_word_embeddings=tensor_name(T.OUTPUT) not in names,
        normalize_topk=False,
        blocks=tuple(BlockConfig(bool(heads[i]), int(n_ff[i])) for i in range(min(n, len(heads), len(n_ff)))))
    if arch == "gemma3":
        cfg = _gemma3_config(reader, cfg, names)
    return cfg, problems


def _gemma3_config(reader: gguf.GGUFReader, cfg: HybridConfig, names: set[str]) -> HybridConfig:
    """What llama.cpp's gemma3 adds to a Llama-style config: the embedding scale, GeGLU, output norms, the window
    on the layers of the pattern (an array, or every 6th layer global), their RoPE base, the attention scale."""
    fields = _gemma_fields(reader, "gemma3", names)
    pattern = field(reader, "gemma3.attention.sliding_window_pattern", GEMMA3_GLOBAL_EVERY)
    sliding = pattern if isinstance(pattern, list) else every_nth_global(cfg.n_layer, int(pattern))
    fields.update(embedding_scale=cfg.n_embd ** 0.5, ffn_activation="gelu",
                  rope_theta_swa=fields["rope_theta_swa"] or GEMMA3_ROPE_BASE_LOCAL,
                  attention_scale=cfg.head_dim ** -0.5)
    blocks = [replace(b, sliding=bool(fields["sliding_window"]) and bool(s)) for b, s in zip(cfg.blocks, sliding)]
    return replace(cfg, blocks=tuple(blocks), **fields)


def _expected_tensors(cfg: HybridConfig, layers: int, untied: bool) -> dict[str, tuple[int, ...]]:
    expected: dict[str, tuple[int, ...]] = {tensor_name(T.TOKEN_EMBD): (cfg.vocab_size, cfg.n_embd),
                                            tensor_name(T.OUTPUT_NORM): (cfg.n_embd,)}
    if untied:
        expected[tensor_name(T.OUTPUT)] = (cfg.vocab_size, cfg.n_embd)
    for i in range(layers):
        expected.update(_expected_shapes(cfg, i))
    return expected


def validate_gguf(path: Path) -> list[str]:
    """Every way `path` breaks the dense2moe contract, or (for llama, qwen2, qwen3 and deci files) the layout
    of its stock architecture (empty list: valid).

    Not only the first problem: metadata and tensors are both checked, and where the metadata is
    broken the tensors are still checked as far as it describes them (the layers its per-layer
    arrays cover, the shapes its model-wide sizes give)."""
    return _validate(open_gguf(path))


def _validate(reader: gguf.GGUFReader) -> list[str]:
    arch = field(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    if arch in STOCK_ARCHS:
        cfg, problems = _stock_config(reader)
        sizes_ok = not problems
        expected = _expected_tensors(cfg, cfg.n_layer, tensor_name(T.OUTPUT) in tensors)
        for name, shape in expected.items():
            got = tuple(int(d) for d in reversed(tensors[name].shape)) if name in tensors else None
            if got is None:
                problems.append(f"tensor {name} is missing")
            elif sizes_ok and got != shape:
                problems.append(f"tensor {name} has shape {list(got)}, expected {list(shape)}")
        return problems + [f"unexpected tensor {name}" for name in tensors if name not in expected]
    if arch != ARCH:
        return [f"general.architecture is {arch!r}, expected {ARCH!r} or one of {', '.join(STOCK_ARCHS)}"]
    problems, n, _ = _metadata_problems(reader)
    cfg, covered, sizes_ok = _partial_config(reader, n)
    expected = _expected_tensors(cfg, covered, tensor_name(T.OUTPUT) in tensors)
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            if not name.endswith(".bias") or ".ffn_gate_inp." not in name:  # the router bias is optional
                problems.append(f"tensor {name} is missing")
            continue
        got = tuple(int(d) for d in reversed(t.shape))
        if sizes_ok and got != shape:
            problems.append(f"tensor {name} has shape {list(got)}, expected {list(shape)}")
    for name, t in tensors.items():
        if len(t.shape) == 1 and t.tensor_type != gguf.GGMLQuantizationType.F32:
            problems.append(f"tensor {name} is {t.tensor_type.name}, 1-D tensors must be F32")
        if name in expected:
            continue
        layer = name.split(".")[1] if name.startswith("blk.") else None
        if layer is not None and layer.isdigit() and int(layer) < n:
            il = int(layer)
            if il >= covered:
                continue  # the metadata does not say what this layer holds (reported above)
            if not cfg.blocks[il].attention and any(
                    name.startswith(gguf.TENSOR_NAMES[k].format(bid=il) + ".") for k in ATTENTION_TENSORS):
                problems.append(f"tensor {name} in layer {layer}, which is flagged attention-free")
                continue
        problems.append(f"unexpected tensor {name}")
    return problems


_ACT_OF_TYPE = {"Q8_0": "q8_0", "F16": "f16", "BF16": "bf16"}


def load_hybrid(path: Path, emulate_llama_cpp: bool = False) -> HybridModel:
    """Read a dense2moe GGUF, or a stock one d2m writes, into the PyTorch reference (weights dequantized to
    float32; a llama or deci file's interleaved q/k rows back in rotate-half order).

    With `emulate_llama_cpp`, every matmul also rounds its input the way llama.cpp's CPU
    kernels do for that weight's type (model.round_activations), so the reference computes
    what llama.cpp computes for a Q8_0/F16/BF16/F32 file, not the float32 ideal; and GELU (Gemma) is
    ggml's table over f16 inputs (model.gelu_f16_table)."""
    reader = open_gguf(path)   # once: parsing a 49k-token vocabulary takes seconds
    problems = _validate(reader)
    if problems:
        raise D2MError(f"{path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    cfg = hybrid_config_from_gguf(reader)
    model = HybridModel(cfg)
    keys = state_key(model)
    state = {}
    for t in reader.tensors:
        if t.name not in keys:
            continue
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        data = np.asarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if field(reader, "general.architecture") in INTERLEAVED_ROPE_ARCHS:
            data = _rotate_half_rows(data, t.name, cfg)
        state[keys[t.name]] = torch.from_numpy(data.copy())
    missing = set(keys.values()) - set(state)
    for key in missing:  # only an absent router bias can get here (validate_gguf allows it)
        state[key] = torch.zeros_like(model.state_dict()[key])
    model.load_state_dict(state)
    if emulate_llama_cpp:
        _set_activation_rounding(model, reader)
    return model


def _rotate_half_rows(data: np.ndarray, name: str, cfg: HybridConfig) -> np.ndarray:
    from .dense_export import rope_uninterleave

    if name.endswith(("attn_q.weight", "attn_q.bias")):
        return rope_uninterleave(data, cfg.n_head)
    if name.endswith(("attn_k.weight", "attn_k.bias")):
        return rope_uninterleave(data, cfg.n_head_kv)
    return data


def _set_activation_rounding(model: HybridModel, reader: gguf.GGUFReader) -> None:
    unsupported = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1} - {"F32", *_ACT_OF_TYPE}
    if unsupported:
        raise D2MError(f"{reader.data.filename}: activation emulation covers F32/F16/BF16/Q8_0, not {sorted(unsupported)}")
    keys = state_key(model)
    modules = dict(model.named_modules())
    if model.cfg.ffn_activation == "gelu":      # llama.cpp's GELU is a table over f16 inputs
        for module in modules.values():
            if hasattr(module, "act_fn"):
                module.act_fn = activation("gelu_ggml")
    for t in reader.tensors:
        act = _ACT_OF_TYPE.get(t.tensor_type.name)
        if t.name not in keys or len(t.shape) < 2 or "ffn_gate_inp" in t.name:
            continue  # norms, biases and routers are not matmul inputs (routers are F32)
        path = keys[t.name]
        if t.name == "token_embd.weight":
            if model.cfg.tie_word_embeddings:
                model.lm_head_act = act
        elif t.name == "output.weight":
            model.lm_head_act = act
        elif "_exps" in t.name:
            module, param = path.rsplit(".", 1)
            modules[module].act[param] = act
        else:
            modules[path.rsplit(".", 1)[0]].act = act

