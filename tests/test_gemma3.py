"""The gemma3 family through the toolchain, on the real Gemma 3 270M (`make gemma3`; issue 32).

- The dense export is upstream's file byte for byte, and stock llama.cpp measures the same perplexity on both.
- A pruned Gemma 3 is written as stock `gemma3` with the kept layers' sliding-window pattern (pruning moves the
  global layers off llama.cpp's default every-6th) and upstream's gemma3 graph computes the logits of the PyTorch
  reference with Gemma-style blocks (four norms, GeGLU, scaled embeddings, q/k norm, sliding window with its own
  RoPE base), past the 512-token window: the reference is held to an implementation it shares no code with.
  (Against transformers' Gemma3ForCausalLM it measured NMSE < 1e-9 on 640 tokens, 2026-12-05.)
- An all-kinds dense2moe plan of it runs in the patched build with parity; transformers runs its --save-hf
  checkpoint; the default job's shape runs on the host and on arm64.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from d2m_gguf.checkpoint import Checkpoint
from d2m_gguf.dense_export import export_dense
from d2m_gguf.errors import D2MError
from d2m_gguf.ggufout import OutType
from d2m_gguf.plan import BlockPlan, FusionPlan
from d2m_gguf.reader import inspect_gguf
from d2m_gguf.spec import load_dense_spec
from d2m_gguf.stock_export import GgufArch, export_model
from d2m_gguf.upcycle import hybrid_config, upcycle

from .conftest import REPO, _env_path, _require
from .helpers import gguf_diff, nmse, top1_agreement

N_TOKENS = 640          # past the sliding window (512), so the local layers' mask and RoPE base matter
PREFILL = 480           # the f32 decode check: one batch, then token by token across the window's edge (each
                        # step reads the whole f32 262k-token head: all 640 steps took 44 s, these 160 22 s)


@pytest.fixture(scope="module")
def tokens(gemma3_dir, calibration_text):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(gemma3_dir))(calibration_text.read_text(encoding="utf-8")[:8000]).input_ids
    assert len(ids) >= N_TOKENS
    return ids[:N_TOKENS]


def test_the_spec_reads_gemma3(gemma3_dir):
    spec = load_dense_spec(gemma3_dir)
    assert (spec.family, spec.dense_gguf_arch, spec.n_layer, spec.n_embd, spec.head_dim) == ("gemma3", "gemma3", 18, 640, 256)
    assert spec.post_norms and spec.qk_norm and spec.ffn_activation == "gelu" and spec.norm_offset == 1.0
    assert spec.embedding_scale == pytest.approx(640 ** 0.5)
    assert spec.sliding_window == 512 and spec.rope_theta == 1e6 and spec.rope_theta_swa == 1e4
    assert [i for i, s in enumerate(spec.swa_layers) if not s] == [5, 11, 17]
    assert spec.attention_scale == 256 ** -0.5


def test_a_period_gives_every_nth_layer_global():
    """Older configs and llama.cpp's scalar pattern give a period: spec and reader share one reading of it."""
    from d2m_gguf.spec import every_nth_global

    assert [i for i, s in enumerate(every_nth_global(18)) if not s] == [5, 11, 17]
    with pytest.raises(D2MError, match="must be positive"):
        every_nth_global(18, 0)


def test_gemma3_blocks_hold_whole_mlps(gemma3_dir):
    """Each MLP's output norm is not linear: no wide dense block summing MLPs, no MLP split into experts."""
    spec = load_dense_spec(gemma3_dir)
    blocks = [BlockPlan(i, (i,), moe=False) for i in range(18) if i != 4]
    wide = list(blocks)
    wide[3] = BlockPlan(3, (3, 4), moe=False)
    with pytest.raises(D2MError, match="whole MLPs"):
        hybrid_config(spec, FusionPlan(tuple(wide), 18))
    moe = list(blocks)
    moe[3] = BlockPlan(3, (3, 4), moe=True, top_k=1)
    cfg = hybrid_config(spec, FusionPlan(tuple(moe), 18))
    assert cfg.blocks[3].n_expert == 2 and cfg.blocks[3].sliding and not cfg.blocks[4].sliding  # block 4: layer 5


