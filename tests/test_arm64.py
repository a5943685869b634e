"""The static arm64 build of the patched tools, under qemu (Armv8.2-A + dotprod + i8mm phone core).

The SmolLM2 hybrid at Q4_0 with the CPU repack path: llama-completion generates
text, and llama-perplexity on a short WikiText slice (4 x 128 tokens) agrees with the
host build within 2% (x86 and Arm kernels round differently, so greedy text may diverge at
near-ties and is not compared token by token)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from d2m_gguf.llamacpp import QEMU, LlamaCpp, parse_kv_cache
from d2m_gguf.bench.matrix import arm64_check, arm64_check_text

from .conftest import REPO, _env_path, _require
from .test_parity import hybrid


@pytest.fixture(scope="module")
def arm64() -> LlamaCpp:
    bin_dir = _env_path("D2M_LLAMA_ARM64_BIN", REPO / "build" / "llama.cpp-arm64" / "bin")
    _require(bin_dir / "llama-completion", "arm64")
    assert shutil.which(QEMU[0]), "qemu-aarch64-static is missing: `make deps` installs qemu-user-static"
    return LlamaCpp(bin_dir, wrapper=QEMU)


@pytest.fixture(scope="module")
def q4_0_hybrid(smollm2_dir, llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("arm64")
    f16 = root / "smollm2-all-kinds-f16.gguf"
    hybrid(smollm2_dir, REPO / "examples/plans/smollm2-all-kinds.json", f16, "f16")
    out = root / "smollm2-all-kinds-q4_0.gguf"
    llama.quantize(f16, out, "Q4_0")
    return out


@pytest.mark.slow
def test_binaries_are_static_aarch64(arm64):
    """The tools `make test` builds, and llama-cli where `make arm64` has built it too."""
    tools = ["llama-completion", "llama-bench", "llama-perplexity"]
    tools += ["llama-cli"] if (arm64.bin_dir / "llama-cli").exists() else []
    for tool in tools:
        head = (arm64.bin_dir / tool).read_bytes()[:64]
        assert head[:4] == b"\x7fELF" and head[18] == 183, tool  # e_machine EM_AARCH64
        assert b"ld-linux" not in (arm64.bin_dir / tool).read_bytes()[:4096], f"{tool} is dynamically linked"


@pytest.mark.slow
def test_arm64_generates_with_repacked_q4_0(arm64, q4_0_hybrid):
    text, log = arm64.complete(q4_0_hybrid, "The capital of France is", n=8, extra=["-v", "-c", "128"])
    assert len(text.split()) >= 5, text
    print("\n".join(l for l in log.splitlines() if "system_info" in l or "REPACK" in l)[:3000])
    assert "DOTPROD = 1" in log and "MATMUL_INT8 = 1" in log, "the arm64 kernels did not see dotprod/i8mm"
    assert "CPU_REPACK" in log, "Q4_0 was not repacked for the Arm kernels"
    assert parse_kv_cache(log).layers == 24


@pytest.mark.slow
def test_arm64_perplexity_matches_host(arm64, llama, q4_0_hybrid, wikitext, tmp_path):
    """The check `make bench` runs (4 x 128 tokens): on 2 x 128 this model's ppl moved 2.4% between builds on an
    AVX2 host from Q4_0 rounding alone (x86 repack 133.3, x86 plain 133.6, Arm plain 134.7, Arm repack 136.5)."""
    check = arm64_check(llama, arm64, q4_0_hybrid, arm64_check_text(wikitext, tmp_path / "wiki.txt"))
    assert check.agrees, check
