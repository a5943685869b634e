"""Device quantization recipes and the `make bench` matrix machinery, on a tiny model.

No timing is asserted: the tests check that rows, columns and files come out, that a failing row is recorded
and the rest completes, and that a recipe's overrides land in the quantized file."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from d2m_gguf.errors import D2MError
from d2m_gguf.fixtures.tiny import make_tiny
from d2m_gguf.pipeline import HealSettings
from d2m_gguf.quantize import (CLASS_PATTERNS, expert_token_counts, load_recipe, pool_rare_experts, recipe_names,
                               shape_fallback, tensor_types)

from .conftest import REPO, run_cli
from .test_parity import hybrid

TINY_PLAN = REPO / "examples" / "plans" / "tiny-all-kinds.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_dir, calibration_text) -> Path:
    """One tiny llama checkpoint (a few training steps so routing is not degenerate)."""
    return make_tiny("llama", tmp_path_factory.mktemp("bench") / "tiny", bpe_tokenizer_dir=smollm2_dir,
                     text_file=calibration_text, train_steps=10)


@pytest.fixture(scope="module")
def tiny_d2m_f16(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-d2m") / "tiny-d2m-f16.gguf"
    hybrid(tiny_llama, TINY_PLAN, out, "f16")
    return out


# ---- recipes ----------------------------------------------------------------------------------------------

def test_every_device_profile_has_a_recipe_with_reasons():
    from d2m_gguf.costmodel import load_devices

    assert {"host", "phone-i8mm", "phone-dotprod", "rpi5"} <= set(recipe_names())
    for key, dev in load_devices().items():
        r = load_recipe(key)
        assert r.name == dev.recipe, key
    for name in recipe_names():
        r = load_recipe(name)
        assert r.why["recipe"] and r.why["base"], name
        for cls, t in r.types.items():
            assert r.why.get(cls), f"{name}: {cls} has no why"
            assert t in gguf.GGMLQuantizationType.__members__, f"{name}: {cls} type {t}"
        assert r.types.get("router", "F32") in ("F32", "F16", "BF16")
        assert "experts" in r.types and "attention" in r.types and "output" in r.types


def test_recipe_args_and_shape_fallback():
    r = load_recipe("phone-i8mm")
    args = r.quantize_args(tied_embeddings=True, n_embd=576)
    assert f"{CLASS_PATTERNS['experts']}={r.types['experts']}" in args
    # llama-quantize does not apply its shape fallback to explicit output/embedding types: we do
    assert args[args.index("--output-tensor-type") + 1] == "Q8_0"          # Q6_K on 576 columns
    assert args[args.index("--token-embedding-type") + 1] == "Q8_0"        # tied: follows the head
    assert shape_fallback("Q6_K", 1024) == "Q6_K" and shape_fallback("Q4_K", 576) == "Q5_0"
    untied = r.quantize_args(tied_embeddings=False, n_embd=1024)
    assert untied[untied.index("--token-embedding-type") + 1] == r.types["embeddings"]


def test_unknown_recipe_is_a_user_error(tmp_path):
    with pytest.raises(D2MError, match="no quantization recipe"):
        load_recipe("nokia-3310")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "d2m-quant-recipe/1", "base": {"type": "Q4_0"},
                               "classes": {"router": {"type": "Q4_0", "why": "x"}}}))
    with pytest.raises(D2MError, match="router"):
        load_recipe(bad)


# ---- imatrix expert coverage -------------------------------------------------------------------------------

def _fake_imatrix(path: Path, counts: list[float], ne0: int = 8) -> np.ndarray:
    w = gguf.GGUFWriter(path, arch="imatrix", use_temp_file=False)
    rng = np.random.default_rng(0)
    sums = (rng.random((len(counts), ne0)) + 0.5).astype(np.float32) * np.asarray(counts, np.float32)[:, None]
    w.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", sums)
    w.add_tensor("blk.0.ffn_up_exps.weight.counts", np.asarray(counts, np.float32)[:, None])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sums


def test_rare_experts_are_filled_from_the_pool(tmp_path):
    src, dst = tmp_path / "raw.gguf", tmp_path / "pooled.gguf"
    sums = _fake_imatrix(src, [1000, 900, 3, 0])
    cov = pool_rare_experts(src, dst, min_tokens=100)
    assert cov[0].counts == [1000, 900, 3, 0] and cov[0].pooled == [2, 3]
    t = {x.name: x for x in gguf.GGUFReader(dst).tensors}
    new_sums = np.asarray(t["blk.0.ffn_up_exps.weight.in_sum2"].data).reshape(4, -1)
    new_counts = np.asarray(t["blk.0.ffn_up_exps.weight.counts"].data).ravel()
    pool = (sums[0] + sums[1]) / 1900
    np.testing.assert_allclose(new_sums[3] / new_counts[3], pool, rtol=1e-5)          # no tokens: the pool
    np.testing.assert_allclose(new_sums[2], sums[2] + 97 * pool, rtol=1e-5)           # shrunk towards it
    np.testing.assert_array_equal(new_sums[:2], sums[:2])                             # well covered: untouched
    assert list(new_counts) == [1000, 900, 100, 100]
    assert [c.counts for c in expert_token_counts(src)] == [[1000, 900, 3, 0]]


# ---- d2m quantize --device ----------------------------------------------------------------------------------

def test_quantize_for_phone_applies_the_recipe(tiny_d2m_f16, llama, tmp_path):
    out = tmp_path / "tiny-phone.gguf"
    proc = run_cli("-m", "d2m_gguf", "quantize", tiny_d2m_f16, out, "--device", "phone-i8mm", "--chunks", "4",
                   "--ctx", "128")
    assert proc.returncode == 0, proc.stderr
    recipe = load_recipe("phone-i8mm")
    types = tensor_types(out)
    routers = {n: t for n, t in types.items() if "ffn_gate_inp" in n}
    experts = {n: t for n, t in types.items() if "_exps" in n}
    attn = {n: t for n, t in types.items() if ".attn_" in n and "norm" not in n}
    assert routers and set(routers.values()) <= {"F32", "F16"}
    assert experts and set(experts.values()) == {recipe.types["experts"]}
    assert attn and set(attn.values()) == {recipe.types["attention"]}
    assert types["token_embd.weight"] == shape_fallback(recipe.types["output"], 64)   # tied embeddings
    # tokens per expert are reported for each MoE block of the plan (blocks 0 and 2)
    assert "tokens per expert" in proc.stdout
    for blk in ("blk.0: 2 experts", "blk.2: 2 experts"):
        assert blk in proc.stdout, proc.stdout
    imatrix = out.with_name(out.name + ".quant") / "imatrix.gguf"
    cov = expert_token_counts(imatrix)
    assert [c.layer for c in cov] == [0, 2] and all(sum(c.counts) > 0 for c in cov)
    # and llama.cpp runs it
    text, _ = llama.complete(out, "The capital of France is", n=4)
    assert text.strip()


def test_quantize_for_phone_applies_the_recipe_to_a_stock_file(tiny_llama, llama_stock, tmp_path):
    """A pruned model is written as a plain llama file: the recipe's classes apply to it as to dense2moe, and
    stock llama.cpp runs the phone file."""
    from .test_stock_export import plan_of

    plan, src, out = tmp_path / "prune.json", tmp_path / "prune.gguf", tmp_path / "prune-phone.gguf"
    plan_of("prune").save(plan)
    proc = run_cli("convert.py", tiny_llama, src, "--plan", plan, "--no-heal", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("-m", "d2m_gguf", "quantize", src, out, "--device", "phone-i8mm", "--chunks", "4", "--ctx", "128")
    assert proc.returncode == 0, proc.stderr
    recipe, types = load_recipe("phone-i8mm"), tensor_types(out)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    attn = {t for n, t in types.items() if ".attn_" in n and "norm" not in n}
    ffn = {t for n, t in types.items() if ".ffn_" in n and "norm" not in n}
    assert attn == {recipe.types["attention"]} and ffn == {recipe.types["ffn"]}
    text, _ = llama_stock.complete(out, "The capital of France is", n=4)
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")


def test_head_type_replaces_the_recipes_head(tiny_d2m_f16, tmp_path):
    """--head-type: the LM head (here tied: the embedding) takes the given type, the rest keeps the recipe's."""
    out = tmp_path / "head.gguf"
    proc = run_cli("-m", "d2m_gguf", "quantize", tiny_d2m_f16, out, "--device", "phone-i8mm", "--head-type", "q5_0",
                   "--no-imatrix")
    assert proc.returncode == 0, proc.stderr
    types = tensor_types(out)
    assert types["token_embd.weight"] == "Q5_0" and "output.weight" not in types
    assert {t for n, t in types.items() if ".attn_" in n and "norm" not in n} == {load_recipe("phone-i8mm").types["attention"]}
    proc = run_cli("-m", "d2m_gguf", "quantize", tiny_d2m_f16, tmp_path / "x.gguf", "--type", "Q4_0", "--head-type",
                   "Q9_9")
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown head type 'Q9_9'")
    assert not (tmp_path / "x.gguf").exists()


