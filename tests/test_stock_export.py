"""Stock architectures: a model that llama, qwen2, qwen3 or deci computes exactly is written as one, and stock
llama.cpp runs it as the patched build runs its dense2moe twin.

"Exactly" is held two ways. The weights: both files read back (reader.load_hybrid, which puts a llama or deci
file's interleaved q/k rows back in rotate-half order) to the same tensors bit for bit. The runtime: stock
llama-perplexity on the stock file against the patched build on the dense2moe twin. qwen2 and qwen3 keep HF's
rotate-half RoPE, the graph is the twin's op for op, and the printed perplexities are equal. llama and deci
rotate interleaved pairs, so each q.k dot product sums the same products in another order: measured on an
AVX-512 Xeon, f32 perplexities differ in the 6th digit (SmolLM2 prune 4: 44.4820 against 44.4823) and q8_0
ones by up to 0.4% (44.6743 against 44.8147), where the last-bit differences meet int8 activation rounding (the
noise llama.cpp's own batch and decode paths show at q8_0, test_parity.py). Those are the bounds below.
"""

from __future__ import annotations

import json

import pytest
import torch

from d2m_gguf.checkpoint import Checkpoint
from d2m_gguf.errors import D2MError
from d2m_gguf.ggufout import OutType
from d2m_gguf.llamacpp import parse_kv_cache
from d2m_gguf.plan import BlockPlan, FusionPlan
from d2m_gguf.reader import inspect_gguf, load_hybrid, validate_gguf
from d2m_gguf.spec import load_dense_spec
from d2m_gguf.stock_export import ArchChoice, GgufArch, choose_arch, export_model
from d2m_gguf.upcycle import hybrid_config, upcycle

from .conftest import run_cli

# relative perplexity difference allowed where the architecture rotates interleaved pairs (module docstring)
INTERLEAVED_PPL_RTOL = {"f32": 1e-4, "q8_0": 0.01}
FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def plan_of(kind: str, n_layer: int = 6, method: str = "manual") -> FusionPlan:
    """prune: drop layer 3; attn-free: layers 2 and 4 lose attention; attn-free-0: layer 0 does; wide: layer 2's
    MLP joins layer 1's in one dense FFN; moe: ... as two routed experts."""
    blocks = {i: BlockPlan(i, (i,), moe=False) for i in range(n_layer)}
    if kind == "prune":
        del blocks[3]
    elif kind == "attn-free":
        blocks[2], blocks[4] = BlockPlan(None, (2,), moe=False), BlockPlan(None, (4,), moe=False)
    elif kind == "attn-free-0":
        blocks[0] = BlockPlan(None, (0,), moe=False)
    elif kind in ("wide", "moe"):
        del blocks[2]
        blocks[1] = BlockPlan(1, (1, 2), moe=kind == "moe", top_k=1 if kind == "moe" else 0)
    return FusionPlan(tuple(blocks.values()), n_layer, router_init="host", method=method)


# ---- which architecture -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_first_exact_architecture_is_chosen(tiny_dirs, family):
    spec = load_dense_spec(tiny_dirs[family])

    def choice(kind: str, wanted: GgufArch = GgufArch.AUTO) -> ArchChoice:
        return choose_arch(hybrid_config(spec, plan_of(kind)), spec, wanted)

    assert choice("prune").arch == FAMILY_ARCH[family] and choice("prune").padding == 0
    assert choice("prune", GgufArch.DENSE2MOE).arch == "dense2moe"
    assert choice("moe").arch == "dense2moe" and "block 1 routes between 2 experts" in choice("moe").reason
    assert choice("attn-free-0").arch == "dense2moe"
    if family == "qwen3":   # no q/k norm in deci: attention-free blocks need the patch; a wide one is padded
        assert choice("attn-free").arch == "dense2moe" and "q/k norm" in choice("attn-free").reason
        wide = choice("wide")
        assert (wide.arch, wide.n_ff, wide.padding) == ("qwen3", 2 * spec.n_ff, 3 * spec.n_embd * spec.n_ff * 4)
    else:                   # deci: attention-free blocks, and per-layer widths without padding
        assert choice("attn-free").arch == "deci" and choice("wide").arch == "deci"
        assert choice("wide", GgufArch.STANDARD).padding == 3 * spec.n_embd * spec.n_ff * 4
    deci_refusal = "deci has no q/k norm" if family == "qwen3" else "block 0 has no attention"
    for kind, wanted, why in (("moe", GgufArch.STANDARD, "block 1 routes"), ("attn-free", GgufArch.STANDARD,
                              "block 2 has no attention"), ("attn-free-0", GgufArch.DECI, deci_refusal)):
        with pytest.raises(D2MError, match=why):
            choice(kind, wanted)


