"""The upcycled model as an HF-style checkpoint (safetensors + config), for fine-tuning elsewhere.

    out/
      config.json        {"architectures": ["Dense2MoEForCausalLM"], "model_type": "dense2moe", ...HybridConfig}
      model.safetensors  tensors under their GGUF names (blk.3.ffn_gate_exps.weight, ...)
      d2m_plan.json      the fusion plan
      tokenizer files    copied from the source checkpoint

`load_hf_checkpoint()` reads it back into the PyTorch reference (d2m_gguf.model).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .errors import D2MError
from .model import BlockConfig, HybridConfig, HybridModel, gguf_name, state_key
from .plan import FusionPlan, load_plan
from .spec import DenseSpec

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json", "added_tokens.json")


def save_hf_checkpoint(model: HybridModel, plan: FusionPlan, spec: DenseSpec, source_dir: Path, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy(Path(source_dir) / name, out_dir / name)
    config = {"architectures": ["Dense2MoEForCausalLM"], "model_type": "dense2moe",
              "source_architecture": spec.hf_architecture, **dataclasses.asdict(model.cfg)}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "d2m_plan.json").write_text(plan.dumps(), encoding="utf-8")
    tensors = {gguf_name(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_hf_checkpoint(path: Path) -> HybridModel:
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise D2MError(f"{path}/config.json: cannot read: {e}") from e
    if config.get("model_type") != "dense2moe":
        raise D2MError(f"{path}: not a dense2moe checkpoint (model_type {config.get('model_type')!r})")
    fields = {f.name for f in dataclasses.fields(HybridConfig)}
    cfg = HybridConfig(**{k: v for k, v in config.items() if k in fields and k != "blocks"},
                       blocks=tuple(BlockConfig(**b) for b in config["blocks"]))
    model = HybridModel(cfg)
    keys = state_key(model)
    state = {keys[name]: t for name, t in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.to(torch.float32)


def load_hf_plan(path: Path, n_layer: int) -> FusionPlan:
    """The fusion plan saved beside the weights (d2m_plan.json), validated against the source's depth."""
    plan_file = Path(path) / "d2m_plan.json"
    if not plan_file.is_file():
        raise D2MError(f"{path}: no d2m_plan.json (not written by `d2m convert --save-hf` or `d2m distill`)")
    return load_plan(plan_file, n_layer)