def test_quantize_unknown_device_is_one_line_exit_2(tiny_d2m_f16, tmp_path):
    proc = run_cli("-m", "d2m_gguf", "quantize", tiny_d2m_f16, tmp_path / "x.gguf", "--device", "nokia-3310")
    assert proc.returncode == 2 and proc.stderr.startswith("error: no quantization recipe")
    assert not (tmp_path / "x.gguf").exists()


# ---- the matrix ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_matrix(smollm2_dir, llama, wikitext, calibration_text, tmp_path_factory) -> Path:
    """A tiny qwen3 (head_dim 32: a q8_0 KV cache needs a multiple of its block) through the whole matrix."""
    from d2m_gguf.bench.matrix import MatrixRequest, MatrixVariant, run_matrix

    tiny = make_tiny("qwen3", tmp_path_factory.mktemp("bench-q3") / "tiny", bpe_tokenizer_dir=smollm2_dir,
                     text_file=calibration_text, train_steps=10)
    req = MatrixRequest(
        hf_dir=tiny, variants=(MatrixVariant("dense"), MatrixVariant("lfuc", plan=TINY_PLAN, label="lfuc-plan")),
        quants=("F16", "phone-i8mm", "BOGUS"), kv_types=("q8_0",), kv_quants=("F16",), deep_quants=("F16", "BOGUS"),
        depths=(0, 64), wikitext=wikitext, calibration=calibration_text, ctx=128, chunks=2, long_ctx=256,
        long_chunks=1, heal=HealSettings(tokens=0), n_prompt=16, n_gen=8, repetitions=1, deep_repetitions=1,
        imatrix_chunks=2, qemu_quants=(), results=tmp_path_factory.mktemp("results"),
        publish=tmp_path_factory.mktemp("docs") / "matrix", llama=llama)
    return run_matrix(req)


