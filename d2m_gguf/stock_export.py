"""Which GGUF architecture a model is written as: a stock llama.cpp one wherever it computes exactly the same.

Many results of the job are ordinary transformers: pruning keeps attention + dense FFN in every block, and
LF-UC whose router found no use for a guest drops it (upcycle.drop_idle_experts). Written as `dense2moe` such
a model needs the patched llama.cpp for no reason in the model itself, so the writer picks, in this order:

- standard: the source family's own architecture (`llama`, `qwen2`, `qwen3`, `gemma3`), as upstream's
  converter writes a model of that depth (RoPE rows interleaved for `llama`, one `feed_forward_length`; for
  `gemma3` the kept layers' sliding-window pattern as an array, which its loader reads, since pruning moves
  the global layers off llama.cpp's default every-6th). Exact when every block has attention and one dense
  FFN; a block whose FFN sums several MLPs is wider than the others, and zero rows (gate, up) and columns
  (down) pad the others to its width: silu(0) * 0 = 0, so exact, but read every token;
- deci: llama.cpp's per-layer architecture (Nemotron): per-layer `head_count`, `head_count_kv` and
  `feed_forward_length`, where `head_count` 0 is a block without attention and without KV cache. Exact for
  llama-family and qwen2 models (q/k/v bias is loaded) whose block 0 has attention (its loader takes the
  head size from layer 0); not for qwen3 (no q/k norm). Chosen over a padded standard file, which reads more
  bytes;
- dense2moe: everything else (a routed block), for the patched llama.cpp (patches/).

Folded norm gains are plain norm weights in every architecture, so they never stand in the way.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .constants import ARCH, DECI, INTERLEAVED_ROPE_ARCHS, runtime_of
from .dense_export import add_dense_metadata, rope_interleave
from .errors import D2MError
from .ggufout import OutType, TensorOut, tensor_nbytes, tensor_qtype, write_gguf
from .hybrid_export import add_provenance, add_shared_hparams, export_hybrid
from .metadata import add_general
from .model import HybridConfig, HybridModel
from .tensor_names import gguf_name
from .plan import FusionPlan
from .spec import DenseSpec
from .upcycle import hybrid_config
from .vocab import add_vocab
from .weights import Weights, as_weights

log = logging.getLogger("d2m")

class GgufArch(str, enum.Enum):
    """What `--gguf-arch` offers."""

    AUTO = "auto"              # the first exact of standard, deci, dense2moe (deci before a padded standard)
    STANDARD = "standard"      # the source family's architecture, or refuse
    DECI = "deci"              # llama.cpp's per-layer architecture, or refuse
    DENSE2MOE = "dense2moe"    # the custom architecture, always


@dataclass(frozen=True)
class ArchChoice:
    """The architecture a model is written as, and why."""

    arch: str                   # general.architecture: llama, qwen2, qwen3, deci or dense2moe
    reason: str
    n_ff: int | None = None     # a standard file's one FFN width (narrower blocks zero-padded to it)
    padding: int = 0            # parameters that padding adds (all zero)

    @property
    def runtime(self) -> str:
        return runtime_of(self.arch)

    def record(self) -> dict[str, Any]:
        """For summary.json."""
        out = {"architecture": self.arch, "runtime": self.runtime, "reason": self.reason}
        if self.padding:
            out["padding_parameters"] = self.padding
        return out


def _moe_blocks(cfg: HybridConfig) -> list[str]:
    return [f"block {j} routes between {b.n_expert} experts" for j, b in enumerate(cfg.blocks) if b.is_moe]


def standard_obstacles(cfg: HybridConfig) -> list[str]:
    """Why the source family's own architecture cannot compute this model (empty: it can)."""
    out = _moe_blocks(cfg) + [f"block {j} has no attention" for j, b in enumerate(cfg.blocks) if not b.attention]
    if cfg.attention_scale and cfg.attention_scale != cfg.head_dim ** -0.5:
        out.append(f"attention scale {cfg.attention_scale:g} (stock gemma3 takes 1/sqrt(head_dim))")
    return out


def deci_obstacles(cfg: HybridConfig, spec: DenseSpec) -> list[str]:
    """Why llama.cpp's `deci` cannot compute this model (empty: it can)."""
    out = _moe_blocks(cfg)
    if spec.post_norms:
        out.append(f"deci has no Gemma-style blocks ({spec.family}: output norms, GeGLU, scaled embeddings)")
    elif spec.dense_gguf_arch not in ("llama", "qwen2"):
        out.append(f"deci has no q/k norm ({spec.family})")
    if cfg.blocks and not cfg.blocks[0].attention:
        out.append("block 0 has no attention (deci's loader takes the head size from layer 0)")
    return out


