"""Shared fixtures: the real SmolLM2 checkpoint, tiny random checkpoints, llama.cpp builds, data.

Paths come from the environment `make test` sets (D2M_*), with this checkout's
defaults. A missing prerequisite is a failure with the make target to run, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2m_gguf.data import DEFAULT_CALIBRATION, DEFAULT_EVAL
from d2m_gguf.fixtures.tiny import FAMILIES, make_tiny
from d2m_gguf.llamacpp import LlamaCpp

REPO = Path(__file__).resolve().parents[1]


def _env_path(var: str, default: Path) -> Path:
    return Path(os.environ.get(var, default))


def _require(path: Path, target: str) -> Path:
    assert path.exists(), f"{path} is missing: run `make {target}` (make test does)"
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return _require(_env_path("D2M_SMOLLM2", REPO / "models" / "smollm2-135m-instruct") / "model.safetensors",
                    "smollm2").parent


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    return _require(_env_path("D2M_GEMMA3", REPO / "models" / "gemma-3-270m") / "model.safetensors", "gemma3").parent


@pytest.fixture(scope="session")
def gemma3_upstream_f32(gemma3_dir, llama_src, tmp_path_factory) -> Path:
    """Upstream's convert_hf_to_gguf.py --outtype f32 of the Gemma 3 fixture (about a minute: made once)."""
    out = tmp_path_factory.mktemp("gemma3-upstream") / "upstream-f32.gguf"
    proc = subprocess.run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(gemma3_dir),
                           "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def llama_src() -> Path:
    return _require(_env_path("D2M_LLAMA_SRC", REPO / "build" / "llama.cpp-src") / "convert_hf_to_gguf.py",
                    "llama-src").parent


@pytest.fixture(scope="session")
def llama() -> LlamaCpp:
    """The patched host build."""
    bin_dir = _env_path("D2M_LLAMA_BIN", REPO / "build" / "llama.cpp" / "bin")
    _require(bin_dir / "llama-d2m-logits", "llama")
    return LlamaCpp(bin_dir)


@pytest.fixture(scope="session")
def llama_stock() -> LlamaCpp:
    """Unpatched llama.cpp, for holding dense exports against upstream."""
    bin_dir = _env_path("D2M_LLAMA_STOCK_BIN", REPO / "build" / "llama.cpp-stock" / "bin")
    _require(bin_dir / "llama-perplexity", "llama-stock")
    return LlamaCpp(bin_dir)


@pytest.fixture(scope="session")
def calibration_text() -> Path:
    return _require(DEFAULT_CALIBRATION, "test (the package's data: d2m_gguf/data/)")


@pytest.fixture(scope="session")
def wikitext() -> Path:
    return _require(DEFAULT_EVAL, "test (the package's data: d2m_gguf/data/)")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, smollm2_dir, calibration_text) -> dict[str, Path]:
    """family -> tiny random HF checkpoint (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(f, root / f, bpe_tokenizer_dir=smollm2_dir, text_file=calibration_text) for f in FAMILIES}


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `python convert.py ...` or `python -m d2m_gguf ...` as a user would."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=1800)


def pytest_collection_modifyitems(config, items):
    """`slow_fuzz` tests (the 500-case loader fuzz) run only when asked for: D2M_SLOW_FUZZ=1, or -m naming them."""
    if os.environ.get("D2M_SLOW_FUZZ") == "1" or "slow_fuzz" in (config.getoption("markexpr") or ""):
        return
    selected = [item for item in items if item.get_closest_marker("slow_fuzz") is None]
    if len(selected) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("slow_fuzz") is not None])
        items[:] = selected