def _rows(matrix: Path) -> list[dict]:
    with open(matrix / "matrix.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_matrix_rows_columns_and_files(tiny_matrix):
    for name in ("matrix.csv", "matrix.md", "pareto-d0.png", "pareto-d64.png", "settings.json"):
        assert (tiny_matrix / name).is_file(), name
    rows = _rows(tiny_matrix)
    kinds = [("F16", "f16"), ("F16", "q8_0"), ("phone-i8mm", "f16"), ("BOGUS", "f16")]
    assert [(r["variant"], r["quant"], r["kv"]) for r in rows] == [
        (v, q, kv) for v in ("dense", "lfuc-plan") for q, kv in kinds]
    cols = {"file_mb", "active_mb_per_token", "ppl", "kld", "top1", "ppl_c256", "kld_c256", "top1_c256", "prompt_ts",
            "decode_ts_d0", "decode_std_d0", "decode_ts_d64", "decode_std_d64", "mb_per_token_d64",
            "pred_speedup_d64", "speedup_d64", "efficiency_d64", "front_d0", "front_d64", "decode_ts_stock_d64",
            "efficiency_stock_d64", "pred_tps_phone-i8mm", "pred_tps_phone-dotprod", "pred_tps_rpi5",
            "arm64_ppl_agree", "status", "error", "arch"}
    assert cols <= set(rows[0])
    ok = [r for r in rows if r["quant"] != "BOGUS"]
    assert all(r["status"] == "ok" for r in ok), ok
    assert {r["variant"]: r["arch"] for r in ok} == {"dense": "qwen3", "lfuc-plan": "dense2moe"}
    for r in ok:
        for c in ("file_mb", "active_mb_per_token", "ppl", "kld", "top1", "decode_ts_d0", "speedup_d0",
                  "pred_speedup_d0", "efficiency_d0", "pred_tps_phone-i8mm"):
            assert float(r[c]) >= 0, (c, r)
        assert r["arm64_ppl_agree"] == "not run"
        deep = r["quant"] == "F16"     # the deep rows: timed at depth 64, scored at ctx 256
        for c in ("ppl_c256", "kld_c256", "top1_c256", "decode_ts_d64", "speedup_d64", "efficiency_d64",
                  "pred_tps_phone-i8mm_d64"):
            assert (r[c] != "") == deep, (c, r)
        assert r["front_d0"] in ("yes", "no")
        assert r["front_d64"] in (("yes", "no") if deep else ("",)), r
    by = {(r["variant"], r["quant"], r["kv"]): r for r in rows}
    # the LF-UC model reads fewer bytes per token than the dense one; the quantized file is smaller
    assert float(by["lfuc-plan", "F16", "f16"]["active_mb_per_token"]) < float(by["dense", "F16", "f16"]["active_mb_per_token"])
    assert float(by["dense", "phone-i8mm", "f16"]["file_mb"]) < float(by["dense", "F16", "f16"]["file_mb"])
    assert float(by["lfuc-plan", "F16", "f16"]["kld"]) > 0    # measured against the dense f16 logits
    assert float(by["lfuc-plan", "F16", "f16"]["kld_c256"]) > 0
    # a quantized KV cache changes the logits (measured, not copied from the f16 row), reads fewer bytes at depth
    q8, f16 = by["dense", "F16", "q8_0"], by["dense", "F16", "f16"]
    assert q8["ppl"] != f16["ppl"] and q8["ppl_c256"] != f16["ppl_c256"]
    assert float(q8["mb_per_token_d64"]) < float(f16["mb_per_token_d64"])
    assert float(q8["pred_speedup_d64"]) > 1 and float(f16["pred_speedup_d64"]) == 1.0
    assert float(f16["speedup_d0"]) == 1.0 and float(f16["speedup_d64"]) == 1.0
    # the dense rows timed again by the stock build; efficiency = bytes x tok/s / bandwidth for both builds
    bw = json.loads((tiny_matrix / "settings.json").read_text())["host_bandwidth_gbs"]
    assert float(f16["decode_ts_stock_d64"]) > 0
    for build in ("", "stock_"):
        eff = float(f16[f"efficiency_{build}d64"])
        assert eff == pytest.approx(float(f16["mb_per_token_d64"]) * 1e6 * float(f16[f"decode_ts_{build}d64"])
                                    / (bw * 1e9), rel=0.02)
    assert by["lfuc-plan", "F16", "f16"]["decode_ts_stock_d64"] == ""    # dense2moe: the patched build only
    md = (tiny_matrix / "matrix.md").read_text()
    assert md.count("\n| ") > 1 + len(rows)       # the per-depth summaries, then the full table
    _assert_provenance(md, json.loads((tiny_matrix / "settings.json").read_text()))


def test_matrix_fronts_and_headlines(tiny_matrix):
    """Every depth's front is the set of rows no other row beats on both axes, and the headline names its
    methods."""
    from d2m_gguf.bench.pareto import method_label, pareto_front
    rows = _rows(tiny_matrix)
    settings = json.loads((tiny_matrix / "settings.json").read_text())
    md = (tiny_matrix / "matrix.md").read_text()
    for d, q in ((0, "ppl"), (64, "ppl_c256")):
        timed = [r for r in rows if r["status"] == "ok" and r[f"decode_ts_d{d}"] and r[q]]
        pts = [(float(r[f"decode_ts_d{d}"]), float(r[q])) for r in timed]
        front = {id(timed[i]) for i in pareto_front(pts)}
        assert [r[f"front_d{d}"] for r in timed] == ["yes" if id(r) in front else "no" for r in timed]
        line = next(h for h in settings["headline"] if h.startswith(f"Depth {d} "))
        on = {method_label(r) for r in timed if r[f"front_d{d}"] == "yes"}
        off = {method_label(r) for r in timed} - on
        head, _, tail = line.partition(" rows; ")
        assert on and all(m in head for m in on) and all(m in tail.split("; ")[-1] for m in off), line
        assert f"- {line}" in md
        assert f"### Depth {d}:" in md


def test_matrix_is_published(tiny_matrix):
    dest = Path(json.loads((tiny_matrix / "settings.json").read_text())["publish"])
    names = ["matrix.md", "matrix.csv", "settings.json", "pareto-d0.png", "pareto-d64.png"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)
    assert all((dest / n).read_bytes() == (tiny_matrix / n).read_bytes() for n in names)


def test_matrix_records_a_failed_row_and_completes(tiny_matrix):
    bogus = [r for r in _rows(tiny_matrix) if r["quant"] == "BOGUS"]
    assert len(bogus) == 2 and all(r["status"] == "failed" for r in bogus)
    assert all("unknown quantization type 'BOGUS'" in r["error"] for r in bogus)
    assert all(r["ppl"] == "" and r["front_d0"] == "" for r in bogus)


def test_pareto_pngs_are_valid(tiny_matrix):
    import matplotlib.image as mpimg
    for d in (0, 64):
        data = (tiny_matrix / f"pareto-d{d}.png").read_bytes()
        assert data[:8] == PNG_SIGNATURE
        img = mpimg.imread(tiny_matrix / f"pareto-d{d}.png")
        assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 600


def test_prediction_misses_name_row_and_depth():
    from d2m_gguf.bench.matrix import prediction_misses
    rows = [{"variant": "prune-8", "quant": "Q4_0", "kv": "f16", "pred_speedup_d0": 1.30, "speedup_d0": 1.10,
             "pred_speedup_d4096": 1.2, "speedup_d4096": 1.15},
            {"variant": "dense", "quant": "Q4_0", "kv": "q8_0", "pred_speedup_d0": 1.0, "speedup_d0": 0.8,
             "pred_speedup_d4096": 1.3, "speedup_d4096": ""}]
    assert prediction_misses(rows, (0, 4096)) == [
        "prune-8 Q4_0 at depth 0: predicted x1.30, measured x1.10 (+18%)",
        "dense Q4_0 + KV q8_0 at depth 0: predicted x1.00, measured x0.80 (+25%)"]


def test_row_types_of_plain_and_depth_aware_variants(tmp_path):
    from d2m_gguf.bench.matrix import MatrixVariant, full_request, quick_request
    req = full_request(tmp_path)
    plain = req.row_types(MatrixVariant("prune", 8))
    assert [q for q, kv in plain if kv == "f16"] == list(req.quants)
    assert [(q, kv) for q, kv in plain if kv != "f16"] == [("Q4_0", "q8_0"), ("Q4_0", "q4_0")]
    da = MatrixVariant("lfuc", 8, depth_aware=4096)
    assert req.row_types(da) == [("F16", "f16"), ("Q4_0", "f16"), ("Q4_0", "q8_0"), ("Q4_0", "q4_0")]
    assert (da.name, da.series, da.variant.request().depth) == ("lfuc-da-8", "lfuc-da@4096", 4096)
    assert [v.name for v in req.variants] == ["dense", "prune-8", "lfuc-8", "prune-da-8", "lfuc-da-8"]
    assert req.quality_of(0) == ("ppl", "WikiText-2 ppl, ctx 512") and req.quality_of(4096)[0] == "ppl_c4096"
    quick = quick_request(tmp_path)
    assert quick.depths == (0, 1024) and quick.long_ctx == 1024


def test_pareto_front():
    from d2m_gguf.bench.pareto import pareto_front
    pts = [(10, 5.0), (20, 6.0), (15, 7.0), (5, 4.0), (20, 5.5)]
    assert sorted(pareto_front(pts)) == [0, 3, 4]


def _assert_provenance(md: str, settings: dict | None = None) -> None:
    """A table opens with date, commit, machine and command (and its settings.json carries the same first)."""
    head = md.split("\n### ", 1)[0].splitlines()
    assert [line.split(":", 1)[0] for line in head] == ["- date", "- commit", "- machine", "- command"], head
    assert head[0].endswith(" UTC") and "cores" in head[2]
    if settings is not None:
        assert list(settings)[0] == "provenance" and list(settings["provenance"]) == ["date", "commit", "machine",
                                                                                     "command"]
        assert [f"- {k}: {v}" for k, v in settings["provenance"].items()] == head


def test_provenance(tmp_path):
    """The commit of this checkout (or "unknown" outside one), the CPU and its SIMD flags, the command as run."""
    from d2m_gguf.bench.provenance import command, git_commit, machine, provenance

    prov = provenance(["d2m", "bench", "matrix", "--quick"])
    assert list(prov) == ["date", "commit", "machine", "command"] and prov["command"] == "d2m bench matrix --quick"
    if (REPO / ".git").exists() and shutil.which("git"):
        assert prov["commit"].split(" + ")[0].isalnum() and prov["commit"] != "unknown"
    assert git_commit(tmp_path) == "unknown"
    x86 = tmp_path / "cpuinfo-x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
                   "processor\t: 1\nmodel name\t: Some Xeon\n")
    assert machine(x86).startswith("Some Xeon") and "AVX-512 yes, AVX2 yes, bf16 yes, NEON no" in machine(x86)
    arm = tmp_path / "cpuinfo-arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU part\t: 0xd0b\n")
    assert "AVX-512 no, AVX2 no, bf16 no, NEON yes" in machine(arm)
    assert "SIMD flags unknown" in machine(tmp_path / "missing")
    assert command(["/x/d2m_gguf/__main__.py", "bench", "lfuc", "a b"]) == "python -m d2m_gguf bench lfuc 'a b'"
    # a table rewritten (d2m bench adb appends rows) keeps the block it opened with
    from d2m_gguf.bench.tables import read_provenance_lines, write_table

    write_table([{"a": 1}], tmp_path / "t", "T", provenance=prov)
    kept = read_provenance_lines(tmp_path / "t.md")
    assert kept == [f"- {k}: {v}" for k, v in prov.items()]
    write_table([{"a": 1}, {"a": 2}], tmp_path / "t", "T", provenance=kept + ["- phone rows date: x"])
    assert read_provenance_lines(tmp_path / "t.md") == kept + ["- phone rows date: x"]
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a", "1", "2"]
    write_table([{"a": 1}], tmp_path / "bare", "T")
    assert read_provenance_lines(tmp_path / "bare.md") == []


