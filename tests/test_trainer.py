"""Healing on transformers' Trainer with PEFT LoRA: only the adapters train, and the merged model is a plain
checkpoint that converts to a GGUF."""

from __future__ import annotations

import torch

from d2m_gguf.hf_export import load_hf_checkpoint
from d2m_gguf.reader import load_hybrid, validate_gguf
from d2m_gguf.trainer import LORA_TARGETS

from .conftest import run_cli


def test_lora_trains_only_adapters_and_the_merged_model_converts(tiny_dirs, calibration_text, llama, tmp_path):
    hf = tiny_dirs["qwen2"]
    up, healed, out = tmp_path / "upcycled", tmp_path / "lora", tmp_path / "lora.gguf"
    proc = run_cli("convert.py", hf, tmp_path / "unhealed.gguf", "--fuse", "2", "--split", "2", "--no-heal",
                   "--router-init", "random", "--save-hf", up, "--text", calibration_text, "--ctx", "64", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("-m", "d2m_gguf", "distill", up, healed, "--teacher", hf, "--text", calibration_text, "--ctx", "64",
                   "--lora", "4", "--lr", "1e-3", "--tokens", "2048", "--minutes", "0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    before, after = load_hf_checkpoint(up).state_dict(), load_hf_checkpoint(healed).state_dict()
    assert before.keys() == after.keys()   # merged: no adapter tensors left
    adapted = {k for k in before if k.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS))}
    assert adapted and all(not torch.equal(before[k], after[k]) for k in adapted)
    assert all(torch.equal(before[k], after[k]) for k in before.keys() - adapted)   # norms, routers, experts, ...
    proc = run_cli("convert.py", healed, out, "--outtype", "f32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert validate_gguf(out) == []
    reread = load_hybrid(out).state_dict()
    assert all(torch.equal(reread[k], v) for k, v in after.items())
    text, _ = llama.complete(out, "Hello", n=4)
    assert text.strip()
