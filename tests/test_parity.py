"""The dense2moe contract end to end: our GGUF in the patched llama.cpp gives the PyTorch reference's logits.

f32: NMSE <= 1e-6 and 100% top-1 agreement; q8_0: NMSE <= 1e-3 and >= 98% top-1
agreement; on 256 positions, in batch prefill and token-by-token decode. The
reference runs the weights of the file under test (read back with
reader.load_hybrid: for f32 the upcycled model itself, for q8_0 its dequantized
weights with llama.cpp's int8 activation rounding emulated), so what is compared is
the two implementations. The KV cache llama.cpp allocates holds only the attention layers.

Why q8_0 top-1 is counted where it is decided: with int8 activations, logits are
chaotic at the ~5e-4 NMSE level, and how chaotic depends on the CPU's kernels. Measured
on SmolLM2 (all-kinds plan, 256 calibration tokens). AVX2 (AMD EPYC): two references
that differ only in the last bit of the q8_0 scale reciprocal (1/d vs 127/amax, both
found in ggml) agree with each other at top-1 on 92.6% of positions (NMSE 4.0e-4);
llama.cpp vs the reference 93.4% (NMSE 3.5e-4), every disagreement with a top-2 margin
under 0.42 nats (1.6x the logit noise). AVX-512 (Intel Xeon, 2026-12-01): llama.cpp's own
batch and decode paths agree with each other on only 94.1% (NMSE 1.5e-4); llama.cpp vs
the reference 90.2% batch, 91.0% decode (NMSE 4.1e-4, 4.3e-4), with disagreements at
margins up to 2.7x the noise. So at q8_0 agreement is asserted on the positions whose
top-2 margin exceeds DECIDED_MARGIN (3) times the measured logit noise (RMS of the
difference), which must be at least a quarter of all positions (32-34% there, every
one agreeing); the raw rates, and llama.cpp's batch-vs-decode agreement, are logged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2m_gguf.checkpoint import Checkpoint
from d2m_gguf.ggufout import OutType
from d2m_gguf.hybrid_export import export_hybrid
from d2m_gguf.llamacpp import parse_kv_cache
from d2m_gguf.plan import identity_plan, load_plan
from d2m_gguf.reader import load_hybrid
from d2m_gguf.spec import load_dense_spec
from d2m_gguf.upcycle import upcycle

from .conftest import REPO
from .helpers import nmse, top1_agreement

N_POSITIONS = 256
LIMITS = {"f32": (1e-6, 1.0), "q8_0": (1e-3, 0.98)}
DECIDED_MARGIN = 3.0      # a decided position's top-2 margin, in units of the logit noise
MIN_DECIDED_SHARE = 0.25  # of all positions


def hybrid(hf_dir, plan_path, out, outtype):
    spec = load_dense_spec(hf_dir)
    plan = load_plan(plan_path, spec.n_layer)
    model = upcycle(spec, Checkpoint(hf_dir), plan)
    export_hybrid(model, plan, spec, hf_dir, out, OutType(outtype), progress=False)
    return spec, plan, model


def text_tokens(hf_dir, text_file, n):
    from d2m_gguf.data import Tokenizer
    ids = Tokenizer(hf_dir).encode(text_file.read_text(encoding="utf-8")[:20000])
    assert len(ids) >= n
    return ids[:n]


def decided_top1(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement on positions whose reference top-2 margin exceeds DECIDED_MARGIN x the logit noise,
    their share)."""
    noise = float(np.sqrt(((got - ref) ** 2).mean()))
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > DECIDED_MARGIN * noise
    return top1_agreement(got[decided], ref[decided]) if decided.any() else 0.0, float(decided.mean())