def test_llama_bench_json_is_read_in_one_place():
    """The host runs and the adb phone runs read llama-bench's JSON alike: leading noise skipped, samples pooled
    over runs, mixed prompt+generation tests left out."""
    from d2m_gguf.bench.llamabench import bench_args, parse_llama_bench, speed_rows

    def run(model, samples_tg, samples_pp):
        return json.dumps([{"model_filename": f"/data/{model}", "n_prompt": 0, "n_gen": 8, "n_depth": 0,
                            "samples_ts": samples_tg},
                           {"model_filename": f"/data/{model}", "n_prompt": 16, "n_gen": 0, "n_depth": 0,
                            "samples_ts": samples_pp},
                           {"model_filename": f"/data/{model}", "n_prompt": 16, "n_gen": 8, "n_depth": 0,
                            "samples_ts": [1.0]}])
    samples = parse_llama_bench("shell noise\n" + run("a.gguf", [10.0, 12.0], [100.0]))
    parse_llama_bench(run("a.gguf", [14.0], [110.0]), into=samples)
    [row] = speed_rows(samples)
    assert (row.model, row.depth, row.decode_ts, row.prompt_ts) == ("a.gguf", 0, 12.0, 105.0)
    assert row.decode_std == pytest.approx(2.0)
    with pytest.raises(D2MError):
        parse_llama_bench("error: no model")
    assert bench_args(["a.gguf"], 128, 64, 3, 4, depths=None) == \
        ["-m", "a.gguf", "-p", "128", "-n", "64", "-r", "3", "-t", "4", "-o", "json"]
    assert bench_args(["a", "b"], 8, 4, 2, 2, depths=(0, 512))[4:10] == ["-p", "8", "-n", "4", "-d", "0,512"]


