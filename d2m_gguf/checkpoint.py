"""Lazy access to the tensors of an HF checkpoint (safetensors), checked against a DenseSpec.

Tensors are memory-mapped by safetensors and materialised one at a time, so a
conversion's peak memory is one tensor, not the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .errors import D2MError
from .spec import DenseSpec

# numpy cannot hold these; they are read through torch and widened to float32
_TORCH_ONLY_DTYPES = {"BF16", "F8_E4M3", "F8_E5M2"}
# buffers some checkpoints carry that are not weights
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


class Checkpoint:
    """Name -> tensor view over one or more safetensors files of an HF checkpoint directory."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        self._files: dict[str, Path] = {}       # tensor name -> file
        self._handles: dict[Path, object] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (dtype, shape)
        for path in self._shard_paths():
            handle = self._open(path)
            for name in handle.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                sl = handle.get_slice(name)
                self._files[name] = path
                self._meta[name] = (sl.get_dtype(), tuple(int(d) for d in sl.get_shape()))

    def _shard_paths(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if single.is_file():
            return [single]
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise D2MError(f"{index}: not a valid safetensors index ({e})") from e
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.dir / s).is_file()]
            if missing:
                raise D2MError(f"{index}: shard {missing[0]} is missing")
            return [self.dir / s for s in shards]
        if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")):
            raise D2MError(f"{self.dir}: only safetensors checkpoints are supported (found PyTorch .bin/.pt files)")
        raise D2MError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise D2MError(f"{path}: corrupt or truncated safetensors file ({e})") from e
        return self._handles[path]

    # -- queries ------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def dtype(self, name: str) -> str:
        """safetensors dtype string: F32, F16, BF16, ..."""
        return self._meta[name][0]

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self._files.values()))

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 or float16 numpy (the two types GGUF conversion starts from)."""
        if name not in self._meta:
            raise D2MError(f"{self.dir}: tensor {name} is missing")
        path = self._files[name]
        dtype = self._meta[name][0]
        try:
            if dtype in _TORCH_ONLY_DTYPES:
                import torch  # only bf16/fp8 checkpoints pay for importing torch
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor(name).to(torch.float32).numpy()
            # a fresh handle per tensor: closing it unmaps the pages just read, so the
            # resident set stays one tensor instead of growing to the whole file
            with safe_open(str(path), framework="numpy") as f:
                data = f.get_tensor(name)
        except SafetensorError as e:
            raise D2MError(f"{path}: cannot read tensor {name}: {e}") from e
        if data.dtype not in (np.float32, np.float16):
            data = data.astype(np.float32)
        return data

    def check(self, spec: DenseSpec) -> None:
        """Raise one clear error if tensors are missing, unexpected or of the wrong shape."""
        expected = spec.hf_tensor_shapes()
        problems: list[str] = []
        for name, shape in expected.items():
            if name not in self._meta:
                problems.append(f"tensor {name} is missing")
            elif self.shape(name) != shape:
                problems.append(f"tensor {name} has shape {list(self.shape(name))}, expected {list(shape)}")
        for name in self._meta:
            if name not in expected and not (spec.tie_word_embeddings and name == "lm_head.weight"):
                problems.append(f"unexpected tensor {name}")
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise D2MError(f"{self.dir}: {problems[0]}{more}")
