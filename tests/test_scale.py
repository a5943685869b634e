"""`d2m bench scale` on tiny shapes: every stage measured as a process of its own, the tables, the picture, the
publish copy; the peak-RSS measurement itself; refusals and failures recorded; sharded synthetic checkpoints.

No timing is asserted (the real sizes are `make bench-scale`'s)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from d2m_gguf.bench.scale import STAGES, ScaleRequest, Shape, measure, run_scale, run_stage, write_checkpoint

from .conftest import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a Qwen2 (q/k/v biases, untied) and a Llama (tied) shape, both with a config vocab larger than the borrowed
# SmolLM2 tokenizer's 49152 tokens, as the real sizes have: both converters must pad it
TINY = {"tiny-qwen2": Shape("tiny qwen2", "qwen2", 64, 6, 160, 4, 2, 50000, False),
        "tiny-llama": Shape("tiny llama", "llama", 128, 6, 256, 4, 2, 49408, True)}


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory, smollm2_dir, llama_src) -> Path:
    root = tmp_path_factory.mktemp("scale")
    req = ScaleRequest(shapes=TINY, fuse=2, chunks=2, ctx=32, heal_tokens=256, tokenizer=smollm2_dir,
                       llama_src=llama_src, results=root / "results", tmp=root, publish=root / "docs" / "scale",
                       progress=False)
    return run_scale(req)


def _rows(out: Path) -> list[dict]:
    with open(out / "scale.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_stage_of_every_size_is_measured(scale_run):
    rows = _rows(scale_run)
    assert list(rows[0]) == ["size", "params", "stage", "seconds", "peak_rss_mb", "status", "note"]
    assert [(r["size"], r["stage"]) for r in rows] == [(s, st) for s in TINY for st in STAGES]
    bad = [(r["size"], r["stage"], r["note"]) for r in rows if r["status"] != "ok"]
    assert not bad, bad
    assert all(float(r["seconds"]) > 0 and float(r["peak_rss_mb"]) > 50 for r in rows)   # a Python process at least
    assert {r["size"]: int(r["params"]) for r in rows} == {s: sh.params for s, sh in TINY.items()}
    # tied embeddings are one tensor: the llama shape has no head of its own (q, o 128x128; k, v 64x128; 3 MLP
    # matrices 256x128; 2 norms per layer; the final norm)
    assert TINY["tiny-llama"].params == 49408 * 128 + 6 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128 + 2 * 128) + 128


def test_the_tables_say_whether_the_target_is_met(scale_run):
    md = (scale_run / "scale.md").read_text()
    head = md.split("\n### ", 1)[0].splitlines()
    assert [line.split(":", 1)[0] for line in head] == ["- date", "- commit", "- machine", "- command", "- memory"]
    assert head[4].endswith("GiB RAM")
    for size in TINY:
        line = next(line for line in md.splitlines() if line.startswith(f"- {size}: plan-write "))
        assert "x time" in line and ("meets the 1.2x target" in line or "MISSES the 1.2x target" in line)
        summary = next(line for line in md.splitlines() if line.startswith(f"| {size} | "))
        assert summary.count("|") == 2 + 2 * len(STAGES) + 3 + 1
    settings = json.loads((scale_run / "settings.json").read_text())
    assert list(settings)[0] == "provenance" and settings["sizes"] == list(TINY)
    assert settings["shapes"]["tiny-qwen2"]["vocab"] == 50000
    # nothing of the checkpoints stays: only the logs, the tables, the picture and the settings
    left = sorted(p.name for p in scale_run.iterdir())
    assert left == ["logs", "scale.csv", "scale.md", "scale.png", "settings.json"]
    assert not list(scale_run.parent.parent.glob("tiny-*"))   # --tmp emptied
    assert sorted(p.name for p in (scale_run / "logs").iterdir()) == sorted(TINY)


def test_the_picture_and_the_published_copy(scale_run):
    import matplotlib.image as mpimg

    png = scale_run / "scale.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    h, w = mpimg.imread(png).shape[:2]
    assert w > 1.5 * h                                        # two panels side by side
    dest = Path(json.loads((scale_run / "settings.json").read_text())["publish"])
    names = ["scale.md", "scale.csv", "scale.png", "settings.json"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)
    assert all((dest / n).read_bytes() == (scale_run / n).read_bytes() for n in names)


def _child(allocate_mb: int) -> list[str]:
    # bytes written, not merely reserved: every page is touched
    return [sys.executable, "-c", f"b = b'x' * ({allocate_mb} << 20); print(len(b))"]


def test_peak_rss_is_the_childs_own(tmp_path):
    small = measure(_child(10), tmp_path / "s.out", tmp_path / "s.err")
    big = measure(_child(200), tmp_path / "b.out", tmp_path / "b.err")
    assert small.returncode == big.returncode == 0
    assert (tmp_path / "b.out").read_text().strip() == str(200 << 20)
    assert 5 < small.peak_rss_mb < 100, small
    assert big.peak_rss_mb - small.peak_rss_mb > 150, (small, big)    # ~210 MB apart (MB of 10^6 bytes)
    assert big.seconds > 0 and small.seconds > 0


def test_a_refusal_and_a_failure_are_recorded(tmp_path):
    refuse = [sys.executable, "-c", "import sys; print('working'); "
              "sys.stderr.write('error: healing needs 31.2 GB, 20.1 GB available | x\\n'); sys.exit(2)"]
    out = tmp_path / "never.gguf"
    r = run_stage("heal-block-local", refuse, out, tmp_path)
    assert r["status"] == "refused" and r["note"] == "error: healing needs 31.2 GB, 20.1 GB available / x"
    assert (tmp_path / "heal-block-local.stdout").read_text() == "working\n"
    # exit 2 where no refusal is expected, an exception, a kill, a success without its output: failures
    assert run_stage("plan-write", refuse, out, tmp_path)["status"] == "failed"
    crash = [sys.executable, "-c", "raise RuntimeError('boom')"]
    r = run_stage("d2m-dense", crash, out, tmp_path)
    assert r["status"] == "failed" and r["note"].startswith("exit 1;") and "RuntimeError: boom" in r["note"]
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert run_stage("analyze", killed, out, tmp_path)["note"] == "killed by signal 9 (out of memory?)"
    assert run_stage("analyze", [sys.executable, "-c", "pass"], out, tmp_path)["note"] == "exit 0 but no never.gguf"
    r = run_stage("analyze", [str(tmp_path / "no-such-program")], out, tmp_path)
    assert r["status"] == "failed" and r["note"].startswith("cannot start:")


def test_a_sharded_checkpoint_loads(tmp_path, smollm2_dir):
    """Shards of at most shard_bytes with HF's index; the spec and every tensor as the pipeline reads them."""
    from d2m_gguf.checkpoint import Checkpoint
    from d2m_gguf.spec import load_dense_spec
    from d2m_gguf.vocab import check_tokenizer

    shape = TINY["tiny-qwen2"]
    nbytes = write_checkpoint(shape, tmp_path / "hf", smollm2_dir, shard_bytes=4 * 10**6)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    # the embeddings and the head (6.4 MB each) alone, the layers (0.5 MB) and the final norm between them
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    held = {f: [n for n, g in index["weight_map"].items() if g == f] for f in shards}
    assert held[shards[0]] == ["model.embed_tokens.weight"] and held[shards[2]] == ["lm_head.weight"]
    assert held[shards[1]][-1] == "model.norm.weight" and len(held[shards[1]]) == 6 * 12 + 1
    assert index["metadata"]["total_size"] == nbytes == 2 * shape.params
    spec = load_dense_spec(tmp_path / "hf")
    assert (spec.family, spec.n_embd, spec.vocab_size, spec.qkv_bias, spec.tie_word_embeddings) == (
        "qwen2", 64, 50000, True, False)
    ckpt = Checkpoint(tmp_path / "hf")
    ckpt.check(spec)
    assert {ckpt.dtype(n) for n in ckpt.names()} == {"BF16"}
    norm, w = ckpt.get("model.norm.weight"), ckpt.get("model.layers.0.mlp.up_proj.weight")
    assert abs(norm.mean() - 1) < 0.01 and abs(w.std() - 0.02) < 0.002
    check_tokenizer(tmp_path / "hf", spec.vocab_size)


def test_cli_refuses_an_unknown_size_before_any_work(tmp_path):
    proc = run_cli("-m", "d2m_gguf", "bench", "scale", "--sizes", "qwen2.5-0.5b,gpt-5", "--results", tmp_path / "r")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: unknown size 'gpt-5' (known: qwen2.5-0.5b, qwen2.5-1.5b, llama3.2-3b, llama3.1-8b)"]
    assert not (tmp_path / "r").exists()