def test_healing_curve_on_a_tiny_model(tiny_llama, llama, wikitext, tmp_path):
    """`d2m bench curve`: rows per (budget, method), equal healing tokens per budget, and at budget 0 LF-UC is the
    pruned model (host routing), so their perplexities agree."""
    from d2m_gguf.bench.lfuc import CurveRequest, healing_curve
    from d2m_gguf.ggufout import OutType

    out = healing_curve(CurveRequest(hf_dir=tiny_llama, fuse=1, budgets=(0, 2048), outtype=OutType.F32,
                                     wikitext=wikitext, ctx=128, chunks=2, results=tmp_path, progress=False), llama)
    with open(out / "curve.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], int(r["budget_tokens"])) for r in rows] == [
        ("lfuc", 0), ("prune", 0), ("lfuc", 2048), ("prune", 2048)]
    by = {(r["method"], int(r["budget_tokens"])): r for r in rows}
    assert float(by["lfuc", 0]["ppl"]) == pytest.approx(float(by["prune", 0]["ppl"]), rel=1e-3)
    assert int(by["lfuc", 2048]["heal_tokens"]) == int(by["prune", 2048]["heal_tokens"]) >= 2048
    assert float(by["lfuc", 2048]["ppl"]) != float(by["lfuc", 0]["ppl"])
    assert (out / "curve.png").read_bytes()[:8] == PNG_SIGNATURE
    _assert_provenance((out / "curve.md").read_text())


