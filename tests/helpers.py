"""Comparisons the tests share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np


@dataclass
class GGUFDiff:
    missing_keys: dict[str, object] = field(default_factory=dict)   # in reference, not in candidate
    extra_keys: dict[str, object] = field(default_factory=dict)
    changed_keys: dict[str, tuple] = field(default_factory=dict)
    missing_tensors: list[str] = field(default_factory=list)
    extra_tensors: list[str] = field(default_factory=list)
    changed_tensors: dict[str, str] = field(default_factory=dict)    # name -> what differs


def _kv(reader: gguf.GGUFReader) -> dict[str, object]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_diff(reference: Path, candidate: Path, compare_data: bool = True) -> GGUFDiff:
    ref, cand = gguf.GGUFReader(reference), gguf.GGUFReader(candidate)
    d = GGUFDiff()
    kr, kc = _kv(ref), _kv(cand)
    for k, v in kr.items():
        if k not in kc:
            d.missing_keys[k] = v
        elif kc[k] != v:
            d.changed_keys[k] = (v, kc[k])
    d.extra_keys = {k: v for k, v in kc.items() if k not in kr}
    tr, tc = {t.name: t for t in ref.tensors}, {t.name: t for t in cand.tensors}
    d.missing_tensors = sorted(set(tr) - set(tc))
    d.extra_tensors = sorted(set(tc) - set(tr))
    for name in sorted(set(tr) & set(tc)):
        a, b = tr[name], tc[name]
        if a.tensor_type != b.tensor_type:
            d.changed_tensors[name] = f"type {a.tensor_type.name} vs {b.tensor_type.name}"
        elif list(a.shape) != list(b.shape):
            d.changed_tensors[name] = f"shape {list(a.shape)} vs {list(b.shape)}"
        elif compare_data and not np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)):
            d.changed_tensors[name] = "data differs"
    return d


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mean squared error of a against the reference b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def rewrite_gguf(src: Path, dst: Path, set_kv: dict | None = None, drop_tensors: tuple[str, ...] = (),
                 add_tensors: dict[str, np.ndarray] | None = None, replace_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A copy of a GGUF with metadata changed and tensors dropped, added or replaced (to make broken files).

    set_kv: key -> (value, GGUFValueType[, sub_type]); value None removes the key."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch=arch)
    set_kv = dict(set_kv or {})
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in set_kv:
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)
    for key, spec in set_kv.items():
        if spec is not None and spec[0] is not None:
            writer.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    replace_tensors = replace_tensors or {}
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        if t.name in replace_tensors:
            writer.add_tensor(t.name, replace_tensors[t.name])
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for name, data in (add_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def last_progress(distill_out: Path) -> dict:
    """Tokens, seconds and step of the last Trainer checkpoint `d2m distill` wrote to `distill_out`."""
    from transformers.trainer_utils import get_last_checkpoint

    from d2m_gguf.pipeline import CHECKPOINTS
    from d2m_gguf.trainer import PROGRESS_FILE

    last = get_last_checkpoint(str(Path(distill_out) / CHECKPOINTS))
    assert last is not None, f"no Trainer checkpoint under {distill_out}"
    return json.loads((Path(last) / PROGRESS_FILE).read_text())


def upcycled_unhealed(hf_dir: Path, calibration_text: Path, tmp_path: Path) -> Path:
    """`convert --save-hf` of an LF-UC plan (fuse 2, split 2) with random routers and no healing, so the guest
    experts get tokens (and gradients, where they are trained) from the start: the student `d2m distill` heals."""
    from .conftest import run_cli

    up = tmp_path / "upcycled"
    proc = run_cli("convert.py", hf_dir, tmp_path / "unhealed.gguf", "--fuse", "2", "--split", "2", "--no-heal",
                   "--router-init", "random", "--save-hf", up, "--text", calibration_text, "--ctx", "64", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return up


def assert_gguf_holds(out: Path, state: dict, llama) -> None:
    """`out` validates, reads back to exactly `state` (a reference state dict) and completes text in llama.cpp."""
    import torch

    from d2m_gguf.reader import load_hybrid, validate_gguf

    assert validate_gguf(out) == []
    reread = load_hybrid(out).state_dict()
    assert all(torch.equal(reread[k], v) for k, v in state.items())
    text, _ = llama.complete(out, "Hello", n=4)
    assert text.strip()
