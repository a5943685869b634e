"""Healing text beyond the calibration file: samples of the teacher (d2m synth) and how block-local
distillation caches a large text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2m_gguf.data import Tokenizer, read_text
from d2m_gguf.errors import D2MError
from d2m_gguf.heal import spread_subset
from d2m_gguf.pipeline import calibration
from d2m_gguf.synth import prompt_spans, sample_text

from .conftest import run_cli
from .test_cli import assert_user_error


def test_prompt_spans_are_spans_of_the_text():
    tokens = list(range(100))
    spans = prompt_spans(tokens, 50, 7, np.random.default_rng(0))
    assert len(spans) == 50 and all(len(s) == 7 for s in spans)
    assert all(s == list(range(s[0], s[0] + 7)) for s in spans)
    assert len({s[0] for s in spans}) > 10, "spans start all over the text"
    assert max(s[-1] for s in spans) <= 99
    assert prompt_spans(tokens, 3, 0, np.random.default_rng(0)) == [[], [], []]
    with pytest.raises(D2MError, match="too short"):
        prompt_spans(tokens[:5], 1, 7, np.random.default_rng(0))


def test_synth_writes_seeded_samples_healing_reads(tiny_dirs, calibration_text, tmp_path):
    hf = tiny_dirs["llama"]
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    rep = sample_text(hf, a, tokens=100, seq_len=16, batch=4, prompt=calibration_text, prompt_len=4, progress=False)
    assert rep.samples == 8 and rep.tokens == 8 * 16, "rounds of `batch` samples until `tokens` are sampled"
    sample_text(hf, b, tokens=100, seq_len=16, batch=4, prompt=calibration_text, prompt_len=4, progress=False)
    sample_text(hf, c, tokens=100, seq_len=16, batch=4, prompt=calibration_text, prompt_len=4, seed=1,
                progress=False)
    assert a.read_text() == b.read_text(), "the same seed samples the same text"
    assert a.read_text() != c.read_text()
    tok = Tokenizer(hf)
    n = len(tok.encode(read_text(a)))
    assert 0.5 * 8 * 20 < n < 2 * 8 * 20, n  # 8 samples of 4 prompt + 16 sampled tokens, re-tokenized
    chunks = calibration(hf, a, 32, None)
    assert chunks.shape[1] == 32 and chunks.shape[0] >= 2, "healing reads the samples as it reads any text"


def test_synth_without_prompt_or_bos_leaves_the_start_token_out(tiny_dirs, tmp_path):
    """No prompt and a tokenizer without BOS: sampling starts from the end-of-text token, which is not text."""
    hf = tiny_dirs["qwen2"]
    tok = Tokenizer(hf)
    assert tok.bos is None, "this case needs a tokenizer that adds no BOS"
    start = tok.decode([tok.tok.pad_token_id if tok.tok.pad_token_id is not None else tok.tok.eos_token_id])
    out = tmp_path / "s.txt"
    rep = sample_text(hf, out, tokens=32, seq_len=8, batch=4, prompt_len=0, progress=False)
    samples = out.read_text().split("\n\n")
    assert rep.samples == 4 and len(samples) >= 1
    assert start and not any(s.startswith(start) for s in samples), samples


def test_synth_errors_leave_no_output(tiny_dirs, wikitext, tmp_path):
    out = tmp_path / "s.txt"
    proc = run_cli("-m", "d2m_gguf", "synth", tiny_dirs["llama"], out, "--tokens", "0")
    assert_user_error(proc, "--tokens", "positive", out=out)
    with pytest.raises(D2MError, match="evaluation text"):
        sample_text(tiny_dirs["llama"], out, tokens=16, seq_len=16, batch=1, prompt=wikitext, progress=False)
    assert not out.exists()


def test_block_local_caches_sequences_spread_over_a_large_text():
    chunks = torch.arange(837 * 3).view(837, 3)
    cached = spread_subset(chunks, 512)
    rows = cached[:, 0].div(3, rounding_mode="floor").tolist()
    assert len(rows) == 512 and len(set(rows)) == 512, "distinct sequences"
    assert rows == sorted(rows) and rows[0] == 0 and rows[-1] == 836, "from the head to the tail of the text"
    assert max(b - a for a, b in zip(rows, rows[1:])) <= 2
    assert torch.equal(spread_subset(chunks[:400], 512), chunks[:400]), "a text that fits is cached whole, in order"