def test_lfuc_table_on_a_tiny_model(tiny_llama, llama, wikitext, tmp_path):
    """`d2m bench lfuc`: dense + each method at each size, equal healing tokens, one llama-bench run, and each
    method's paired ratio to the pruning baseline of its size (the baseline itself gets none)."""
    from d2m_gguf.bench.lfuc import LfucTableRequest, lfuc_table
    from d2m_gguf.bench.variants import heal_key
    from d2m_gguf.ggufout import OutType

    out = lfuc_table(LfucTableRequest(hf_dir=tiny_llama, sizes=(1,), outtype=OutType.F32, heal=HealSettings(tokens=2048),
                                      wikitext=wikitext, ctx=128, chunks=3, results=tmp_path, progress=False), llama)
    with open(out / "lfuc.csv", newline="") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert list(rows) == ["dense", "lfuc-1", "prune-1"]
    assert int(rows["lfuc-1"]["heal_tokens"]) == int(rows["prune-1"]["heal_tokens"]) >= 2048
    ratio, se = (float(x) for x in rows["lfuc-1"]["ppl_vs_prune"].split(" ± "))
    assert ratio == pytest.approx(float(rows["lfuc-1"]["ppl"]) / float(rows["prune-1"]["ppl"]), rel=2e-3) and se > 0
    margin = math.log(ratio) + 2 * se      # wins when the log ratio is below zero by two standard errors
    assert rows["lfuc-1"]["beats_prune"] == ("yes" if margin < 0 else "no") or abs(margin) < 1e-3
    assert rows["prune-1"]["ppl_vs_prune"] == rows["dense"]["ppl_vs_prune"] == ""
    assert float(rows["dense"]["measured_speedup"]) == 1.0 and all(float(r["decode_ts"]) > 0 for r in rows.values())
    assert (out / "lfuc.md").read_text().count("\n| ") == 4
    _assert_provenance((out / "lfuc.md").read_text(), json.loads((out / "settings.json").read_text()))

    # --train-guests rebuilds LF-UC only: the pruning baseline has no guests, so its build is reused
    key = lambda guests, **kw: heal_key(HealSettings(**kw), guests=guests)
    for setting in ({"min_expert_share": 0.0}, {"host_first": False}):
        assert key(True, **setting) != key(True) and key(False, **setting) == key(False), setting
    built = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.gguf")}
    lfuc_table(LfucTableRequest(hf_dir=tiny_llama, sizes=(1,), outtype=OutType.F32,
                                heal=HealSettings(tokens=2048, freeze_guests=False), wikitext=wikitext, ctx=128,
                                chunks=3, results=tmp_path, progress=False), llama)
    rebuilt = {p.name for p in (tmp_path / "work").rglob("*.gguf") if p.stat().st_mtime_ns != built.get(p.name)}
    assert rebuilt == {"lfuc-1-f32.gguf"}, rebuilt


