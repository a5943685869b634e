"""Healing on transformers' Trainer: PEFT LoRA trains only the adapters and the merged model converts to a GGUF;
the GPU comparison (prune vs LF-UC at the same end-to-end budget) runs end to end at a tiny budget."""

from __future__ import annotations

import csv
import math

import torch

from d2m_gguf.hf_export import load_hf_checkpoint
from d2m_gguf.trainer import LORA_TARGETS

from .conftest import run_cli
from .helpers import assert_gguf_holds, upcycled_unhealed


def test_lora_trains_only_adapters_and_the_merged_model_converts(tiny_dirs, calibration_text, llama, tmp_path):
    hf = tiny_dirs["qwen2"]
    up, healed, out = upcycled_unhealed(hf, calibration_text, tmp_path), tmp_path / "lora", tmp_path / "lora.gguf"
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
    assert_gguf_holds(out, after, llama)


def test_the_gpu_comparison_runs_at_a_tiny_budget_on_cpu(tiny_dirs, calibration_text, wikitext, llama, tmp_path):
    """`d2m bench at-scale` (make gpu-compare): both methods healed with the same tokens by convert, then end to
    end on the Trainer, written as GGUFs and compared on the same WikiText chunks."""
    from d2m_gguf.bench.at_scale import AtScaleRequest, compare_at_scale

    req = AtScaleRequest(hf_dir=tiny_dirs["llama"], fuse=2, tokens=1024, local_tokens=1024, batch=4, heal_ctx=64,
                         text=calibration_text, precision="fp32", wikitext=wikitext, ctx=128, chunks=4,
                         results=tmp_path, progress=False)
    out = compare_at_scale(req, llama)
    with open(out / "at_scale.csv", encoding="utf-8") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dense", "prune", "lfuc"}
    for method in ("prune", "lfuc"):
        assert int(rows[method]["e2e_tokens"]) >= 1024 and float(rows[method]["e2e_tokens_per_s"]) > 0
        assert math.isfinite(float(rows[method]["ppl"]))
    ratio, se = rows["lfuc"]["ppl_vs_prune"].split(" ± ")
    assert float(ratio) > 0 and float(se) >= 0 and rows["lfuc"]["beats_prune"] in ("yes", "no")
    assert "commit" in (out / "at_scale.md").read_text()
