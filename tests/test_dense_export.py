"""Dense export held against llama.cpp's own convert_hf_to_gguf.py (the pinned source).

Same tensor names, shapes and types; data bit-identical; every metadata key
upstream writes present with the same value. Deliberate differences:
- `tokenizer.ggml.add_space_prefix` is written for every family whose
  tokenizer_config declares `add_prefix_space` (upstream writes it for llama only).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from d2m_gguf.dense_export import export_dense
from d2m_gguf.ggufout import OutType

from .helpers import gguf_diff

ALLOWED_EXTRA_KEYS = {"tokenizer.ggml.add_space_prefix"}


def upstream_convert(llama_src: Path, hf_dir: Path, out: Path, outtype: str) -> Path:
    proc = subprocess.run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(hf_dir),
                           "--outfile", str(out), "--outtype", outtype],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def assert_same_as_upstream(upstream: Path, ours: Path) -> None:
    d = gguf_diff(upstream, ours)
    assert not d.missing_keys, f"keys upstream writes and we do not: {d.missing_keys}"
    assert not d.changed_keys, f"keys with other values: {d.changed_keys}"
    assert set(d.extra_keys) <= ALLOWED_EXTRA_KEYS, f"undocumented extra keys: {d.extra_keys}"
    assert not d.missing_tensors and not d.extra_tensors, (d.missing_tensors, d.extra_tensors)
    assert not d.changed_tensors, d.changed_tensors


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_family_matches_upstream(tiny_dirs, llama_src, tmp_path, family, outtype):
    upstream = upstream_convert(llama_src, tiny_dirs[family], tmp_path / "upstream.gguf", outtype)
    ours = tmp_path / "ours.gguf"
    export_dense(tiny_dirs[family], ours, OutType(outtype), progress=False)
    assert_same_as_upstream(upstream, ours)


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_dir, llama_src, tmp_path_factory):
    """SmolLM2 at f16, converted by upstream and by us (reused by the perplexity test)."""
    root = tmp_path_factory.mktemp("smollm2-dense")
    upstream = upstream_convert(llama_src, smollm2_dir, root / "upstream-f16.gguf", "f16")
    ours = root / "ours-f16.gguf"
    export_dense(smollm2_dir, ours, OutType.F16, progress=False)
    return upstream, ours


@pytest.mark.slow
def test_smollm2_f16_matches_upstream(smollm2_pair):
    assert_same_as_upstream(*smollm2_pair)


@pytest.mark.slow
def test_smollm2_f32_matches_upstream(smollm2_dir, llama_src, tmp_path):
    upstream = upstream_convert(llama_src, smollm2_dir, tmp_path / "upstream.gguf", "f32")
    ours = tmp_path / "ours.gguf"
    export_dense(smollm2_dir, ours, OutType.F32, progress=False)
    assert_same_as_upstream(upstream, ours)


@pytest.mark.slow
def test_stock_llama_cpp_gives_the_same_perplexity(smollm2_pair, llama_stock, wikitext, tmp_path):
    """The unpatched llama.cpp tools load our file and measure what they measure on upstream's."""
    chunk = tmp_path / "wiki-chunk.txt"
    chunk.write_text(wikitext.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    upstream, ours = smollm2_pair
    ppl_upstream, _ = llama_stock.perplexity(upstream, chunk, ctx=256, chunks=4)
    ppl_ours, _ = llama_stock.perplexity(ours, chunk, ctx=256, chunks=4)
    assert ppl_ours == ppl_upstream
    assert 5 < ppl_ours < 100  # a working model on English text, not noise
    text, _ = llama_stock.complete(ours, "The capital of France is", n=8)
    assert "Paris" in text
