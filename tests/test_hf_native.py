"""A model the source's architecture computes (pruned, or LF-UC whose guests were dropped) is saved by
`--save-hf` as the source's own transformers class: transformers loads it on a machine without d2m_gguf, with
no remote code, computes the reference's logits and llama.cpp's greedy text, trains (labels -> loss ->
gradients), and what it saves converts back to the same GGUF byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from d2m_gguf.hf_export import load_hf_checkpoint

from .conftest import run_cli
from .helpers import gguf_diff, nmse
from .test_stock_export import plan_of

PROMPT = "The capital of France is"
N_NEW = 16

# runs in a fresh interpreter where `import d2m_gguf` fails, as on a machine without it
TRANSFORMERS_SIDE = r'''
import json, sys
sys.modules["d2m_gguf"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

hf_dir, tokens_file, result_file, resaved = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(hf_dir)
tokens = torch.tensor([json.load(open(tokens_file))])
with torch.no_grad():
    logits = model(tokens).logits[0]
prompt = tok(PROMPT, return_tensors="pt")
generated = model.generate(prompt["input_ids"], attention_mask=prompt["attention_mask"], max_new_tokens=N_NEW, do_sample=False, temperature=None, top_p=None,
                           top_k=None)
loss = model(tokens, labels=tokens).loss
loss.backward()
grads = [p.grad for p in model.parameters()]
torch.save({"logits": logits, "text": tok.decode(generated[0], skip_special_tokens=True), "loss": loss.item(),
            "class": type(model).__name__,
            "grads_finite": all(g is not None and bool(torch.isfinite(g).all()) for g in grads)}, result_file)
model.save_pretrained(resaved)
tok.save_pretrained(resaved)
'''.replace("PROMPT", repr(PROMPT)).replace("N_NEW", str(N_NEW))


def transformers_side(hf_dir, tokens, tmp_path) -> dict:
    tokens_file, result, resaved = tmp_path / "tokens.json", tmp_path / "result.pt", tmp_path / "resaved"
    tokens_file.write_text(json.dumps(tokens))
    proc = subprocess.run([sys.executable, "-c", TRANSFORMERS_SIDE, hf_dir, tokens_file, result, resaved],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**torch.load(result), "resaved": resaved}


def check_source_class(source, plan_file, llama, tmp_path, family_class, n_tokens=64):
    out, hf_dir, back = tmp_path / "direct.gguf", tmp_path / "hf", tmp_path / "back.gguf"
    proc = run_cli("convert.py", source, out, "--plan", plan_file, "--no-heal", "--outtype", "f32", "--save-hf",
                   hf_dir, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == [family_class]
    reference = load_hf_checkpoint(hf_dir)
    tokens = torch.randint(0, reference.cfg.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0))
    got = transformers_side(hf_dir, tokens.tolist(), tmp_path)
    assert got["class"] == family_class
    with torch.no_grad():
        ref = reference(tokens[None])[0]
    assert nmse(got["logits"].numpy(), ref.numpy()) <= 1e-10
    assert np.isfinite(got["loss"]) and got["grads_finite"]
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


@pytest.mark.parametrize("family,cls", [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                                        ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_a_pruned_tiny_model_is_the_source_class(tiny_dirs, llama, tmp_path, family, cls):
    plan_file = tmp_path / "prune.json"
    plan_of("prune", method="prune").save(plan_file)
    check_source_class(tiny_dirs[family], plan_file, llama, tmp_path, cls)


def test_a_wide_block_is_padded_in_the_source_class(tiny_dirs, llama, tmp_path):
    plan_file = tmp_path / "wide.json"
    plan_of("wide").save(plan_file)
    check_source_class(tiny_dirs["qwen2"], plan_file, llama, tmp_path, "Qwen2ForCausalLM")


@pytest.mark.slow
def test_pruned_smollm2_is_a_llama_for_transformers(smollm2_dir, llama, tmp_path):
    from d2m_gguf.plan import BlockPlan, FusionPlan

    plan_file = tmp_path / "prune4.json"
    FusionPlan(tuple(BlockPlan(i, (i,), moe=False) for i in range(30) if i not in (13, 14, 15, 17)), 30,
               method="prune").save(plan_file)
    check_source_class(smollm2_dir, plan_file, llama, tmp_path, "LlamaForCausalLM", n_tokens=128)
