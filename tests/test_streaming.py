"""Streaming where nothing trains (issue 33): the plan's weights computed from the checkpoint one tensor at a time
write the same bytes as the model built in memory; peak memory of a `--no-heal` conversion follows a block, not
the model; analysis, teacher activations and a partial student give what the whole models give; healing that
will not fit in memory refuses before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from d2m_gguf.analysis import analyze
from d2m_gguf.bench.scale import Shape, measure, write_checkpoint
from d2m_gguf.checkpoint import Checkpoint
from d2m_gguf.distill import TeacherCache
from d2m_gguf.ggufout import OutType
from d2m_gguf.heal import RUNTIME_BYTES, HealSettings, memory_need
from d2m_gguf.hf_export import load_hf_weights, save_hf_checkpoint
from d2m_gguf.plan import identity_plan, load_plan, parse_plan, trained_blocks
from d2m_gguf.spec import load_dense_spec
from d2m_gguf.stock_export import GgufArch, export_model
from d2m_gguf.upcycle import plan_weights, upcycle

from .conftest import REPO

TINY_ALL_KINDS = REPO / "examples" / "plans" / "tiny-all-kinds.json"
PRUNE = {"format": "d2m-plan/1", "method": "prune", "source_layers": 6,
         "blocks": [{"attention": i, "mlp": [i]} for i in (0, 1, 3, 5)]}
WIDE = {**PRUNE, "method": "manual", "blocks": [{"attention": 0, "mlp": [0]}, {"attention": 1, "mlp": [1, 2], "ffn": "dense"},
                                               {"attention": 3, "mlp": [3]}, {"attention": 5, "mlp": [5]}]}
NO_ATTENTION = {**PRUNE, "method": "attn-prune", "blocks": [{"attention": 0, "mlp": [0]}, {"attention": 1, "mlp": [1]},
                                                              {"attention": None, "mlp": [2]}, {"attention": 3, "mlp": [3]},
                                                              {"attention": 4, "mlp": [4]}, {"attention": 5, "mlp": [5]}]}


def _plan(name: str):
    if name == "all-kinds":
        return load_plan(TINY_ALL_KINDS, 6)
    return parse_plan({"prune": PRUNE, "wide": WIDE, "no-attention": NO_ATTENTION}[name])


@pytest.mark.parametrize("outtype", [t.value for t in OutType])
@pytest.mark.parametrize("plan_name,arch", [("all-kinds", "dense2moe"), ("prune", "llama"), ("wide", "deci"),
                                            ("no-attention", "deci")])
def test_streamed_write_equals_in_memory_write(tiny_dirs, tmp_path, plan_name, arch, outtype):
    hf = tiny_dirs["llama"]
    spec, plan = load_dense_spec(hf), _plan(plan_name)
    files = []
    for kind in ("memory", "streamed"):
        source = (upcycle(spec, Checkpoint(hf), plan, seed=3) if kind == "memory"
                  else plan_weights(spec, Checkpoint(hf), plan, seed=3))
        files.append(tmp_path / f"{kind}.gguf")
        choice = export_model(source, plan, spec, hf, files[-1], OutType(outtype), GgufArch.AUTO, progress=False)
        assert choice.arch == arch
    assert files[0].read_bytes() == files[1].read_bytes()


def test_streamed_hf_checkpoint_equals_the_model(tiny_dirs, tmp_path):
    """--save-hf written tensor by tensor: a valid safetensors file with the model's tensors, read back lazily
    (load_hf_weights) to the same weights."""
    hf = tiny_dirs["qwen3"]
    spec, plan = load_dense_spec(hf), load_plan(TINY_ALL_KINDS, 6)
    model = upcycle(spec, Checkpoint(hf), plan, seed=1)
    save_hf_checkpoint(plan_weights(spec, Checkpoint(hf), plan, seed=1), plan, spec, hf, tmp_path / "out")
    state = model.state_dict()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(state)
        for key in state:
            assert torch.equal(f.get_tensor(key), state[key]), key
    back = load_hf_weights(tmp_path / "out")
    assert list(back.shapes) == list(state)
    assert all(torch.equal(back.load(k), state[k]) for k in state)


def test_layer_by_layer_analysis_and_teacher_cache_equal_the_whole_model(tiny_dirs, calibration_text):
    from d2m_gguf.pipeline import calibration

    hf = tiny_dirs["qwen2"]
    spec = load_dense_spec(hf)
    chunks = calibration(hf, calibration_text, 32, 6)
    teacher = upcycle(spec, Checkpoint(hf), identity_plan(6))
    on_disk = plan_weights(spec, Checkpoint(hf), identity_plan(6))
    assert analyze(on_disk, chunks, progress=False) == analyze(teacher, chunks, progress=False)
    streamed, whole = (TeacherCache(t, chunks, {0, 2, 6}, batch=4, progress=False) for t in (on_disk, teacher))
    # the whole model's own forward, batch by batch, is the reference
    with torch.no_grad():
        states = teacher.hidden_states(chunks)
    for b in (0, 2, 6):
        np.testing.assert_array_equal(streamed.maps[b], whole.maps[b])
        np.testing.assert_array_equal(streamed.maps[b], states[b].numpy().astype(np.float16))
    streamed.close()
    whole.close()


def test_partial_student_heals_to_the_same_gguf_as_the_whole_one(tiny_dirs, tmp_path, calibration_text):
    """Block-local healing only (no end-to-end stage) loads the trained blocks alone; the GGUF is byte-identical
    to the one healed from the whole student in memory."""
    from d2m_gguf.heal import heal
    from d2m_gguf.pipeline import calibration
    from d2m_gguf.weights import Weights

    hf = tiny_dirs["llama"]
    spec = load_dense_spec(hf)
    plan = parse_plan({"format": "d2m-plan/1", "method": "lfuc", "source_layers": 6, "router_init": "fit",
                       "blocks": [{"attention": 0, "mlp": [0]}, {"attention": 1, "mlp": [1, 2], "top_k": 1},
                                  {"attention": 3, "mlp": [3]}, {"attention": 4, "mlp": [4]},
                                  {"attention": 5, "mlp": [5]}]})
    chunks = calibration(hf, calibration_text, 32, 16)
    settings = HealSettings(tokens=2048, block_local_fraction=1.0, ctx=32)
    weights = plan_weights(spec, Checkpoint(hf), plan)
    teacher = plan_weights(spec, Checkpoint(hf), identity_plan(6))
    outs = []
    for kind in ("whole", "partial"):
        blocks = None if kind == "whole" else trained_blocks(plan)
        model = weights.materialize(blocks)
        if kind == "partial":
            loaded = {int(k.split(".")[2]) for k, v in model.state_dict().items()
                      if k.startswith("model.layers.") and not v.is_meta}
            assert loaded == set(blocks) and len(loaded) < 5
            assert model.model.embed_tokens.weight.is_meta
        (tmp_path / kind).mkdir()
        healed = heal(model, teacher if kind == "partial" else teacher.materialize(), plan, spec, chunks, settings,
                      tmp_path / kind, progress=False, fallback=weights)
        outs.append(tmp_path / f"{kind}.gguf")
        export_model(Weights.of_model(healed.model, weights), healed.plan, spec, hf, outs[-1], OutType.F32,
                     progress=False)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert (tmp_path / "partial" / "heal.csv").read_text() .count("block-local") > 1


def test_healing_that_will_not_fit_refuses_before_any_work(tiny_dirs, tmp_path, monkeypatch):
    import d2m_gguf.heal as heal_module

    hf = tiny_dirs["llama"]
    spec = load_dense_spec(hf)
    plan = parse_plan(PRUNE)
    weights, teacher = plan_weights(spec, Checkpoint(hf), plan), plan_weights(spec, Checkpoint(hf), identity_plan(6))
    e2e = memory_need(weights, teacher, plan, HealSettings())
    local = memory_need(weights, teacher, plan, HealSettings(block_local_fraction=1.0))
    assert e2e.loaded_blocks is None and local.loaded_blocks == trained_blocks(plan)
    assert {"student", "teacher"} <= set(e2e.parts) and "teacher" not in local.parts
    assert local.total < e2e.total
    (tmp_path / "plan.json").write_text(json.dumps(PRUNE))
    monkeypatch.setattr(heal_module, "available_memory", lambda: RUNTIME_BYTES)   # less than any healing needs
    from click.testing import CliRunner

    from d2m_gguf.cli import main

    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["convert", str(hf), str(out), "--plan", str(tmp_path / "plan.json"),
                                       "--heal-tokens", "1000", "--block-local-fraction", "1", "--quiet"])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert "healing needs about" in line and "GB are available" in line and "--no-heal" in line and "--fuse" in line
    assert not out.exists() and not list(tmp_path.glob("out.gguf*.tmp*"))


# 107 M and 421 M parameters: large enough that 8 bytes a parameter would dwarf the interpreter and torch
RSS_SMALL = Shape("rss small", "llama", 768, 8, 3072, 12, 4, 49152, True)
RSS_LARGE = Shape("rss large", "llama", 1536, 10, 6144, 12, 4, 49152, True)


@pytest.mark.slow
def test_no_heal_conversion_memory_grows_with_a_block_not_the_model(smollm2_dir, tmp_path):
    """Peak RSS of `convert --plan P --no-heal` (a subprocess each) on a model 4x larger grows by less than 2x:
    held in memory (teacher and student, 8 bytes a parameter), as before issue 33, it grew 3.0x."""
    assert 3.5 < RSS_LARGE.params / RSS_SMALL.params < 4.5
    peaks = {}
    for shape in (RSS_SMALL, RSS_LARGE):
        hf = tmp_path / shape.like.replace(" ", "-")
        write_checkpoint(shape, hf, smollm2_dir)
        n = shape.layers
        plan = {"format": "d2m-plan/1", "method": "lfuc", "source_layers": n, "router_init": "host",
                "blocks": [{"attention": i, "mlp": [i, i + 1] if i == n - 3 else [i]} for i in range(n) if i != n - 2]}
        (hf / "plan.json").write_text(json.dumps(plan))
        out = hf / "out.gguf"
        run = measure([str(REPO / ".venv" / "bin" / "d2m"), "convert", str(hf), str(out), "--plan",
                       str(hf / "plan.json"), "--no-heal", "--quiet"], hf / "stdout", hf / "stderr")
        assert run.returncode == 0, (hf / "stderr").read_text()[-2000:]
        assert out.stat().st_size > 1.9 * shape.params   # f16: the whole model (less one attention) was written
        peaks[shape.like] = run.peak_rss_mb
    growth = peaks["rss large"] / peaks["rss small"]
    assert growth < 2.0, peaks