@pytest.mark.slow
def test_arm64_column_under_qemu(tiny_d2m_f16, llama, wikitext, tmp_path):
    """The qemu column on one tiny Q8_0 row (the real matrix does it on SmolLM2 Q4_0/phone rows)."""
    from d2m_gguf.bench.matrix import MatrixRequest, arm64_column

    bin_dir = REPO / "build" / "llama.cpp-arm64" / "bin"
    assert (bin_dir / "llama-perplexity").is_file(), "run `make arm64`"
    assert shutil.which("qemu-aarch64-static"), "qemu-aarch64-static missing: make deps"
    q = tmp_path / "tiny-q8_0.gguf"
    llama.quantize(tiny_d2m_f16, q, "Q8_0")
    req = MatrixRequest(hf_dir=tmp_path, variants=(), wikitext=wikitext, llama=llama, qemu_quants=("Q8_0",),
                        arm64_bin=bin_dir)
    rows = [{"status": "ok", "quant": "Q8_0", "method": "lfuc"}, {"status": "ok", "quant": "F16", "method": "lfuc"}]
    (tmp_path / "logs").mkdir()
    arm64_column(req, rows, {0: q, 1: tiny_d2m_f16}, tmp_path / "logs", print)
    assert rows[0]["arm64_ppl_agree"].startswith("yes"), rows[0]
    assert rows[1]["arm64_ppl_agree"] == "not run"


