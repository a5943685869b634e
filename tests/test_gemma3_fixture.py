"""The Gemma 3 270M fixture (`make gemma3`): the HF checkpoint it builds is the GGUF's model exactly.

Upstream's own converter, run on the checkpoint, must give back every tensor of the original GGUF as
dequantized (the inverse transforms of gguf_to_hf: names, `norm + 1`) and its Gemma 3 hyperparameters; the
tokenizer must read the GGUF's vocabulary as llama.cpp does on a few hard cases. Needs `make gemma3` and
`make llama-src` (make test builds both). Issue 32 continues from here (the gemma3 family in the toolchain)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from d2m_gguf.fixtures.gemma3 import GGUF_NAME

from .conftest import REPO, _require


@pytest.fixture(scope="module")
def original():
    return gguf.GGUFReader(_require(REPO / "dl" / GGUF_NAME, "gemma3"))


def _fields(reader: gguf.GGUFReader, prefix: str) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_upstream_converter_gives_back_the_original_tensors(gemma3_upstream_f32, original):
    back = gguf.GGUFReader(gemma3_upstream_f32)
    assert back.fields["general.architecture"].contents() == "gemma3"
    ours, theirs = _fields(back, "gemma3."), _fields(original, "gemma3.")
    assert {k: v for k, v in ours.items() if k in theirs} == theirs
    tensors = {t.name: t for t in back.tensors}
    assert sorted(tensors) == sorted(t.name for t in original.tensors)
    for t in original.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tensors[t.name].data.shape)
        np.testing.assert_array_equal(np.asarray(tensors[t.name].data), want, err_msg=t.name)


def test_tokenizer_reads_the_gguf_vocabulary(gemma3_dir, original):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gemma3_dir))
    tokens = original.fields["tokenizer.ggml.tokens"].contents()
    assert len(tok) == len(tokens) == 262144
    for text in ("The capital of France is", "  two  spaces\tand a tab\n", "<start_of_turn>user\nhi<end_of_turn>",
                 "naïve café 東京 🙂 12345"):
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        assert all(tokens[i] == tok.convert_ids_to_tokens(i) for i in ids)
    assert tok("Paris", add_special_tokens=True).input_ids[0] == original.fields["tokenizer.ggml.bos_token_id"].contents()


def test_the_sentencepiece_model_tokenizes_as_the_gguf(gemma3_dir, calibration_text):
    """tokenizer.model (what upstream's converter and ours read, as for Google's checkpoint) and tokenizer.json
    give the same ids, on prose and code and on runs of spaces (user-defined pieces)."""
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(gemma3_dir / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(gemma3_dir))
    assert sp.vocab_size() == len(tok)
    text = calibration_text.read_text(encoding="utf-8")[:20000] + "  two  spaces\tand a tab\n    four"
    assert sp.encode(text) == tok(text, add_special_tokens=False).input_ids