@pytest.mark.slow
def test_dense_export_is_upstreams(gemma3_dir, gemma3_upstream_f32, llama_stock, wikitext, tmp_path):
    upstream, ours = gemma3_upstream_f32, tmp_path / "ours.gguf"
    export_dense(gemma3_dir, ours, OutType.F32, progress=False)
    d = gguf_diff(upstream, ours)
    assert not (d.missing_keys or d.changed_keys or d.extra_keys), (d.missing_keys, d.changed_keys, d.extra_keys)
    assert not (d.missing_tensors or d.extra_tensors or d.changed_tensors)
    text = tmp_path / "wiki.txt"
    text.write_text(wikitext.read_text(encoding="utf-8")[:30000], encoding="utf-8")
    ppl_upstream, _ = llama_stock.perplexity(upstream, text, ctx=N_TOKENS, chunks=2)
    ppl_ours, _ = llama_stock.perplexity(ours, text, ctx=N_TOKENS, chunks=2)
    assert ppl_ours == ppl_upstream and 5 < ppl_ours < 100


@pytest.mark.slow
def test_a_pruned_gemma3_is_stock_gemma3(gemma3_dir, tokens, llama, tmp_path):
    """Layers 3 and 7 removed: the global layers 5, 11, 17 become blocks 4, 9, 15 of 16; the file says so."""
    spec = load_dense_spec(gemma3_dir)
    plan = FusionPlan(tuple(BlockPlan(i, (i,), moe=False) for i in range(18) if i not in (3, 7)), 18, method="prune")
    model = upcycle(spec, Checkpoint(gemma3_dir), plan).eval()
    out = tmp_path / "prune.gguf"
    choice = export_model(model, plan, spec, gemma3_dir, out, OutType.F32, GgufArch.AUTO, progress=False)
    assert choice.arch == "gemma3" and inspect_gguf(out)["runtime"] == "stock llama.cpp"
    import gguf
    pattern = gguf.GGUFReader(out).fields["gemma3.attention.sliding_window_pattern"].contents()
    assert [i for i, s in enumerate(pattern) if not s] == [4, 9, 15]
    with torch.no_grad():
        want = model(torch.tensor([tokens]))[0].numpy()
    got, _ = llama.logits(out, tokens, ctx=1024)
    print(f"pruned gemma3 in llama.cpp vs the reference: NMSE {nmse(got, want):.2e}")
    assert nmse(got, want) < 1e-6 and top1_agreement(got, want) == 1.0


# ---- the dense2moe contract with Gemma-style blocks (the patched llama.cpp) --------------------------------

@pytest.fixture(scope="module")
def all_kinds(gemma3_dir, tmp_path_factory):
    """examples/plans/gemma3-all-kinds.json at f32 and q8_0, and the reference it was written from."""
    from d2m_gguf.hybrid_export import export_hybrid
    from d2m_gguf.plan import load_plan

    spec = load_dense_spec(gemma3_dir)
    plan = load_plan(REPO / "examples/plans/gemma3-all-kinds.json", spec.n_layer)
    model = upcycle(spec, Checkpoint(gemma3_dir), plan).eval()
    root = tmp_path_factory.mktemp("gemma3-all-kinds")
    files = {t: root / f"all-kinds-{t}.gguf" for t in ("f32", "q8_0")}
    for outtype, path in files.items():
        export_hybrid(model, plan, spec, gemma3_dir, path, OutType(outtype), progress=False)
    return plan, model, files


@pytest.mark.slow
def test_all_kinds_parity_f32(all_kinds, tokens, llama):
    """Past the window, in batch prefill and token-by-token decode, within test_parity's f32 bounds (NMSE 1e-6,
    every top-1), the reference computing GELU as ggml's f16 table does."""
    from d2m_gguf.reader import load_hybrid

    from .test_parity import check

    plan, model, files = all_kinds
    reread = load_hybrid(files["f32"])
    floats = ("rms_eps", "embedding_scale")     # stored as f32
    assert replace(reread.cfg, **{f: 0.0 for f in floats}) == replace(model.cfg, **{f: 0.0 for f in floats})
    assert all(torch.equal(reread.state_dict()[k], v) for k, v in model.state_dict().items())
    check(llama, files["f32"], tokens, "f32", prefill=PREFILL)