# ---- phones over adb -----------------------------------------------------------------------------------------

def test_bench_adb_without_a_device_says_so(tmp_path):
    proc = run_cli("-m", "d2m_gguf", "bench", "adb", "--results", tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    if shutil.which("adb"):
        devices = subprocess.run(["adb", "devices"], capture_output=True, text=True).stdout
        assert "\tdevice" not in devices, "a device is attached: this test checks the no-device path"
        assert "no Android device attached" in said
    else:
        assert "adb is not installed" in said
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("depth", [0, 16])
def test_llama_bench_times_both_file_orders(tiny_llama, tiny_d2m_f16, llama, tmp_path, depth):
    """Speed is read in both file orders (forward, then reversed; past depth 0 a process per file), half the
    repetitions each, and every row's decode speed is the mean of its samples from both."""
    import statistics

    from d2m_gguf.bench.llamabench import llama_bench
    from d2m_gguf.dense_export import export_dense
    from d2m_gguf.ggufout import OutType

    dense = tmp_path / "dense-f16.gguf"
    export_dense(tiny_llama, dense, OutType.F16, progress=False)
    rows = llama_bench(llama, [dense, tiny_d2m_f16], depths=(depth,), n_gen=4, n_prompt=8, repetitions=3,
                       log_dir=tmp_path)
    runs = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("llama-bench", "llama-bench-reversed")]
    firsts = [Path(run[0]["model_filename"]).name for run in runs]
    assert firsts == [dense.name, tiny_d2m_f16.name]
    assert [(r.model, r.depth) for r in rows] == [(dense.name, depth), (tiny_d2m_f16.name, depth)]
    for row in rows:
        decode = [t for run in runs for r in run if Path(r["model_filename"]).name == row.model and r["n_gen"] > 0
                  for t in r["samples_ts"]]
        assert len(decode) == 4   # ceil(3 / 2) repetitions in each order
        assert row.decode_ts == pytest.approx(statistics.fmean(decode))
        assert row.decode_std == pytest.approx(statistics.stdev(decode))
        assert row.prompt_ts and row.prompt_ts > 0


def test_chunk_nlls_and_the_paired_comparison():
    """Per-chunk NLLs come back from llama-perplexity's running estimates, and the paired standard error sees a
    consistent small gain that the two perplexities' own spreads would hide."""
    from d2m_gguf.bench.lfuc import versus
    from d2m_gguf.llamacpp import chunk_nlls

    base = [2.0, 3.5, 2.5, 4.0, 3.0, 2.2]
    running = lambda nll: ",".join(f"[{i + 1}]{math.exp(sum(nll[:i + 1]) / (i + 1)):.4f}" for i in range(len(nll))) + ","
    assert chunk_nlls("noise\n" + running(base) + "\nFinal estimate") == pytest.approx(base, abs=1e-3)
    better = [x - 0.02 + 0.002 * (-1) ** i for i, x in enumerate(base)]
    vs = versus(chunk_nlls(running(better)), chunk_nlls(running(base)))
    assert vs["ratio"] == pytest.approx(math.exp(-0.02), abs=2e-4) and vs["wins"]
    assert not versus(chunk_nlls(running(base)), chunk_nlls(running(better)))["wins"]
    with pytest.raises(D2MError):
        chunk_nlls("no estimates here")


def test_variant_labels_and_depth_aware_requests():
    """`--methods` entries name variants: a -da suffix plans depth-aware at the timed depth (lfuc and prune only),
    and plain variants keep the request (and so the settings stamp) they always had."""
    from d2m_gguf.bench.variants import Variant
    from d2m_gguf.planner import PlanRequest

    plain = Variant.of("lfuc", 4, depth=0)
    assert plain == Variant("lfuc", 4) and plain.name == "lfuc-4" and plain.request() == PlanRequest(fuse=4)
    aware = Variant.of("prune-da", 6, depth=2048)
    assert (aware.name, aware.label, aware.method) == ("prune-da-6", "prune-da", "prune")
    assert aware.request() == PlanRequest(method="prune", fuse=6, depth_aware=True, depth=2048)
    with pytest.raises(D2MError, match="depth-aware"):
        Variant.of("upcycle-da", 4, depth=0)