def check(llama, gguf_path, tokens, outtype, prefill=0):
    """llama.cpp's batch and decode logits against the reference's; decode one token at a time after a one-batch
    prefill of the first `prefill` tokens, judged on the decoded positions."""
    model = load_hybrid(gguf_path, emulate_llama_cpp=True)   # F32 weights: no rounding (GELU: ggml's table)
    with torch.no_grad():
        ref = model(torch.tensor([tokens]))[0].numpy()
    max_nmse, min_top1 = LIMITS[outtype]
    logs, outputs = {}, {}
    for mode in ("batch", "decode"):
        first = prefill if mode == "decode" else 0
        got, log = llama.logits(gguf_path, tokens, mode=mode, prefill=first)
        assert got.shape == ref.shape
        got, want = got[first:], ref[first:]
        e, a = nmse(got, want), top1_agreement(got, want)
        print(f"{gguf_path.name} {mode}: NMSE {e:.3g}, top-1 agreement {a:.4f}")
        assert e <= max_nmse, f"{mode}: NMSE {e:.3g} > {max_nmse}"
        if outtype == "f32":
            assert a >= min_top1, f"{mode}: top-1 agreement {a:.3f} < {min_top1}"
        else:
            a_decided, share = decided_top1(got, want)
            print(f"  decided positions {share:.3f}, agreement there {a_decided:.4f}")
            assert share >= MIN_DECIDED_SHARE, \
                f"{mode}: only {share:.2f} of positions have a top-2 margin above {DECIDED_MARGIN}x the noise"
            assert a_decided >= min_top1, f"{mode}: top-1 agreement on decided positions {a_decided:.3f} < {min_top1}"
        logs[mode] = log
        outputs[mode] = got
    if outtype != "f32":
        batch, decode = outputs["batch"][prefill:], outputs["decode"]
        print(f"  llama.cpp batch vs decode: NMSE {nmse(batch, decode):.3g}, "
              f"top-1 agreement {top1_agreement(batch, decode):.4f}")
    return logs


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_family_parity(tiny_dirs, llama, tmp_path, family, outtype):
    out = tmp_path / f"{family}.gguf"
    spec, plan, model = hybrid(tiny_dirs[family], REPO / "examples/plans/tiny-all-kinds.json", out, outtype)
    tokens = torch.randint(0, spec.vocab_size, (N_POSITIONS,), generator=torch.Generator().manual_seed(1)).tolist()
    if outtype == "f32":
        reread = load_hybrid(out).state_dict()
        assert all(torch.equal(reread[k], v) for k, v in model.state_dict().items())
    logs = check(llama, out, tokens, outtype)
    kv = parse_kv_cache(logs["batch"])
    assert kv.layers == sum(b.attention is not None for b in plan.blocks) == 2


@pytest.fixture(scope="module")
def smollm2_hybrids(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-hybrid")
    plan_path = REPO / "examples/plans/smollm2-all-kinds.json"
    out = {}
    for outtype in ("f32", "q8_0"):
        spec, plan, model = hybrid(smollm2_dir, plan_path, root / f"smollm2-{outtype}.gguf", outtype)
        out[outtype] = root / f"smollm2-{outtype}.gguf"
    return spec, plan, model, out


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_smollm2_parity(smollm2_hybrids, smollm2_dir, llama, calibration_text, outtype):
    spec, plan, model, files = smollm2_hybrids
    tokens = text_tokens(smollm2_dir, calibration_text, N_POSITIONS)
    check(llama, files[outtype], tokens, outtype)


@pytest.mark.slow
def test_kv_cache_scales_with_attention_layers(smollm2_hybrids, smollm2_dir, llama, tmp_path):
    """llama.cpp's printed KV size: attention layers only (24 of 26 blocks here, 30 in the dense model)."""
    spec, plan, _, files = smollm2_hybrids
    dense = tmp_path / "dense.gguf"
    export_hybrid(upcycle(spec, Checkpoint(smollm2_dir), identity_plan(30)), identity_plan(30), spec, smollm2_dir,
                  dense, OutType.Q8_0, progress=False)
    tokens = list(range(100, 164))
    _, log_hybrid = llama.logits(files["q8_0"], tokens, ctx=512)
    _, log_dense = llama.logits(dense, tokens, ctx=512)
    kv_h, kv_d = parse_kv_cache(log_hybrid), parse_kv_cache(log_dense)
    n_attn = sum(b.attention is not None for b in plan.blocks)
    assert (kv_h.layers, kv_d.layers) == (n_attn, 30) == (24, 30)
    assert kv_h.cells == kv_d.cells
    assert kv_h.mib / kv_d.mib == pytest.approx(n_attn / 30, rel=1e-3)


@pytest.mark.slow
def test_smollm2_perplexity_agrees_with_reference(smollm2_hybrids, smollm2_dir, llama, wikitext, tmp_path):
    """llama-perplexity and the reference (the same llama-perplexity procedure in PyTorch) agree within 0.5%."""
    from d2m_gguf.data import Tokenizer, perplexity, token_chunks

    spec, plan, model, files = smollm2_hybrids
    chunk = tmp_path / "wiki.txt"
    chunk.write_text(wikitext.read_text(encoding="utf-8")[:12000], encoding="utf-8")
    ctx, n_chunks = 256, 4
    ppl_cpp, _ = llama.perplexity(files["f32"], chunk, ctx=ctx, chunks=n_chunks)
    tok = Tokenizer(smollm2_dir)
    ppl_ref = perplexity(model, token_chunks(tok.encode(chunk.read_text(encoding="utf-8")), ctx, n_chunks, tok.bos))
    assert ppl_cpp == pytest.approx(ppl_ref, rel=0.005)
