"""Roofline cost of decoding one token: bytes read (active weights + KV cache) and FLOPs.

Decoding is memory-bound on phones and CPUs, so a token costs about
bytes / effective bandwidth. What a token reads:
- every weight of the blocks it runs, but only the top-k experts of an MoE (plus the router);
- the LM head (the whole vocab x n_embd matrix) and one embedding row;
- the KV cache of every attention layer at the current context depth (none for attention-free blocks; a
  sliding-window block's cache holds at most its window).

The cost is computed from a tensor inventory, either planned (a HybridConfig and
the GGML types a quantization will use) or read off a GGUF file.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import gguf

from .errors import D2MError
from .model import HybridConfig
from .quantize import shape_fallback


def bytes_per_weight(qtype: str | gguf.GGMLQuantizationType) -> float:
    q = gguf.GGMLQuantizationType[qtype.upper()] if isinstance(qtype, str) else qtype
    block, size = gguf.GGML_QUANT_SIZES[q]
    return size / block


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    dram_gbs: float
    efficiency: float
    threads: int
    gflops: float
    recipe: str = ""
    cpu: str = ""
    isa: str = ""
    memory: str = ""
    source: str = ""

    @property
    def effective_gbs(self) -> float:
        return self.dram_gbs * self.efficiency


def load_devices() -> dict[str, Device]:
    """The device profiles shipped in d2m_gguf/data/devices.json."""
    raw = json.loads(resources.files("d2m_gguf").joinpath("data/devices.json").read_text(encoding="utf-8"))
    return {k: Device(key=k, **v) for k, v in raw["devices"].items()}


def probe_host_bandwidth(megabytes: int = 512, repeats: int = 5, threads: int | None = None) -> float:
    """Measured read bandwidth of this machine in GB/s: a multi-threaded reduction over a large array,
    which like a decode step streams memory through every core."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    x = torch.ones(megabytes * 2**20 // 4)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def host_device(threads: int = 2) -> Device:
    """This machine, with its bandwidth measured now (efficiency 1: the probe is already a real copy)."""
    return Device("host", "this machine (measured)", round(probe_host_bandwidth(threads=threads), 1), 1.0, threads, gflops=50.0,
                  source="probe_host_bandwidth()")


def get_device(key: str) -> Device:
    if key == "host":
        return host_device()
    devices = load_devices()
    if key not in devices:
        raise D2MError(f"unknown device {key!r} (known: host, {', '.join(devices)})")
    return devices[key]


@dataclass
class TokenCost:
    """What one decoded token reads and computes."""

    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    flops: float = 0.0
    per_layer: list[float] = field(default_factory=list)  # bytes per block (weights + KV)

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    def tokens_per_s(self, device: Device) -> float:
        t_mem = self.total_bytes / (device.effective_gbs * 1e9)
        t_cmp = self.flops / (device.gflops * 1e9)
        return 1.0 / max(t_mem, t_cmp)


@dataclass(frozen=True)
class WeightTypes:
    """GGML types of the tensor classes (what a quantization recipe assigns)."""

    attention: str = "Q4_0"
    ffn: str = "Q4_0"
    experts: str = "Q4_0"
    router: str = "F32"
    output: str = "Q6_K"
    kv: str = "F16"

    @classmethod
    def uniform(cls, qtype: str) -> "WeightTypes":
        head = "Q6_K" if qtype.upper() not in ("F32", "F16", "BF16", "Q8_0") else qtype
        return cls(qtype, qtype, qtype, "F32", head, "F16")


def planned_cost(cfg: HybridConfig, types: WeightTypes = WeightTypes(), depth: int = 0) -> TokenCost:
    """The cost model of a dense2moe configuration (a dense model is the identity configuration)."""
    d, hd = cfg.n_embd, cfg.head_dim
    cost = TokenCost()
    for b in cfg.blocks:
        layer_bytes = (4 if cfg.post_norms else 2) * d * 4  # the norms, f32
        if b.attention:
            n_attn = d * hd * (2 * cfg.n_head + 2 * cfg.n_head_kv)
            seen = min(depth, cfg.sliding_window) if b.sliding and cfg.sliding_window else depth
            kv = 2 * cfg.n_head_kv * hd * seen * bytes_per_weight(types.kv)
            layer_bytes += n_attn * bytes_per_weight(types.attention) + kv
            cost.kv_bytes += kv
            cost.flops += 2 * n_attn + 4 * cfg.n_head * hd * seen
        if b.is_moe:
            active = 3 * d * b.n_ff * b.n_expert_used
            layer_bytes += active * bytes_per_weight(types.experts) + d * b.n_expert * bytes_per_weight(types.router)
            cost.flops += 2 * (active + d * b.n_expert)
        else:
            n_ffn = 3 * d * b.n_ff
            layer_bytes += n_ffn * bytes_per_weight(types.ffn)
            cost.flops += 2 * n_ffn
        cost.per_layer.append(layer_bytes)
    head = cfg.vocab_size * d
    head_type = shape_fallback(types.output, d)    # what llama-quantize stores (Q6_K on 576 or 640 columns: Q8_0)
    cost.weight_bytes = sum(cost.per_layer) - cost.kv_bytes + head * bytes_per_weight(head_type) + d * 4
    cost.flops += 2 * head
    return cost


def gguf_cost(path: Path, depth: int = 0, kv: str = "F16") -> TokenCost:
    """The cost of a GGUF file as written (real per-tensor types), for any architecture."""
    from .reader import field as kv_field, layer_map, open_gguf

    reader = open_gguf(path)
    arch = kv_field(reader, "general.architecture")
    layers = {l["layer"]: l for l in layer_map(reader)}
    n_head_kv = kv_field(reader, f"{arch}.attention.head_count_kv", 0)
    n_head = kv_field(reader, f"{arch}.attention.head_count", 0)
    n_embd = int(kv_field(reader, f"{arch}.embedding_length", 0))
    head_dim = kv_field(reader, f"{arch}.attention.key_length", n_embd // max(1, int(n_head if isinstance(n_head, int) else 1)))
    n_head_kv = n_head_kv if isinstance(n_head_kv, int) else max(n_head_kv)
    cost = TokenCost(per_layer=[0.0] * len(layers))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    for t in reader.tensors:
        nbytes = float(t.n_bytes)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            row = nbytes / int(t.shape[1])
            nbytes = nbytes if not has_output else row  # tied: the LM head reads it all
            cost.weight_bytes += nbytes
            cost.flops += 2 * int(t.n_elements) if not has_output else 0
            continue
        active = 1.0
        if "_exps" in t.name and parts[0] == "blk":
            layer = layers[int(parts[1])]
            active = layer["experts_used"] / max(1, layer["experts"])
        cost.weight_bytes += nbytes * active
        cost.flops += 2 * int(t.n_elements) * active if len(t.shape) > 1 else 0
        if parts[0] == "blk":
            cost.per_layer[int(parts[1])] += nbytes * active
    for i, layer in layers.items():
        if layer["attention"]:
            kv_bytes = 2 * n_head_kv * head_dim * depth * bytes_per_weight(kv)
            cost.kv_bytes += kv_bytes
            cost.per_layer[i] += kv_bytes
            cost.flops += 4 * int(n_head if isinstance(n_head, int) else max(n_head)) * head_dim * depth
    return cost
