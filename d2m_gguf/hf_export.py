"""The upcycled model as a Hugging Face checkpoint that transformers loads and trains, and the way back to a GGUF.

A model that the source family's own architecture computes (every block attention + one dense FFN: pruning,
LF-UC whose guests were dropped; stock_export.standard_obstacles) is saved as the source's class with fewer
layers, so `AutoModelForCausalLM.from_pretrained(out)` loads it with no remote code:

    out/
      config.json        the source's config with num_hidden_layers / intermediate_size of the result, and
                         `d2m_plan` (the fusion plan, kept by transformers' save_pretrained)
      model.safetensors  model.layers.N.self_attn.q_proj.weight, ... (narrower FFNs zero-padded to one width)
      d2m_plan.json      the fusion plan
      tokenizer files    copied from the source checkpoint

Any other model (a routed or attention-free block, or any Gemma-style model: its norms are stored as the
multiplier, Gemma's class stores them minus one) is saved as `Dense2MoEForCausalLM`, which loads with
`trust_remote_code=True` on a machine without d2m_gguf: config.json (`model_type: dense2moe`, `auto_map`,
per-block `layers`), model.safetensors in the same names (plus mlp.router, mlp.experts.*), and the three
files of the model's code beside them (model.py, configuration_dense2moe.py, modeling_dense2moe.py).
`load_hf_checkpoint()` reads either kind (or what transformers' save_pretrained wrote from it) back into
the PyTorch reference.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .atomic import atomic_path
from .checkpoint import Checkpoint
from .errors import D2MError
from .model import HybridConfig, HybridModel, hf_config_dict, hybrid_config_of
from .plan import FusionPlan, identity_plan, load_plan, parse_plan, validate_plan
from .spec import SOURCE_CONFIG_KEY, DenseSpec, load_config, load_dense_spec
from .stock_export import padded_shape, pad_ffn, standard_obstacles
from .tensor_names import gguf_name
from .upcycle import plan_weights
from .weights import Weights, as_weights, state_shapes

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json", "added_tokens.json")
MODEL_CODE = ("model.py", "configuration_dense2moe.py", "modeling_dense2moe.py")   # shipped with the weights
DENSE2MOE_CLASS = "Dense2MoEForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_dense2moe.Dense2MoEConfig",
            "AutoModelForCausalLM": f"modeling_dense2moe.{DENSE2MOE_CLASS}"}
PLAN_FILE = "d2m_plan.json"
PLAN_KEY = "d2m_plan"      # the plan inside config.json, which save_pretrained keeps
WIDTHS_KEY = "d2m_feed_forward_length"   # each block's FFN width, where narrower ones were zero-padded
_SOURCE_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")   # what generate() reads from the config


def save_hf_checkpoint(model: HybridModel | Weights, plan: FusionPlan, spec: DenseSpec, source_dir: Path,
                       out_dir: Path) -> str:
    """Save `model` (module docstring), one tensor in memory at a time; returns the class it was saved as."""
    weights = as_weights(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy(Path(source_dir) / name, out_dir / name)
    (out_dir / PLAN_FILE).write_text(plan.dumps(), encoding="utf-8")
    if not standard_obstacles(weights.cfg) and not weights.cfg.post_norms:
        width = max(b.n_ff for b in weights.cfg.blocks)
        config = _source_class_config(weights.cfg, plan, spec, width)
    else:
        width, config = None, _dense2moe_class_config(weights.cfg, plan, spec)
        for name in MODEL_CODE:
            shutil.copy(Path(__file__).parent / name, out_dir / name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shapes = {k: padded_shape(gguf_name(k), shape, width) for k, shape in weights.shapes.items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        write_safetensors(tmp, shapes, lambda k: pad_ffn(weights.numpy(k), gguf_name(k), width), {"format": "pt"})
    return config["architectures"][0]


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], load: Callable[[str], np.ndarray],
                      metadata: dict[str, str]) -> None:
    """A float32 safetensors file of the tensors `shapes` lists, each loaded, written and dropped in turn
    (safetensors' save_file takes every tensor in memory at once). The format: an 8-byte little-endian
    header length, the JSON header (names, dtypes, shapes, byte offsets), the tensors' bytes in order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)      # the tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape in shapes.items():
            data = np.ascontiguousarray(load(key), dtype="<f4")
            if data.shape != tuple(shape):
                raise AssertionError(f"{key}: loaded {data.shape}, declared {shape}")
            f.write(data.tobytes())


def _source_class_config(cfg: HybridConfig, plan: FusionPlan, spec: DenseSpec, width: int) -> dict:
    """The config.json of a model of `cfg` saved as the source's class (FFNs zero-padded to `width`)."""
    config = {**spec.config, "num_hidden_layers": cfg.n_layer, "intermediate_size": width,
              PLAN_KEY: json.loads(plan.dumps())}
    if any(b.n_ff != width for b in cfg.blocks):
        config[WIDTHS_KEY] = [b.n_ff for b in cfg.blocks]
    if isinstance(spec.config.get("layer_types"), list):   # per-layer attention kinds: the kept layers'
        config["layer_types"] = [spec.config["layer_types"][b.attention] for b in plan.blocks]
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = "float32"
    return config


def _dense2moe_class_config(cfg: HybridConfig, plan: FusionPlan, spec: DenseSpec) -> dict:
    return {"architectures": [DENSE2MOE_CLASS], "model_type": "dense2moe", "auto_map": AUTO_MAP,
            **hf_config_dict(cfg), "torch_dtype": "float32",
            **{k: spec.config[k] for k in _SOURCE_KEYS if k in spec.config},
            SOURCE_CONFIG_KEY: spec.config, PLAN_KEY: json.loads(plan.dumps())}


def load_hf_weights(path: Path) -> Weights:
    """A checkpoint `save_hf_checkpoint` wrote (either kind), or one transformers saved from it, as `Weights`
    read from it one tensor at a time."""
    path = Path(path)
    config = load_config(path)
    if config.get("model_type") != "dense2moe":
        if PLAN_KEY not in config:
            raise D2MError(f"{path}: not a checkpoint d2m wrote (config.json has no {PLAN_KEY})")
        spec = load_dense_spec(path)
        ckpt = Checkpoint(path)
        ckpt.check(spec)
        weights = plan_weights(spec, ckpt, identity_plan(spec.n_layer))
        return _unpadded(weights, config[WIDTHS_KEY]) if WIDTHS_KEY in config else weights
    try:
        from .configuration_dense2moe import Dense2MoEConfig   # imports transformers: only where needed

        # through the config class: transformers' save_pretrained leaves out values equal to its defaults
        cfg = hybrid_config_of(Dense2MoEConfig(**config))
    except (KeyError, TypeError) as e:
        raise D2MError(f"{path}/config.json: not a dense2moe configuration ({e!r} missing or wrong)") from e
    ckpt = Checkpoint(path)
    shapes = state_shapes(cfg)
    names = [n for n in ckpt.names() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    missing, unexpected = sorted(set(shapes) - set(names)), sorted(set(names) - set(shapes))
    wrong = [n for n in shapes if n in ckpt and ckpt.shape(n) != shapes[n]]
    if missing or unexpected or wrong:
        raise D2MError(f"{path}: tensors do not match config.json (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}, wrong shape {wrong[:3]})")
    return Weights(cfg, shapes, lambda n: torch.from_numpy(ckpt.get(n).astype("float32")))


def load_hf_checkpoint(path: Path) -> HybridModel:
    """`load_hf_weights(path)` in memory: the PyTorch reference."""
    return load_hf_weights(path).materialize()


def _unpadded(weights: Weights, widths: list[int]) -> Weights:
    """`weights` with each block's FFN cut back to its width (the padding is zeros: the same function)."""
    cfg = weights.cfg.with_blocks(replace(b, n_ff=int(w)) for b, w in zip(weights.cfg.blocks, widths))
    shapes = state_shapes(cfg)
    return Weights(cfg, shapes, lambda k: weights.load(k)[tuple(slice(0, n) for n in shapes[k])])


def written_by_d2m(path: Path) -> bool:
    """Whether `path` is a source-class checkpoint `save_hf_checkpoint` wrote (or transformers saved from one)."""
    return PLAN_KEY in load_config(Path(path))


def load_hf_plan(path: Path, n_layer: int | None) -> FusionPlan:
    """The fusion plan saved with the weights (d2m_plan.json, or config.json's d2m_plan after a
    save_pretrained), validated against the source's depth when it is known."""
    plan_file = Path(path) / PLAN_FILE
    if plan_file.is_file():
        return load_plan(plan_file, n_layer)
    plan = load_config(Path(path)).get(PLAN_KEY)
    if plan is None:
        raise D2MError(f"{path}: no {PLAN_FILE} (not written by `d2m convert --save-hf` or `d2m distill`)")
    where = f"{path}/config.json {PLAN_KEY}"
    parsed = parse_plan(plan, where)
    validate_plan(parsed, where, n_layer)
    return parsed