def _padding(cfg: HybridConfig) -> tuple[int, int]:
    """(the widest block's FFN width, the parameters padding every block to it adds)."""
    width = max(b.n_ff for b in cfg.blocks)
    return width, sum(3 * cfg.n_embd * (width - b.n_ff) for b in cfg.blocks)


def _refuse(wanted: GgufArch, obstacles: list[str]) -> D2MError:
    more = f" (and {len(obstacles) - 1} more)" if len(obstacles) > 1 else ""
    return D2MError(f"--gguf-arch {wanted.value}: cannot write this model exactly: {obstacles[0]}{more}; "
                    f"use --gguf-arch auto or dense2moe")


def choose_arch(cfg: HybridConfig, spec: DenseSpec, wanted: GgufArch = GgufArch.AUTO) -> ArchChoice:
    """The architecture to write `cfg` as (module docstring); D2MError when `wanted` cannot be exact."""
    wanted = GgufArch(wanted)
    if wanted is GgufArch.DENSE2MOE:
        return ArchChoice(ARCH, "asked for (--gguf-arch dense2moe)")
    standard, deci = standard_obstacles(cfg), deci_obstacles(cfg, spec)
    width, padding = _padding(cfg)
    family = spec.dense_gguf_arch
    if wanted is GgufArch.STANDARD or (wanted is GgufArch.AUTO and not standard and (not padding or deci)):
        if standard:
            raise _refuse(wanted, standard)
        why = "every block is attention + one dense FFN"
        if padding:
            why += f"; narrower FFNs zero-padded to {width} ({padding} parameters)"
        return ArchChoice(family, why, n_ff=width, padding=padding)
    if wanted is GgufArch.DECI or (wanted is GgufArch.AUTO and not deci):
        if deci:
            raise _refuse(wanted, deci)
        free = sum(not b.attention for b in cfg.blocks)
        why = (f"{free} block(s) without attention (head_count 0, no KV cache)" if free else
               "FFN widths differ per block (per-layer feed_forward_length, no padding)")
        return ArchChoice(DECI, why)
    why = standard[0]                # auto, with neither stock architecture exact
    if deci and deci[0] != why:
        why += f"; and deci: {deci[0]}"
    return ArchChoice(ARCH, why)


def check_arch_reachable(plan: FusionPlan, spec: DenseSpec, wanted: GgufArch, healing: bool) -> None:
    """Refuse a forced architecture before any work when nothing can make the plan's model exact in it: only
    healing changes a model's shape, by dropping the idle experts of top-1 whole-MLP blocks
    (upcycle.drop_idle_experts), so those blocks count as the dense blocks they may become."""
    if GgufArch(wanted) in (GgufArch.AUTO, GgufArch.DENSE2MOE):
        return
    cfg = hybrid_config(spec, plan)
    if healing:
        cfg = cfg.with_blocks(replace(bc, n_ff=spec.n_ff, n_expert=0, n_expert_used=0)
                              if b.moe and b.top_k == 1 and b.split == 1 else bc
                              for b, bc in zip(plan.blocks, cfg.blocks))
    choose_arch(cfg, spec, wanted)


# -- writing ------------------------------------------------------------------------------------------------

def _stock_array(weights: Weights, key: str, name: str, arch: str, n_ff: int | None) -> np.ndarray:
    data = weights.numpy(key)
    if arch in INTERLEAVED_ROPE_ARCHS and name.endswith(("attn_q.weight", "attn_q.bias")):
        data = rope_interleave(data, weights.cfg.n_head)
    elif arch in INTERLEAVED_ROPE_ARCHS and name.endswith(("attn_k.weight", "attn_k.bias")):
        data = rope_interleave(data, weights.cfg.n_head_kv)
    return pad_ffn(data, name, n_ff)


def pad_ffn(data: np.ndarray, name: str, n_ff: int | None) -> np.ndarray:
    """gate/up [f, d] -> [n_ff, d] and down [d, f] -> [d, n_ff], with zeros."""
    if n_ff is None:
        return data
    if name.endswith(("ffn_gate.weight", "ffn_up.weight")) and data.shape[0] < n_ff:
        return np.pad(data, ((0, n_ff - data.shape[0]), (0, 0)))
    if name.endswith("ffn_down.weight") and data.shape[1] < n_ff:
        return np.pad(data, ((0, 0), (0, n_ff - data.shape[1])))
    return data


