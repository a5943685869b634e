"""The patched llama.cpp with dense2moe files: every quant type runs (Q4_0 through the CPU repack path),
generation works, and inconsistent files are refused with a clear error instead of a crash."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from d2m_gguf.constants import Keys
from d2m_gguf.errors import D2MError
from d2m_gguf.llamacpp import parse_kv_cache

from .helpers import rewrite_gguf
from .test_parity import hybrid, REPO

QUANT_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_NL"]


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "smollm2-all-kinds-f16.gguf"
    hybrid(smollm2_dir, REPO / "examples/plans/smollm2-all-kinds.json", path, "f16")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quantized_hybrid_loads_and_generates(smollm2_f16, llama, tmp_path, qtype):
    out = tmp_path / f"m-{qtype}.gguf"
    llama.quantize(smollm2_f16, out, qtype)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.10.ffn_gate_inp.weight"] == "F32"  # routers stay exact
    assert any(v == qtype.split("_")[0] + ("_" + qtype.split("_")[1] if qtype in ("Q8_0", "Q4_0") else "") or
               v.startswith(qtype[:2]) for v in types.values())
    text, log = llama.complete(out, "The capital of France is", n=12, extra=["-v"])
    assert len(text.split()) >= 6, text
    assert parse_kv_cache(log).layers == 24
    if qtype == "Q4_0":
        # llama.cpp repacks Q4_0 for the CPU's int8 dot-product kernels (AVX2/AVX-512 here, NEON dotprod/i8mm on arm64)
        assert "CPU_REPACK" in log, log[-3000:]


def _broken(src, dst, **changes):
    return rewrite_gguf(src, dst, **changes)


def _refused(llama, path, fragment):
    tokens = path.with_suffix(".tokens")
    np.arange(1, 9, dtype="<i4").tofile(tokens)
    proc = llama.run("llama-d2m-logits", ["-m", path, "--tokens", tokens, "--out", path.with_suffix(".out")],
                     check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # an error exit, not a signal
    assert fragment in proc.stderr, proc.stderr[-2000:]


U32, BOOL, ARRAY = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL, gguf.GGUFValueType.ARRAY


@pytest.fixture(scope="module")
def tiny_hybrid(tiny_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("broken") / "tiny.gguf"
    hybrid(tiny_dirs["llama"], REPO / "examples/plans/tiny-all-kinds.json", path, "f32")
    return path   # blocks: [no-attn moe 2 top-1, attn dense, attn moe 2 top-2, no-attn dense]


def test_experts_used_above_expert_count_is_refused(tiny_hybrid, llama, tmp_path):
    bad = _broken(tiny_hybrid, tmp_path / "b.gguf", set_kv={Keys.EXPERT_USED_COUNT: ([1, 0, 3, 0], ARRAY, U32)})
    _refused(llama, bad, "expert_used_count")


def test_per_layer_array_of_wrong_length_is_refused(tiny_hybrid, llama, tmp_path):
    bad = _broken(tiny_hybrid, tmp_path / "b.gguf", set_kv={Keys.ATTENTION_PRESENT: ([False, True, True], ARRAY, BOOL)})
    _refused(llama, bad, "wrong array length")


def test_missing_expert_tensor_is_refused(tiny_hybrid, llama, tmp_path):
    bad = _broken(tiny_hybrid, tmp_path / "b.gguf", drop_tensors=("blk.2.ffn_up_exps.weight",))
    _refused(llama, bad, "blk.2.ffn_up_exps.weight")


def test_expert_tensor_of_wrong_shape_is_refused(tiny_hybrid, llama, tmp_path):
    reader = gguf.GGUFReader(tiny_hybrid)
    t = next(t for t in reader.tensors if t.name == "blk.2.ffn_gate_exps.weight")
    data = np.array(t.data)[:, :-1, :]  # one neuron short
    bad = _broken(tiny_hybrid, tmp_path / "b.gguf", replace_tensors={t.name: np.ascontiguousarray(data)})
    _refused(llama, bad, "blk.2.ffn_gate_exps.weight")


def test_attention_tensor_in_attention_free_layer_is_refused(tiny_hybrid, llama, tmp_path):
    q = np.zeros((64 * 4 // 4 * 4, 64), dtype=np.float32)
    bad = _broken(tiny_hybrid, tmp_path / "b.gguf", add_tensors={"blk.3.attn_q.weight": q})
    _refused(llama, bad, "layer 3 is flagged attention-free")


def test_our_validator_sees_the_same_problems(tiny_hybrid, tmp_path):
    from d2m_gguf.reader import validate_gguf
    bad = _broken(tiny_hybrid, tmp_path / "b.gguf", drop_tensors=("blk.2.ffn_up_exps.weight",),
                  add_tensors={"blk.3.attn_q.weight": np.zeros((64, 64), dtype=np.float32)},
                  set_kv={Keys.EXPERT_USED_COUNT: ([1, 0, 3, 0], ARRAY, U32)})
    problems = validate_gguf(bad)
    assert any("3 experts used > 2 experts" in p for p in problems), problems
    with pytest.raises(D2MError):
        from d2m_gguf.reader import load_hybrid
        load_hybrid(bad)
