"""Streaming, atomic GGUF output shared by the dense and the dense2moe writers.

A model is described as a list of `TensorOut` (name, shape, output type and a
loader). Tensor infos are declared first, then each tensor is loaded, converted,
written and dropped in turn, so memory holds one tensor at a time. The type rules
are llama.cpp's converter rules (1-D tensors, norms and routers stay F32; Q8_0
falls back to F16 for rows that do not divide into blocks).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import gguf
import numpy as np
from tqdm import tqdm

from .atomic import atomic_path, check_output_path

Q = gguf.GGMLQuantizationType


class OutType(str, enum.Enum):
    """What `--outtype` offers, as in llama.cpp's converter."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"

    @property
    def file_type(self) -> gguf.LlamaFileType:
        return {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[self.value]

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[self.value]


# weights that llama.cpp keeps in F32 whatever the file type
_F32_SUFFIXES = ("_norm.weight", "_norm_exps.weight", "ffn_gate_inp.weight")


def tensor_qtype(name: str, shape: Sequence[int], outtype: OutType) -> gguf.GGMLQuantizationType:
    """The GGML type a tensor is stored as for `outtype`."""
    if len(shape) <= 1 or name.endswith(_F32_SUFFIXES) or not name.endswith(".weight"):
        return Q.F32
    qtype = outtype.qtype
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        return Q.F16
    return qtype


def tensor_nbytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block_size) * type_size


@dataclass
class TensorOut:
    """One GGUF tensor to write: `load()` returns its float data in numpy (row-major) shape."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Float data -> the bytes of `qtype` (gguf-py's reference quantizers, as upstream). F16 goes through
    torch's conversion instead of numpy's astype: the same IEEE round-to-nearest-even bits (tests hold the
    files to upstream's byte for byte), vectorised and on every core, where numpy's took a third of a 1.5 B
    model's write."""
    if qtype == Q.F16 and data.dtype == np.float32:
        import torch
        return torch.from_numpy(np.ascontiguousarray(data)).to(torch.float16).numpy()
    return gguf.quants.quantize(data, qtype)


def write_gguf(
    path: Path,
    arch: str,
    tensors: Sequence[TensorOut],
    add_metadata: Callable[[gguf.GGUFWriter], None],
    *,
    progress: bool = True,
    desc: str = "writing",
) -> None:
    """Write a GGUF atomically: `add_metadata` fills the KV section, tensors stream after it."""
    path = Path(path)
    total = sum(t.nbytes for t in tensors)
    check_output_path(path, need_bytes=total)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    add_metadata(writer)
    with atomic_path(path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
                for t in tensors:
                    data = encode(t.load(), t.qtype)
                    if data.nbytes != t.nbytes:
                        raise AssertionError(f"{t.name}: encoded {data.nbytes} bytes, declared {t.nbytes}")
                    writer.write_tensor_data(data)
                    bar.update(t.nbytes)
                    del data
        finally:
            writer.close()
