"""`--save-hf` writes a checkpoint transformers loads, trains and saves on a machine without d2m_gguf: the
source's own class where the model is one (pruned, or LF-UC whose guests were dropped), with no remote code;
Dense2MoEForCausalLM with its code beside the weights otherwise (routed or attention-free blocks). Either
computes the reference's logits and llama.cpp's greedy text, caches keys and values, pads, trains (labels ->
loss -> gradients, with and without gradient checkpointing), and what transformers saves converts back to the
same GGUF byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from d2m_gguf.hf_export import MODEL_CODE, load_hf_checkpoint

from .conftest import REPO, run_cli
from .helpers import gguf_diff, nmse
from .test_stock_export import plan_of

PROMPT = "The capital of France is"
N_NEW = 16
ALL_KINDS = {"tiny": REPO / "examples/plans/tiny-all-kinds.json",
             "smollm2": REPO / "examples/plans/smollm2-all-kinds.json"}

# runs in a fresh interpreter where `import d2m_gguf` fails, as on a machine without it
TRANSFORMERS_SIDE = r'''
import json, sys
sys.modules["d2m_gguf"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

hf_dir, tokens_file, result_file, resaved = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(hf_dir)
tokens = torch.tensor([json.load(open(tokens_file))])
n = tokens.shape[1]
with torch.no_grad():
    logits = model(tokens).logits[0]
    # the KV cache: the last quarter decoded on top of the first three quarters
    first = model(tokens[:, :3 * n // 4], use_cache=True)
    cached = model(tokens[:, 3 * n // 4:], past_key_values=first.past_key_values, use_cache=True).logits[0]
    # padding: the same tokens behind 5 pad tokens on the left, in a batch with the unpadded sequence
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(tokens)], dim=1)
    batch = model(torch.cat([padded, torch.cat([tokens, tokens[:, :5]], 1)]),
                  attention_mask=torch.cat([mask, torch.ones_like(mask)])).logits
prompt = tok(PROMPT, return_tensors="pt")
generated = model.generate(prompt["input_ids"], attention_mask=prompt["attention_mask"], max_new_tokens=N_NEW,
                           do_sample=False, temperature=None, top_p=None, top_k=None)
model.train()
grads = []
for checkpointing in (False, True):
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.zero_grad()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
model.gradient_checkpointing_disable()
model.eval()
torch.save({"logits": logits, "cached": cached, "padded": batch[0, 5:], "unpadded": batch[1, :n],
            "text": tok.decode(generated[0], skip_special_tokens=True), "loss": loss.item(),
            "class": type(model).__name__,
            "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads[0]),
            "n_grads": [len(g) for g in grads], "n_params": sum(1 for _ in model.parameters()),
            "checkpointing_diff": max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
                                      for a, b in zip(*grads))}, result_file)
model.save_pretrained(resaved)
tok.save_pretrained(resaved)
half = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, trust_remote_code=True)
with torch.no_grad():
    bf16 = half(tokens).logits[0].float()
torch.save({**torch.load(result_file), "bf16": bf16}, result_file)
'''.replace("PROMPT", repr(PROMPT)).replace("N_NEW", str(N_NEW))


def transformers_side(hf_dir, tokens, tmp_path) -> dict:
    tokens_file, result, resaved = tmp_path / "tokens.json", tmp_path / "result.pt", tmp_path / "resaved"
    tokens_file.write_text(json.dumps(tokens))
    proc = subprocess.run([sys.executable, "-c", TRANSFORMERS_SIDE, hf_dir, tokens_file, result, resaved],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**torch.load(result), "resaved": resaved}


def check_transformers_class(source, plan_file, llama, tmp_path, expected_class, n_tokens=64):
    out, hf_dir, back = tmp_path / "direct.gguf", tmp_path / "hf", tmp_path / "back.gguf"
    proc = run_cli("convert.py", source, out, "--plan", plan_file, "--no-heal", "--outtype", "f32", "--save-hf",
                   hf_dir, "--quiet")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == [expected_class]
    remote_code = expected_class == "Dense2MoEForCausalLM"
    assert ("auto_map" in config) == remote_code
    assert all((hf_dir / name).is_file() == remote_code for name in MODEL_CODE)
    reference = load_hf_checkpoint(hf_dir)
    tokens = torch.randint(0, reference.cfg.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0))
    got = transformers_side(hf_dir, tokens.tolist(), tmp_path)
    assert got["class"] == expected_class
    with torch.no_grad():
        ref = reference(tokens[None])[0]
    assert nmse(got["logits"].numpy(), ref.numpy()) <= 1e-10
    assert nmse(got["bf16"].numpy(), ref.numpy()) <= 1e-2   # loaded in bf16: bf16's rounding, nothing more
    assert nmse(got["cached"].numpy(), ref[3 * n_tokens // 4:].numpy()) <= 1e-10
    assert nmse(got["padded"].numpy(), ref.numpy()) <= 1e-10 and nmse(got["unpadded"].numpy(), ref.numpy()) <= 1e-10
    assert np.isfinite(got["loss"]) and got["grads_finite"]
    # gradient checkpointing recomputes the same forward: ours gives the same gradients bit for bit;
    # transformers' own classes recompute in another order (up to 1e-4 of the largest entry seen)
    assert got["n_grads"] == [got["n_params"]] * 2
    assert got["checkpointing_diff"] == 0.0 if remote_code else got["checkpointing_diff"] <= 1e-3
    text, _ = llama.complete(out, PROMPT, n=N_NEW)
    assert got["text"].strip() == text.strip()   # llama-completion's echo drops trailing whitespace
    # what transformers saved is the way back: the same GGUF, byte for byte
    proc = run_cli("convert.py", source, back, "--from-checkpoint", got["resaved"], "--outtype", "f32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert back.read_bytes() == out.read_bytes()
    # and alone (`convert.py DIR out.gguf`): written as it is, not planned again. The tensors are the same; keys
    # differ in the names and where transformers re-saved the tokenizer differently (SentencePiece: unk, sep)
    alone = tmp_path / "alone.gguf"
    proc = run_cli("convert.py", got["resaved"], alone, "--outtype", "f32", "--quiet")
    assert proc.returncode == 0 and "written by d2m" in proc.stderr, proc.stderr
    d = gguf_diff(out, alone)
    assert not (d.missing_tensors or d.extra_tensors or d.changed_tensors), d
    differing = {*d.missing_keys, *d.extra_keys, *d.changed_keys}
    assert all(k.startswith(("general.", "tokenizer.ggml.")) or k == "d2m.source.model" for k in differing), d


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_routed_tiny_model_is_a_dense2moe_transformers_model(tiny_dirs, llama, tmp_path, family):
    check_transformers_class(tiny_dirs[family], ALL_KINDS["tiny"], llama, tmp_path, "Dense2MoEForCausalLM")


@pytest.mark.slow
def test_smollm2_all_kinds_is_a_dense2moe_transformers_model(smollm2_dir, llama, tmp_path):
    check_transformers_class(smollm2_dir, ALL_KINDS["smollm2"], llama, tmp_path, "Dense2MoEForCausalLM", n_tokens=128)


@pytest.mark.parametrize("family,cls", [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                                        ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_a_pruned_tiny_model_is_the_source_class(tiny_dirs, llama, tmp_path, family, cls):
    plan_file = tmp_path / "prune.json"
    plan_of("prune", method="prune").save(plan_file)
    check_transformers_class(tiny_dirs[family], plan_file, llama, tmp_path, cls)


def test_a_wide_block_is_padded_in_the_source_class(tiny_dirs, llama, tmp_path):
    plan_file = tmp_path / "wide.json"
    plan_of("wide").save(plan_file)
    check_transformers_class(tiny_dirs["qwen2"], plan_file, llama, tmp_path, "Qwen2ForCausalLM")


@pytest.mark.slow
def test_pruned_smollm2_is_a_llama_for_transformers(smollm2_dir, llama, tmp_path):
    from d2m_gguf.plan import BlockPlan, FusionPlan

    plan_file = tmp_path / "prune4.json"
    FusionPlan(tuple(BlockPlan(i, (i,), moe=False) for i in range(30) if i not in (13, 14, 15, 17)), 30,
               method="prune").save(plan_file)
    check_transformers_class(smollm2_dir, plan_file, llama, tmp_path, "LlamaForCausalLM", n_tokens=128)
