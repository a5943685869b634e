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

Any other model (a routed or attention-free block) is saved as `Dense2MoEForCausalLM`, which loads with
`trust_remote_code=True` on a machine without d2m_gguf: config.json (`model_type: dense2moe`, `auto_map`,
per-block `layers`), model.safetensors in the same names (plus mlp.router, mlp.experts.*), and the three
files of the model's code beside them (model.py, configuration_dense2moe.py, modeling_dense2moe.py).
`load_hf_checkpoint()` reads either kind (or what transformers' save_pretrained wrote from it) back into
the PyTorch reference.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_path
from .checkpoint import Checkpoint
from .errors import D2MError
from .model import HybridModel, hf_config_dict, hybrid_config_of
from .plan import FusionPlan, identity_plan, load_plan, parse_plan, validate_plan
from .spec import SOURCE_CONFIG_KEY, DenseSpec, load_config, load_dense_spec
from .stock_export import pad_ffn, standard_obstacles
from .tensor_names import gguf_name
from .upcycle import upcycle

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
        config, tensors = _dense2moe_class(model, plan, spec)
        for name in MODEL_CODE:
            shutil.copy(Path(__file__).parent / name, out_dir / name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return config["architectures"][0]


def _tensors(model: HybridModel, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """The reference's state dict (transformers' names already), float32, FFNs zero-padded to `pad_to`."""
    out = {}
    for key, value in model.state_dict().items():
        data = value.detach().to("cpu", torch.float32)
        if pad_to is not None:
            data = torch.from_numpy(pad_ffn(data.numpy(), gguf_name(key), pad_to))
        out[key] = data.contiguous()
    return out


def _source_class(model: HybridModel, plan: FusionPlan, spec: DenseSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of `model` as a checkpoint of the source's class."""
    cfg = model.cfg
    width = max(b.n_ff for b in cfg.blocks)
    config = {**spec.config, "num_hidden_layers": cfg.n_layer, "intermediate_size": width,
              PLAN_KEY: json.loads(plan.dumps())}
    if any(b.n_ff != width for b in cfg.blocks):
        config[WIDTHS_KEY] = [b.n_ff for b in cfg.blocks]
    if isinstance(spec.config.get("layer_types"), list):   # per-layer attention kinds: the kept layers'
        config["layer_types"] = [spec.config["layer_types"][b.attention] for b in plan.blocks]
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = "float32"
    return config, _tensors(model, pad_to=width)


def _dense2moe_class(model: HybridModel, plan: FusionPlan, spec: DenseSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    config = {"architectures": [DENSE2MOE_CLASS], "model_type": "dense2moe", "auto_map": AUTO_MAP,
              **hf_config_dict(model.cfg), "torch_dtype": "float32",
              **{k: spec.config[k] for k in _SOURCE_KEYS if k in spec.config},
              SOURCE_CONFIG_KEY: spec.config, PLAN_KEY: json.loads(plan.dumps())}
    return config, _tensors(model)


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
    try:
        from .configuration_dense2moe import Dense2MoEConfig   # imports transformers: only where needed

        # through the config class: transformers' save_pretrained leaves out values equal to its defaults
        model = HybridModel(hybrid_config_of(Dense2MoEConfig(**config)))
    except (KeyError, TypeError) as e:
        raise D2MError(f"{path}/config.json: not a dense2moe configuration ({e!r} missing or wrong)") from e
    ckpt = Checkpoint(path)
    expected = model.state_dict()
    names = [n for n in ckpt.names() if not (model.cfg.tie_word_embeddings and n == "lm_head.weight")]
    missing, unexpected = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing or unexpected:
        raise D2MError(f"{path}: tensors do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict({n: torch.from_numpy(ckpt.get(n).astype("float32")) for n in names})
    return model


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
