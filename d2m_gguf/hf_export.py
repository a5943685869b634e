"""The upcycled model as a Hugging Face checkpoint, for training elsewhere and for the way back to a GGUF.

A model that the source family's own architecture computes (every block attention + one dense FFN: pruning,
LF-UC whose guests were dropped; stock_export.standard_obstacles) is saved as the source's class with fewer
layers, in transformers' names, so `AutoModelForCausalLM.from_pretrained(out)` loads it with no remote code:

    out/
      config.json        the source's config with num_hidden_layers / intermediate_size of the result, and
                         `d2m_plan` (the fusion plan, kept by transformers' save_pretrained)
      model.safetensors  model.layers.N.self_attn.q_proj.weight, ... (narrower FFNs zero-padded to one width)
      d2m_plan.json      the fusion plan
      tokenizer files    copied from the source checkpoint

Any other model (a routed or attention-free block) is saved HF-style for `d2m distill` and `--from-checkpoint`:
config.json `{"model_type": "dense2moe", ...HybridConfig}`, tensors under their GGUF names.
`load_hf_checkpoint()` reads either back into the PyTorch reference (d2m_gguf.model).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .checkpoint import Checkpoint
from .dense_export import gguf_names
from .errors import D2MError
from .model import BlockConfig, HybridConfig, HybridModel, gguf_name, state_key
from .plan import FusionPlan, identity_plan, load_plan, parse_plan, validate_plan
from .spec import DenseSpec, load_config, load_dense_spec
from .stock_export import pad_ffn, standard_obstacles
from .upcycle import upcycle

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json", "added_tokens.json")
PLAN_FILE = "d2m_plan.json"
PLAN_KEY = "d2m_plan"      # the plan inside config.json, which save_pretrained keeps
WIDTHS_KEY = "d2m_feed_forward_length"   # each block's FFN width, where narrower ones were zero-padded


def save_hf_checkpoint(model: HybridModel, plan: FusionPlan, spec: DenseSpec, source_dir: Path, out_dir: Path) -> str:
    """Save `model` (module docstring); returns the class it was saved as."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy(Path(source_dir) / name, out_dir / name)
    (out_dir / PLAN_FILE).write_text(plan.dumps(), encoding="utf-8")
    if not standard_obstacles(model.cfg):
        config, tensors = _source_class(model, plan, spec)
    else:
        config = {"architectures": ["Dense2MoEForCausalLM"], "model_type": "dense2moe",
                  "source_architecture": spec.hf_architecture, **dataclasses.asdict(model.cfg)}
        tensors = {gguf_name(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return config["architectures"][0]


def _source_class(model: HybridModel, plan: FusionPlan, spec: DenseSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of `model` as a checkpoint of the source's class."""
    cfg = model.cfg
    width = max(b.n_ff for b in cfg.blocks)
    state, keys = model.state_dict(), state_key(model)
    tensors = {}
    for hf, gguf_tensor in gguf_names(replace(spec, n_layer=cfg.n_layer, n_ff=width)).items():
        data = state[keys[gguf_tensor]].detach().to("cpu", torch.float32).numpy()
        tensors[hf] = torch.from_numpy(pad_ffn(data, gguf_tensor, width)).contiguous()
    config = {**spec.config, "num_hidden_layers": cfg.n_layer, "intermediate_size": width,
              PLAN_KEY: json.loads(plan.dumps())}
    if any(b.n_ff != width for b in cfg.blocks):
        config[WIDTHS_KEY] = [b.n_ff for b in cfg.blocks]
    if isinstance(spec.config.get("layer_types"), list):   # per-layer attention kinds: the kept layers'
        config["layer_types"] = [spec.config["layer_types"][b.attention] for b in plan.blocks]
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = "float32"
    return config, tensors


def load_hf_checkpoint(path: Path) -> HybridModel:
    """A checkpoint `save_hf_checkpoint` wrote (either kind), or one transformers saved from it, as the
    PyTorch reference."""
    path = Path(path)
    config = load_config(path)
    if config.get("model_type") != "dense2moe":
        if PLAN_KEY not in config:
            raise D2MError(f"{path}: not a checkpoint d2m wrote (config.json has no {PLAN_KEY})")
        spec = load_dense_spec(path)
        ckpt = Checkpoint(path)
        ckpt.check(spec)
        model = upcycle(spec, ckpt, identity_plan(spec.n_layer))
        return _unpadded(model, config[WIDTHS_KEY]) if WIDTHS_KEY in config else model
    fields = {f.name for f in dataclasses.fields(HybridConfig)}
    cfg = HybridConfig(**{k: v for k, v in config.items() if k in fields and k != "blocks"},
                       blocks=tuple(BlockConfig(**b) for b in config["blocks"]))
    model = HybridModel(cfg)
    keys = state_key(model)
    state = {keys[name]: t for name, t in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.to(torch.float32)


def _unpadded(model: HybridModel, widths: list[int]) -> HybridModel:
    """`model` with each block's FFN cut back to its width (the padding is zeros: the same function)."""
    cfg = model.cfg.with_blocks(replace(b, n_ff=int(w)) for b, w in zip(model.cfg.blocks, widths))
    out = HybridModel(cfg)
    state = model.state_dict()
    for key, value in out.state_dict().items():
        value.copy_(state[key][tuple(slice(0, n) for n in value.shape)])
    return out


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