@pytest.mark.slow
def test_all_kinds_parity_q8_0(all_kinds, tokens, llama):
    """At q8_0 this model is chaotic where SmolLM2's is not: with two attention-free blocks, int8 activation
    rounding moves its logits by NMSE 0.05 from the f32 model, and llama.cpp's own batch and decode paths
    differ by 3-6e-3 (2026-12-05), so test_parity's fixed 1e-3 cannot hold (the dense Gemma meets it: 5e-4),
    nor its decided-positions rule (9% of positions clear 3x this noise). The reference must be as close to
    llama.cpp as llama.cpp's two paths are to each other: NMSE within 4x theirs, top-1 agreement within 10 points
    of theirs (measured: NMSE 0.009 against 0.006, top-1 80% against 85%; a wrong kernel or a wrong rounding moves
    the NMSE to the f32 model's 0.05). f32 (above) holds the logic to test_parity's strict bounds. The KV cache
    holds the attention blocks only (sliding ones in the window's cache)."""
    from d2m_gguf.llamacpp import parse_kv_cache
    from d2m_gguf.reader import load_hybrid

    plan, _, files = all_kinds
    with torch.no_grad():
        ref = load_hybrid(files["q8_0"], emulate_llama_cpp=True)(torch.tensor([tokens]))[0].numpy()
    (batch, log), (decode, _) = (llama.logits(files["q8_0"], tokens, mode=m) for m in ("batch", "decode"))
    own, own_top1 = nmse(batch, decode), top1_agreement(batch, decode)
    for mode, got in (("batch", batch), ("decode", decode)):
        e, a = nmse(got, ref), top1_agreement(got, ref)
        print(f"q8_0 {mode}: NMSE {e:.3g}, top-1 {a:.4f} (llama.cpp batch vs decode: {own:.3g}, {own_top1:.4f})")
        assert e <= max(1e-3, 4 * own) and a >= own_top1 - 0.1
    assert parse_kv_cache(log).layers == sum(b.attention is not None for b in plan.blocks) == 12


@pytest.mark.slow
def test_all_kinds_in_transformers(all_kinds, gemma3_dir, tokens, tmp_path):
    """--save-hf of a Gemma-style dense2moe model: transformers loads it (remote code) and computes the
    reference's logits; generate() past the window with its cache gives the reference's greedy tokens."""
    from transformers import AutoModelForCausalLM

    from d2m_gguf.hf_export import save_hf_checkpoint

    plan, model, _ = all_kinds
    spec = load_dense_spec(gemma3_dir)
    assert save_hf_checkpoint(model, plan, spec, gemma3_dir, tmp_path / "hf") == "Dense2MoEForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32)
    x = torch.tensor([tokens])
    with torch.no_grad():
        assert torch.equal(hf.eval()(x).logits, model(x))
        prompt, n_new = tokens[:600], 4
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)[0, len(prompt):].tolist()
    assert out == model.generate(prompt, n_new)[len(prompt):]


# ---- the job ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_job_on_gemma3_runs_on_host_and_arm64(gemma3_dir, llama, wikitext, tmp_path):
    """The default job's shape (analyse, plan --fuse 4, upcycle, heal, write) with a small healing budget. It says
    what the LM head leaves to gain (63% of the parameters, the tied 262k-token head read every token); the file
    runs in the host build and in the arm64 build under qemu with the same perplexity within 2%
    (bench.matrix.arm64_check)."""
    import json
    import shutil

    from d2m_gguf.bench.matrix import arm64_check, arm64_check_text
    from d2m_gguf.llamacpp import QEMU, LlamaCpp

    from .conftest import run_cli

    out = tmp_path / "gemma3-lfuc4.gguf"
    proc = run_cli("convert.py", gemma3_dir, out, "--fuse", "4", "--heal-tokens", "16384", "--outtype", "q8_0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the LM head is" in proc.stderr and "removing every layer would be" in proc.stderr
    summary = json.loads((tmp_path / "gemma3-lfuc4.gguf.d2m" / "summary.json").read_text())
    predicted = summary["predicted"]
    assert predicted["lm_head_share"] > 0.5 and 1.0 < predicted["speedup"] < predicted["speedup_ceiling"] < 2.0
    arm64_bin = _env_path("D2M_LLAMA_ARM64_BIN", REPO / "build" / "llama.cpp-arm64" / "bin")
    _require(arm64_bin / "llama-perplexity", "arm64")
    assert shutil.which(QEMU[0]), "qemu-aarch64-static is missing: `make deps` installs qemu-user-static"
    check = arm64_check(llama, LlamaCpp(arm64_bin, wrapper=QEMU), out, arm64_check_text(wikitext, tmp_path / "w.txt"))
    print(f"gemma3 LF-UC 4 (q8_0): host ppl {check.host:.3f}, arm64 {check.arm64:.3f}")
    assert check.agrees and check.host < 1000, check