def padded_shape(name: str, shape: tuple[int, ...], n_ff: int | None) -> tuple[int, ...]:
    if n_ff is not None and name.endswith(("ffn_gate.weight", "ffn_up.weight")):
        return (n_ff, shape[1])
    if n_ff is not None and name.endswith("ffn_down.weight"):
        return (shape[0], n_ff)
    return shape


def stock_tensors(model: HybridModel | Weights, choice: ArchChoice, outtype: OutType) -> list[TensorOut]:
    """The model's tensors under their (shared) GGUF names, laid out as `choice.arch` reads them."""
    weights = as_weights(model)
    out = []
    for key, shape in weights.shapes.items():
        name = gguf_name(key)
        shape = padded_shape(name, shape, choice.n_ff)
        out.append(TensorOut(name, shape, tensor_qtype(name, shape, outtype),
                             lambda k=key, n=name: _stock_array(weights, k, n, choice.arch, choice.n_ff)))
    return out


def _add_deci_hparams(writer: gguf.GGUFWriter, cfg: HybridConfig) -> None:
    """Per-layer heads (0: no attention) and FFN widths, as upstream's DeciModel writes them."""
    add_shared_hparams(writer, cfg, [cfg.n_head if b.attention else 0 for b in cfg.blocks],
                       [cfg.n_head_kv if b.attention else 0 for b in cfg.blocks])
    writer.add_feed_forward_length([b.n_ff for b in cfg.blocks])


def export_stock(model: HybridModel | Weights, choice: ArchChoice, plan: FusionPlan, spec: DenseSpec, hf_dir: Path,
                 out_path: Path, outtype: OutType = OutType.F16, pre_tokenizer: str | None = None,
                 healing: dict[str, Any] | None = None, progress: bool = True) -> None:
    """Write `model` as the stock architecture `choice` names, with the plan as provenance (d2m.* keys)."""
    if choice.arch == ARCH:
        raise ValueError("export_stock writes stock architectures; dense2moe is export_hybrid's")
    weights = as_weights(model)
    tensors = stock_tensors(weights, choice, outtype)

    def metadata(writer: gguf.GGUFWriter) -> None:
        if choice.arch == DECI:
            add_general(writer, hf_dir, outtype)
            _add_deci_hparams(writer, weights.cfg)
            add_vocab(writer, hf_dir, spec.vocab_size, pre_tokenizer, spec.family)
        else:
            add_dense_metadata(writer, replace(spec, n_layer=weights.cfg.n_layer, n_ff=choice.n_ff), hf_dir, outtype,
                               pre_tokenizer)
            if weights.cfg.sliding_window:
                writer.add_sliding_window_pattern([b.sliding for b in weights.cfg.blocks])
        add_provenance(writer, plan, spec, hf_dir, healing)

    write_gguf(out_path, choice.arch, tensors, metadata, progress=progress, desc=f"{choice.arch} export")


def export_model(model: HybridModel | Weights, plan: FusionPlan, spec: DenseSpec, hf_dir: Path, out_path: Path,
                 outtype: OutType = OutType.F16, gguf_arch: GgufArch = GgufArch.AUTO,
                 pre_tokenizer: str | None = None, healing: dict[str, Any] | None = None,
                 progress: bool = True, choice: ArchChoice | None = None) -> ArchChoice:
    """Write `model` in the architecture `choose_arch` picks (or `choice`, where the caller made it already);
    returns the choice (logged with its reason)."""
    choice = choice or choose_arch(as_weights(model).cfg, spec, gguf_arch)
    if choice.arch == ARCH:
        export_hybrid(model, plan, spec, hf_dir, out_path, outtype, pre_tokenizer=pre_tokenizer, healing=healing,
                      progress=progress)
    else:
        export_stock(model, choice, plan, spec, hf_dir, out_path, outtype, pre_tokenizer=pre_tokenizer,
                     healing=healing, progress=progress)
    log.info("GGUF architecture %s, for %s: %s", choice.arch, choice.runtime, choice.reason)
    if choice.padding:
        extra = sum(tensor_nbytes(t.shape, t.qtype) for t in stock_tensors(model, choice, outtype)) - \
            sum(tensor_nbytes(t.shape, t.qtype) for t in stock_tensors(model, replace(choice, n_ff=None), outtype))
        log.info("padding costs %.1f MB in the file and in the bytes read per token", extra / 1e6)
    return choice
