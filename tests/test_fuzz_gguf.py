"""The patched loader under AddressSanitizer + UBSan, fed mutated dense2moe GGUFs (d2m_gguf.bench.fuzz).

Every mutant must be a clean refusal (exit 1 with an error message) or a correct
load: no sanitizer report, no signal (abort, GGML_ASSERT, segfault), no hang.
50 seeded cases run in `make test`; 500 are marked `slow_fuzz` and deselected
unless asked for:

    D2M_SLOW_FUZZ=1 make test                    # everything, the 500 included
    make test PYTEST_ARGS="-m slow_fuzz"         # only the 500
    .venv/bin/python -m d2m_gguf.bench.fuzz A.gguf B.gguf --cases 500   # by hand, one line per case
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from d2m_gguf.bench.fuzz import classify, fuzz, mutate, parse_layout, run_case, summary

from .conftest import REPO, _require
from .test_parity import hybrid

PLAN = REPO / "examples" / "plans" / "tiny-all-kinds.json"


@pytest.fixture(scope="session")
def asan_logits() -> Path:
    bin_dir = Path(os.environ.get("D2M_LLAMA_ASAN_BIN", REPO / "build" / "llama.cpp-asan" / "bin"))
    return _require(bin_dir / "llama-d2m-logits", "llama-asan")


@pytest.fixture(scope="module")
def bases(tiny_dirs, tmp_path_factory) -> list[Path]:
    """Valid dense2moe files of the tiny Mistral (SentencePiece, 1024 tokens: small, fast to load), every
    block kind, f32 and q8_0."""
    root = tmp_path_factory.mktemp("fuzz")
    paths = []
    for outtype in ("f32", "q8_0"):
        path = root / f"tiny-{outtype}.gguf"
        hybrid(tiny_dirs["mistral"], PLAN, path, outtype)
        paths.append(path)
    return paths


def test_mutations_are_deterministic_and_change_the_file(bases):
    raw = bases[0].read_bytes()
    layout = parse_layout(raw)
    assert layout.data_start > 0 and {"t-dim", "t-type", "t-offset", "arr-len", "elem"} <= {s.kind for s in layout.sites}
    kinds = set()
    for seed in range(60):
        data, what = mutate(raw, seed)
        assert (data, what) == mutate(raw, seed)
        assert data != raw, what
        kinds.add(what.split(":")[0])
    assert len(kinds) >= 10, kinds


def test_the_judge_tells_crashes_from_refusals():
    assert classify(1, "llama_model_load: error loading model: tensor 'x' has wrong shape", False)[0] == "refused"
    assert classify(0, "", True)[0] == "loaded"
    assert classify(0, "", False)[0] == "bad-output"
    assert classify(-6, "ggml.c:12: GGML_ASSERT(x) failed", False)[0] == "abort"
    assert classify(1, "llama-graph.cpp:2072: fatal error", False)[0] == "abort"
    assert classify(-11, "", False)[0] == "crash"
    assert classify(1, "==1==ERROR: AddressSanitizer: heap-buffer-overflow", False)[0] == "sanitizer"
    assert classify(1, "src/x.cpp:3:5: runtime error: signed integer overflow", False)[0] == "sanitizer"
    assert classify(None, "", False)[0] == "hang"
    assert classify(3, "", False)[0] == "bad-exit"


@pytest.mark.slow   # needs the sanitizer build (make llama-asan), which make test-fast does not build
def test_the_valid_bases_load(asan_logits, bases, tmp_path):
    for base in bases:
        rc, stderr, output_ok = run_case(asan_logits, base, tmp_path)
        assert classify(rc, stderr, output_ok) == ("loaded", ""), stderr[-3000:]


def _check(outcomes) -> None:
    assert all(o.ok for o in outcomes), summary(outcomes)
    # the corpus exercises both sides of the contract
    assert any(o.verdict == "refused" for o in outcomes) and any(o.verdict == "loaded" for o in outcomes), \
        summary(outcomes)


@pytest.mark.slow
def test_fuzz_50(asan_logits, bases, tmp_path):
    _check(fuzz(bases, asan_logits, range(50), work=tmp_path))


@pytest.mark.slow_fuzz
def test_fuzz_500(asan_logits, bases, tmp_path):
    _check(fuzz(bases, asan_logits, range(1000, 1500), work=tmp_path))