# ---- the files, in stock and patched llama.cpp ----------------------------------------------------------------

def _write(hf_dir, plan, out, outtype, gguf_arch):
    spec = load_dense_spec(hf_dir)
    model = upcycle(spec, Checkpoint(hf_dir), plan)
    return export_model(model, plan, spec, hf_dir, out, OutType(outtype), GgufArch(gguf_arch), progress=False)


def assert_same_model_in_both_runtimes(stock_file, twin, llama, llama_stock, text, outtype, ctx, chunks, n_text,
                                      read_back=True):
    """The weights read back equal; stock llama.cpp's perplexity (and, in f32, greedy text) equal the twin's in
    the patched build, within the module's bounds; the KV cache no larger. Returns the two perplexities."""
    info = inspect_gguf(stock_file)     # gguf-py's reader sees the stock architecture
    stock_arch = info["architecture"]
    assert stock_arch != "dense2moe" and info["runtime"] == "stock llama.cpp"
    if read_back:                       # seconds each: gguf-py parses a 49k-token vocabulary per file
        a, b = load_hybrid(stock_file).state_dict(), load_hybrid(twin).state_dict()   # each validated too
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ppl_stock, log_stock = llama_stock.perplexity(stock_file, text, ctx=ctx, chunks=chunks, extra=["-lv", "4"])
    ppl_twin, log_twin = llama.perplexity(twin, text, ctx=ctx, chunks=chunks, extra=["-lv", "4"])
    print(f"{stock_file.name}: {stock_arch} {ppl_stock} in stock llama.cpp, dense2moe {ppl_twin} in the patched")
    if stock_arch in ("llama", "deci"):
        assert ppl_stock == pytest.approx(ppl_twin, rel=INTERLEAVED_PPL_RTOL[outtype])
    else:
        assert ppl_stock == ppl_twin
    assert parse_kv_cache(log_stock).mib == parse_kv_cache(log_twin).mib
    if outtype == "f32":
        prompt = "The capital of France is"
        assert llama_stock.complete(stock_file, prompt, n=n_text)[0] == llama.complete(twin, prompt, n=n_text)[0]
    return ppl_stock, ppl_twin


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("kind", ["prune", "attn-free"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_stock_file_computes_its_dense2moe_twin(tiny_dirs, llama, llama_stock, wikitext, tmp_path, family,
                                                     kind, outtype):
    hf_dir, plan = tiny_dirs[family], plan_of(kind, method="prune" if kind == "prune" else "attn-prune")
    stock_file, twin = tmp_path / "auto.gguf", tmp_path / "twin.gguf"
    choice = _write(hf_dir, plan, stock_file, outtype, "auto")
    if kind == "attn-free" and family == "qwen3":
        assert choice.arch == "dense2moe"
        return
    _write(hf_dir, plan, twin, outtype, "dense2moe")
    assert choice.arch == (FAMILY_ARCH[family] if kind == "prune" else "deci")
    text = tmp_path / "wiki.txt"
    text.write_text(wikitext.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    # the weights are read back in f32 here and at both types for SmolLM2 below
    assert_same_model_in_both_runtimes(stock_file, twin, llama, llama_stock, text, outtype, 128, 4, 16,
                                       read_back=outtype == "f32")


def test_a_wide_block_is_padded_exactly(tiny_dirs, llama, llama_stock, wikitext, tmp_path):
    """qwen3 cannot use deci: its wide block is zero-padded in a standard file, which computes the same."""
    hf_dir, plan = tiny_dirs["qwen3"], plan_of("wide")
    padded, twin = tmp_path / "padded.gguf", tmp_path / "twin.gguf"
    assert _write(hf_dir, plan, padded, "f32", "auto").padding > 0
    _write(hf_dir, plan, twin, "f32", "dense2moe")
    text = tmp_path / "wiki.txt"
    text.write_text(wikitext.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    ppl_stock, _ = llama_stock.perplexity(padded, text, ctx=128, chunks=4)
    ppl_twin, _ = llama.perplexity(twin, text, ctx=128, chunks=4)
    assert ppl_stock == ppl_twin


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_smollm2_pruned_runs_on_stock_llama_cpp(smollm2_dir, llama, llama_stock, wikitext, tmp_path, outtype):
    """SmolLM2 with 4 layers pruned (those the planner's prune 4 drops) is a plain 26-layer llama."""
    blocks = tuple(BlockPlan(i, (i,), moe=False) for i in range(30) if i not in (13, 14, 15, 17))
    plan = FusionPlan(blocks, 30, method="prune")
    stock_file, twin = tmp_path / "prune4.gguf", tmp_path / "prune4-twin.gguf"
    assert _write(smollm2_dir, plan, stock_file, outtype, "auto").arch == "llama"
    _write(smollm2_dir, plan, twin, outtype, "dense2moe")
    assert len(inspect_gguf(stock_file)["layers"]) == 26
    text = tmp_path / "wiki.txt"
    text.write_text(wikitext.read_text(encoding="utf-8")[:40000], encoding="utf-8")
    ppl, _ = assert_same_model_in_both_runtimes(stock_file, twin, llama, llama_stock, text, outtype, 512, 4, 32)
    assert 5 < ppl < 100


def test_forcing_standard_on_a_routed_model_exits_2_and_writes_nothing(tiny_dirs, tmp_path):
    plan_file, out = tmp_path / "moe.json", tmp_path / "moe.gguf"
    plan_of("moe").save(plan_file)
    proc = run_cli("convert.py", tiny_dirs["llama"], out, "--plan", plan_file, "--no-heal", "--gguf-arch",
                   "standard", "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --gguf-arch standard: ")
    assert "block 1 routes between 2 experts" in proc.stderr
    assert not out.exists()


def test_the_job_says_which_architecture_and_runtime(tiny_dirs, llama, tmp_path):
    plan_file, out = tmp_path / "prune.json", tmp_path / "prune.gguf"
    plan_of("prune").save(plan_file)
    proc = run_cli("convert.py", tiny_dirs["qwen2"], out, "--plan", plan_file, "--no-heal", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "qwen2" in proc.stderr and "stock llama.cpp" in proc.stderr
    summary = json.loads((tmp_path / "prune.gguf.d2m" / "summary.json").read_text())
    assert summary["gguf"]["architecture"] == "qwen2" and summary["gguf"]["runtime"] == "stock llama.cpp"
    shown = run_cli("-m", "d2m_gguf", "inspect", out)
    assert shown.returncode == 0 and "runs on stock llama.cpp" in shown.stdout
    checked = run_cli("-m", "d2m_gguf", "validate", out)
    assert checked.returncode == 0 and "valid qwen2 GGUF; runs on stock llama.cpp" in checked.stdout
    plan_of("moe").save(plan_file)
    proc = run_cli("convert.py", tiny_dirs["qwen2"], out, "--plan", plan_file, "--no-heal", "--quiet")
    checked = run_cli("-m", "d2m_gguf", "validate", out)
    assert "valid dense2moe GGUF; runs on the patched llama.cpp" in checked.stdout


def test_a_stock_file_with_a_missing_tensor_is_invalid(tiny_dirs, tmp_path):
    from .helpers import rewrite_gguf

    out = tmp_path / "prune.gguf"
    _write(tiny_dirs["llama"], plan_of("prune"), out, "f32", "auto")
    broken = rewrite_gguf(out, tmp_path / "broken.gguf", drop_tensors=("blk.2.ffn_up.weight",))
    assert validate_gguf(broken) == ["tensor blk.2.ffn_up.weight is missing"]
    proc = run_cli("-m", "d2m_gguf", "validate", broken)
    assert proc.returncode == 2 and "blk.2.ffn_up.weight is missing" in proc.stderr


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_identity_plan_is_upstreams_dense_file(tiny_dirs, tmp_path, family):
    """Written as a standard file, the plan that changes nothing is the dense export (upstream's converter's file,
    test_dense_export.py) tensor for tensor and key for key, plus the d2m.* provenance."""
    from d2m_gguf.dense_export import export_dense
    from d2m_gguf.plan import identity_plan

    from .helpers import gguf_diff

    dense, ours = tmp_path / "dense.gguf", tmp_path / "ours.gguf"
    export_dense(tiny_dirs[family], dense, OutType.Q8_0, progress=False)
    assert _write(tiny_dirs[family], identity_plan(6), ours, "q8_0", "standard").arch == FAMILY_ARCH[family]
    d = gguf_diff(dense, ours)
    assert not (d.missing_keys or d.changed_keys or d.missing_tensors or d.extra_tensors or d.changed_tensors), d
    assert d.extra_keys and all(k.startswith("d2m.") for k in d.extra_keys)
