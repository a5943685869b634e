"""LF-UC mechanics: analysis, cost model and planner, healing, the default convert pipeline."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from d2m_gguf.analysis import LayerScores, analyze
from d2m_gguf.checkpoint import Checkpoint
from d2m_gguf.costmodel import WeightTypes, load_devices, planned_cost
from d2m_gguf.data import Tokenizer, perplexity, read_text, token_chunks
from d2m_gguf.distill import BlockLocalConfig, Budget, E2EConfig, TeacherCache, block_local_distill
from d2m_gguf.plan import block_spans, identity_plan, parse_plan, trained_blocks
from d2m_gguf.pipeline import CHECKPOINTS
from d2m_gguf.planner import PlanRequest, build_plan, choose_plan
from d2m_gguf.reader import validate_gguf
from d2m_gguf.spec import load_dense_spec
from d2m_gguf.trainer import distill_e2e
from d2m_gguf.upcycle import hybrid_config, upcycle

from .conftest import run_cli
from .helpers import assert_gguf_holds, last_progress, upcycled_unhealed


def chunks_of(hf_dir, text, ctx=64, n=16):
    tok = Tokenizer(hf_dir)
    return token_chunks(tok.encode(read_text(text)), ctx, n, tok.bos)


@pytest.fixture(scope="module")
def smollm2_scores(smollm2_dir, calibration_text):
    spec = load_dense_spec(smollm2_dir)
    teacher = upcycle(spec, Checkpoint(smollm2_dir), identity_plan(spec.n_layer))
    return spec, analyze(teacher, chunks_of(smollm2_dir, calibration_text, 128, 8), progress=False)


def test_analyze_cli_writes_scores_and_plot(tiny_dirs, calibration_text, tmp_path):
    out = tmp_path / "scores.json"
    proc = run_cli("-m", "d2m_gguf", "analyze", tiny_dirs["qwen2"], "--text", calibration_text, "--chunks", "4",
                   "--ctx", "64", "-o", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    scores = LayerScores.load(out)
    assert scores.n_layer == 6 and len(scores.mlp_neighbor_cos) == 5 and scores.n_tokens == 256
    for values in (scores.influence, scores.attention_influence, scores.mlp_influence):
        assert all(0.0 <= v <= 2.0 for v in values)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smollm2_redundant_layers_are_the_known_ones(smollm2_scores):
    """The 8 least influential layers of SmolLM2 are a run in the middle plus 25-26 (as measured before any code)."""
    spec, scores = smollm2_scores
    order = sorted(range(1, 29), key=lambda i: scores.influence[i])
    assert set(order[:8]) == {12, 13, 14, 15, 16, 17, 25, 26}


def test_cost_model_matches_the_byte_budget(smollm2_dir):
    """SmolLM2 at Q4_0 with a Q6_K head (which llama-quantize stores as Q8_0: 576 columns are not a multiple of
    Q6_K's 256) reads 90 MB per token at depth 0, 102 MB at 512, 184 MB at 4096."""
    cfg = hybrid_config(load_dense_spec(smollm2_dir), identity_plan(30))
    for depth, mb in ((0, 89.9), (512, 101.7), (4096, 184.3)):
        assert planned_cost(cfg, WeightTypes(), depth).total_bytes / 1e6 == pytest.approx(mb, abs=0.1)
    devices = load_devices()
    assert {"phone-i8mm", "phone-dotprod", "rpi5"} <= set(devices)
    assert all(d.source and d.dram_gbs > 0 for d in devices.values())


def test_planner_methods_and_equal_bytes(smollm2_scores):
    spec, scores = smollm2_scores
    lfuc = build_plan(spec, scores, PlanRequest(method="lfuc"), 8)
    prune = build_plan(spec, scores, PlanRequest(method="prune"), 8)
    assert lfuc.dropped_layers() == [] and sorted(set(range(30)) - {b.attention for b in prune.blocks}) == \
        [12, 13, 14, 15, 16, 17, 25, 26]
    assert [b.attention for b in lfuc.blocks] == [b.attention for b in prune.blocks]
    host = next(b for b in lfuc.blocks if b.attention == 11)
    assert host.mlp == (11, 12, 13, 14) and host.top_k == host.split == 1   # nearest attach, whole MLPs, top-1
    bytes_of = lambda p: planned_cost(hybrid_config(spec, p), WeightTypes(), 512).total_bytes
    router_bytes = sum(576 * b.n_expert * 4 for b in lfuc.blocks if b.moe)
    assert bytes_of(lfuc) == pytest.approx(bytes_of(prune) + router_bytes)   # equal N = equal active bytes
    attn = build_plan(spec, scores, PlanRequest(method="attn-prune"), 8)
    assert sum(b.attention is None for b in attn.blocks) == 8 and len(attn.blocks) == 30
    up = build_plan(spec, scores, PlanRequest(method="upcycle"), 8)
    assert sum(b.top_k for b in up.blocks if b.moe) == 28 * 6 - 8 * 6


def test_lfuc_attaches_guests_to_the_nearest_kept_layer(smollm2_scores):
    """A run of removed layers 12..17 splits between the kept layers on its two sides (ties go before), so
    two routed blocks share it; `before` keeps the whole run in the block before it. Either way every
    removed MLP is an expert exactly once, and the host is expert 0 (the pruned model at host routing)."""
    spec, scores = smollm2_scores
    moe = lambda plan: [(b.attention, b.mlp) for b in plan.blocks if b.moe]
    nearest = build_plan(spec, scores, PlanRequest(method="lfuc", attach="nearest", split=1), 8)
    assert moe(nearest) == [(11, (11, 12, 13, 14)), (18, (18, 15, 16, 17)), (24, (24, 25)), (27, (27, 26))]
    before = build_plan(spec, scores, PlanRequest(method="lfuc", attach="before", split=1), 8)
    assert moe(before) == [(11, (11, 12, 13, 14, 15, 16, 17)), (24, (24, 25, 26))]
    for plan in (nearest, before):
        assert sorted(s for b in plan.blocks for s in b.mlp) == list(range(30))
    # the block-local span of a block whose guests precede it starts at its first guest
    assert block_spans(nearest)[11:13] == [(11, 15), (15, 19)]
    # pruning the same layers heals the same spans: a pruned run is split between its two neighbours
    pruned = build_plan(spec, scores, PlanRequest(method="prune"), 8)
    assert [block_spans(pruned)[j] for j in trained_blocks(pruned)] == [(11, 15), (15, 19), (24, 26), (26, 28)]
    assert [block_spans(nearest)[j] for j in trained_blocks(nearest)] == [(11, 15), (15, 19), (24, 26), (26, 28)]


def test_planner_targets(smollm2_scores):
    spec, scores = smollm2_scores
    device = load_devices()["phone-i8mm"]
    choice = choose_plan(spec, scores, PlanRequest(target_speedup=1.2), device)
    smaller = choose_plan(spec, scores, PlanRequest(fuse=choice.fuse - 1), device)
    assert choice.predicted_speedup >= 1.2 > smaller.predicted_speedup
    choice = choose_plan(spec, scores, PlanRequest(max_bytes_per_token=80e6), device)
    assert choice.plan_bytes <= 80e6
    # at a long context the KV cache dominates: the depth-aware planner drops attentions alone
    deep = choose_plan(spec, scores, PlanRequest(fuse=8, depth=8192, depth_aware=True), device)
    assert sum(b.attention is None for b in deep.plan.blocks) > 0


def test_depth_aware_plan_is_the_cheapest_mix_of_the_bytes(smollm2_scores):
    """At depth 0 the depth-aware plan saves the plain plan's bytes at no more summed influence, trading a
    fused layer for four near-useless attentions where that is cheaper; prune-da drops the same things."""
    spec, scores = smollm2_scores
    cost = lambda plan: planned_cost(hybrid_config(spec, plan), WeightTypes(), 0).total_bytes
    for n in (2, 4, 6, 8):
        plain = build_plan(spec, scores, PlanRequest(fuse=n, depth=0), n)
        aware = build_plan(spec, scores, PlanRequest(fuse=n, depth=0, depth_aware=True), n)
        fused, attn = aware.notes["fused_layers"], aware.notes["attention_removed"]
        assert not set(fused) & set(attn) and all(0 < i < 29 for i in fused + attn)
        assert cost(aware) <= cost(plain) * 1.001      # at least the plain plan's bytes saved
        influence = sum(scores.influence[i] for i in fused) + sum(scores.attention_influence[i] for i in attn)
        assert influence <= sum(scores.influence[i] for i in plain.notes["fused_layers"]) + 1e-9
        pruned = build_plan(spec, scores, PlanRequest(method="prune", fuse=n, depth=0, depth_aware=True), n)
        assert pruned.notes["removed_layers"] == fused and pruned.notes.get("attention_removed", []) == attn
        assert [b.attention for b in pruned.blocks] == [b.attention for b in aware.blocks]
    # SmolLM2's attentions 25, 26, 28 and 7 are nearly idle: at 4 they buy one fused layer less
    four = build_plan(spec, scores, PlanRequest(fuse=4, depth=0, depth_aware=True), 4).notes
    assert len(four["fused_layers"]) == 3 and len(four["attention_removed"]) == 4


def test_block_local_healing_lowers_the_loss(tiny_dirs, calibration_text):
    hf = tiny_dirs["llama"]
    spec = load_dense_spec(hf)
    plan = parse_plan({"source_layers": 6, "router_init": "fit", "blocks": [
        {"attention": 0, "mlp": [0]}, {"attention": 1, "mlp": [1, 2], "top_k": 4, "split": 4},
        {"attention": 3, "mlp": [3]}, {"attention": 4, "mlp": [4, 5], "top_k": 2, "split": 2}]})
    assert block_spans(plan) == [(0, 1), (1, 3), (3, 4), (4, 6)] and trained_blocks(plan) == [1, 3]
    teacher = upcycle(spec, Checkpoint(hf), identity_plan(6))
    model = upcycle(spec, Checkpoint(hf), plan)
    cache = TeacherCache(teacher, chunks_of(hf, calibration_text), {1, 3, 4, 6}, progress=False)
    try:
        log = block_local_distill(model, plan, cache, Budget(max_steps=40), BlockLocalConfig(lr=1e-3, log_every=5),
                                  progress=False)
    finally:
        cache.close()
    first, last = log.rows[0], log.rows[-1]
    for j in (1, 3):
        assert last[f"rel_mse_{j}"] < 0.9 * first[f"rel_mse_{j}"]


def test_end_to_end_distillation_lowers_kl_and_resumes(tiny_dirs, calibration_text, tmp_path):
    hf = tiny_dirs["qwen3"]
    spec = load_dense_spec(hf)
    plan = parse_plan({"source_layers": 6, "router_init": "random", "blocks": [
        {"attention": None, "mlp": [0, 1], "top_k": 1}, {"attention": 2, "mlp": [2, 3], "top_k": 2, "split": 2},
        {"attention": 4, "mlp": [4]}, {"attention": 5, "mlp": [5]}]})
    teacher = upcycle(spec, Checkpoint(hf), identity_plan(6))
    model = upcycle(spec, Checkpoint(hf), plan)
    chunks = chunks_of(hf, calibration_text, 64, 16)
    ckpt = tmp_path / CHECKPOINTS
    cfg = E2EConfig(lr=1e-3, log_every=1, checkpoint_every=5, lm_weight=0.0, precision="fp32")
    log1 = distill_e2e(model, teacher, chunks, Budget(max_steps=10), cfg, checkpoint_dir=ckpt, progress=False)
    assert last_progress(tmp_path)["step"] == 10
    resumed = upcycle(spec, Checkpoint(hf), plan)   # from the upcycled weights: the checkpoint brings the rest
    log2 = distill_e2e(resumed, teacher, chunks, Budget(max_steps=20), cfg, checkpoint_dir=ckpt, progress=False)
    assert log2.rows[0]["step"] == 11 and log2.tokens == 20 * 4 * 64
    kl = [r["kd"] for r in log1.rows + log2.rows]
    assert np.mean(kl[-5:]) < 0.8 * np.mean(kl[:3])


def test_frozen_guests_keep_their_pretrained_weights(tiny_dirs, calibration_text, tmp_path):
    """With freeze_guests both healing stages leave every guest expert bit for bit and train the host's experts,
    the router and the attention; the hooks are gone afterwards."""
    from d2m_gguf.heal import HealSettings, heal

    hf = tiny_dirs["llama"]
    spec = load_dense_spec(hf)
    plan = parse_plan({"source_layers": 6, "router_init": "fit", "blocks": [
        {"attention": 0, "mlp": [0]}, {"attention": 1, "mlp": [1, 2], "top_k": 2, "split": 2},
        {"attention": 3, "mlp": [3, 4, 5], "top_k": 1}]})
    teacher = upcycle(spec, Checkpoint(hf), identity_plan(6))
    model = upcycle(spec, Checkpoint(hf), plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = HealSettings(tokens=8192, block_local_fraction=0.5, ctx=64, freeze_guests=True, host_first=False,
                            block_local=BlockLocalConfig(lr=1e-3), e2e=E2EConfig(lr=1e-3))
    heal(model, teacher, plan, spec, chunks_of(hf, calibration_text), settings, tmp_path, progress=False)
    after = model.state_dict()
    hosts_trained = []
    for j, host_experts in ((1, 2), (2, 1)):
        for name in ("gate_proj", "up_proj", "down_proj"):
            key = f"model.layers.{j}.mlp.experts.{name}"
            assert torch.equal(after[key][host_experts:], before[key][host_experts:]), key
            hosts_trained.append(not torch.equal(after[key][:host_experts], before[key][:host_experts]))
        for key in (f"model.layers.{j}.mlp.router.weight", f"model.layers.{j}.self_attn.q_proj.weight"):
            assert not torch.equal(after[key], before[key]), key
    assert any(hosts_trained)   # (a host that the router no longer picks gets no gradient)
    assert all(p._backward_hooks is None or not p._backward_hooks for p in model.parameters())


def test_host_first_heals_routed_blocks_as_pruning_does(tiny_dirs, calibration_text, tmp_path):
    """With host_first, block-local distillation trains a routed block's host (and attention, norms) token for
    token as it trains the pruned model's dense block, the router staying on the host; the router fit runs
    after it, on the healed block, and a block whose guests no token reaches then heals on as a dense block."""
    from d2m_gguf.heal import HealSettings, heal

    hf = tiny_dirs["llama"]
    spec = load_dense_spec(hf)
    pruned = parse_plan({"source_layers": 6, "blocks": [{"attention": i, "mlp": [i]} for i in (0, 1, 3, 4, 5)]})
    fused = {"source_layers": 6, "router_init": "host", "blocks": [
        {"attention": 0, "mlp": [0]}, {"attention": 1, "mlp": [1, 2], "top_k": 1},
        {"attention": 3, "mlp": [3]}, {"attention": 4, "mlp": [4]}, {"attention": 5, "mlp": [5]}]}
    teacher = upcycle(spec, Checkpoint(hf), identity_plan(6))
    chunks = chunks_of(hf, calibration_text)
    settings = HealSettings(tokens=4096, block_local_fraction=1.0, ctx=64, host_first=True,
                            block_local=BlockLocalConfig(lr=1e-3, precision="fp32"))
    start = upcycle(spec, Checkpoint(hf), pruned)
    a = heal(upcycle(spec, Checkpoint(hf), pruned), teacher, pruned, spec, chunks, settings, tmp_path, progress=False)
    b = heal(upcycle(spec, Checkpoint(hf), parse_plan(fused)), teacher, parse_plan(fused), spec, chunks, settings,
             tmp_path, progress=False)
    assert [log.stage for log in b.logs] == ["block-local"]
    assert b.plan.blocks[1].kind == "attn+dense" and b.plan.notes["idle_experts_dropped"] == {"1": [2]}
    assert not torch.allclose(a.model.layers[1].mlp.gate_proj.weight, start.layers[1].mlp.gate_proj.weight)
    for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight"):
        mine, theirs = b.model.layers[1].get_parameter(name), a.model.layers[1].get_parameter(name)
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6), name
    fit = heal(upcycle(spec, Checkpoint(hf), parse_plan({**fused, "router_init": "fit"})), teacher,
               parse_plan({**fused, "router_init": "fit"}), spec, chunks, settings, tmp_path, progress=False)
    assert [log.stage for log in fit.logs] == ["block-local", "router-fit"]
    assert fit.plan.blocks[1].moe == fit.logs[1].rows[0]["kept"]   # a guest stays only where the fit admits it
    row = fit.logs[1].rows[0]   # a perfect router picks each token's best expert: no fit, host or fitted, does better
    assert row["held_out_rel_err_oracle"] <= min(row["held_out_rel_err_before"], row["held_out_rel_err_after"])
    assert 0.0 <= row["oracle_guest_share"] <= 1.0
    assert all(p.requires_grad for p in fit.model.parameters())


def test_convert_default_pipeline_on_a_tiny_model(tiny_dirs, calibration_text, llama, tmp_path):
    out = tmp_path / "tiny-lfuc.gguf"
    proc = run_cli("convert.py", tiny_dirs["qwen2"], out, "--fuse", "2", "--split", "2", "--heal-tokens", "8192",
                   "--text", calibration_text, "--ctx", "64", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert validate_gguf(out) == []
    work = tmp_path / "tiny-lfuc.gguf.d2m"
    for name in ("scores.json", "scores.png", "plan.json", "heal.csv", "heal.png", "heal.json", "summary.json"):
        assert (work / name).is_file(), name
    summary = json.loads((work / "summary.json").read_text())
    assert summary["plan"]["blocks"] == 4 and summary["predicted"]["speedup"] > 1
    healing = json.loads((work / "heal.json").read_text())
    assert [s["stage"] for s in healing["stages"]] == ["block-local", "router-fit", "end-to-end"]   # host first
    # what block-local healing ran with: host first, no router target and no balance term
    assert healing["settings"]["block_local"]["router_weight"] == healing["settings"]["block_local"]["balance_weight"] == 0
    assert healing["expert_usage"]
    text, log = llama.complete(out, "Hello", n=4)
    assert text.strip()


def test_idle_experts_are_dropped_and_blocks_written_dense(tiny_dirs, calibration_text, llama, tmp_path):
    """After healing, experts under --min-expert-share of the calibration tokens are dropped (1: all but each
    block's most used one): every routed block is written dense and llama.cpp runs the file."""
    out = tmp_path / "m.gguf"
    proc = run_cli("convert.py", tiny_dirs["llama"], out, "--fuse", "2", "--heal-tokens", "2048", "--min-expert-share",
                   "1", "--text", calibration_text, "--ctx", "64", "--quiet")
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "m.gguf.d2m"
    routed = {str(j): b["mlp"] for j, b in enumerate(json.loads((work / "plan.json").read_text())["blocks"])
              if len(b["mlp"]) > 1}
    healing = json.loads((work / "heal.json").read_text())
    # host first, the dropping happens before end-to-end healing, on the usage after the router fit
    usage = healing["expert_usage_after_router_fit"]
    kept = {j: routed[j][max(range(len(u)), key=u.__getitem__)] for j, u in usage.items()}
    assert routed and healing["idle_experts_dropped"] == {j: [s for s in m if s != kept[j]] for j, m in routed.items()}
    assert healing["expert_usage"] == {}   # nothing routed is left to heal end to end
    assert set(json.loads((work / "summary.json").read_text())["plan"]["kinds"]) == {"attn+dense"}
    assert validate_gguf(out) == [] and not any("exps" in t.name for t in gguf.GGUFReader(out).tensors)
    text, _ = llama.complete(out, "Hello", n=4)
    assert text.strip()
    proc = run_cli("convert.py", tiny_dirs["llama"], out, "--fuse", "2", "--min-expert-share", "2", "--quiet")
    assert proc.returncode != 0 and "--min-expert-share" in proc.stderr


def test_lfuc_whose_guests_are_never_routed_writes_the_pruned_model(tiny_dirs, calibration_text, llama_stock,
                                                                   tmp_path):
    """Host first with host routers (no fit admits a guest), every guest is dropped before end-to-end healing:
    the whole convert, end-to-end healing included, writes the pruned model's tensors bit for bit (as measured
    on SmolLM2 at 6 fused layers with the fit), as the source's own architecture, which stock llama.cpp runs."""
    args = ("--fuse", "2", "--heal-tokens", "4096", "--text", calibration_text, "--ctx", "64", "--quiet")
    files = {}
    for method in ("lfuc", "prune"):
        files[method] = tmp_path / f"{method}.gguf"
        proc = run_cli("convert.py", tiny_dirs["llama"], files[method], "--method", method, "--router-init", "host",
                       "--outtype", "f32", *args)
        assert proc.returncode == 0, proc.stderr
    healing = json.loads((tmp_path / "lfuc.gguf.d2m" / "heal.json").read_text())
    assert healing["idle_experts_dropped"] and healing["stages"][-1]["tokens"] > 0
    lfuc, prune = ({t.name: np.asarray(t.data) for t in gguf.GGUFReader(files[m]).tensors} for m in ("lfuc", "prune"))
    assert lfuc.keys() == prune.keys()
    assert all(np.array_equal(lfuc[name], prune[name]) for name in lfuc)
    assert gguf.GGUFReader(files["lfuc"]).fields["general.architecture"].contents() == "llama"
    assert json.loads((tmp_path / "lfuc.gguf.d2m" / "summary.json").read_text())["gguf"]["architecture"] == "llama"
    text, _ = llama_stock.complete(files["lfuc"], "The capital of France is", n=4)
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")


def test_a_plan_that_changes_nothing_is_not_healed(tiny_dirs, calibration_text, tmp_path):
    """The identity plan builds the dense model: the default healing budget would spend minutes teaching it itself."""
    hf, plan, out = tiny_dirs["llama"], tmp_path / "identity.json", tmp_path / "identity.gguf"
    identity_plan(6).save(plan)
    proc = run_cli("convert.py", hf, out, "--plan", plan, "--text", calibration_text, "--ctx", "64", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "changes nothing" in proc.stderr
    work = tmp_path / "identity.gguf.d2m"
    assert json.loads((work / "summary.json").read_text())["healing"] is None
    assert not (work / "heal.json").exists() and validate_gguf(out) == []


def test_convert_heals_afresh_over_an_earlier_run(tiny_dirs, calibration_text, tmp_path):
    """A second convert into the same work dir (here with a smaller budget) heals its own model, not the first
    run's resumed; convert leaves no end-to-end checkpoint behind (resuming is `d2m distill`'s)."""
    hf, out = tiny_dirs["llama"], tmp_path / "m.gguf"
    e2e_tokens = []
    for tokens in (8192, 2048):
        proc = run_cli("convert.py", hf, out, "--fuse", "2", "--heal-tokens", tokens, "--block-local-fraction", "0.5",
                       "--text", calibration_text, "--ctx", "64", "--quiet")
        assert proc.returncode == 0, proc.stderr
        stages = json.loads((tmp_path / "m.gguf.d2m" / "heal.json").read_text())["stages"]
        e2e_tokens.append(next(s["tokens"] for s in stages if s["stage"] == "end-to-end"))
    assert e2e_tokens == [4096, 1024] and not (tmp_path / "m.gguf.d2m" / "checkpoint.pt").exists()


def test_stages_run_alone_upcycle_heal_then_write(tiny_dirs, calibration_text, llama, tmp_path):
    """convert --save-hf --no-heal -> d2m distill (resumable; its former name `heal` too) -> convert --from-checkpoint: the staged path."""
    from d2m_gguf.hf_export import load_hf_checkpoint

    hf = tiny_dirs["llama"]
    up, healed, out = upcycled_unhealed(hf, calibration_text, tmp_path), tmp_path / "healed", tmp_path / "healed.gguf"
    common = ("--teacher", hf, "--text", calibration_text, "--ctx", "64", "--lr", "1e-3", "--quiet")
    proc = run_cli("-m", "d2m_gguf", "distill", up, healed, "--tokens", "2048", "--minutes", "0", *common)
    assert proc.returncode == 0, proc.stderr
    assert (healed / "heal.csv").is_file()
    first = last_progress(healed)["tokens"]
    proc = run_cli("-m", "d2m_gguf", "distill", up, healed, "--tokens", "4096", "--minutes", "0", *common)  # resumes, goes on
    assert proc.returncode == 0, proc.stderr
    assert first == 2048 and last_progress(healed)["tokens"] == 4096
    before, after = load_hf_checkpoint(up).state_dict(), load_hf_checkpoint(healed).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # by default the guest experts stay as the student has them and the hosts heal; --train-guests trains them
    from d2m_gguf.hf_export import load_hf_plan
    trained = tmp_path / "trained"
    proc = run_cli("-m", "d2m_gguf", "heal", up, trained, "--tokens", "2048", "--minutes", "0", "--train-guests",
                   *common)
    assert proc.returncode == 0, proc.stderr
    retrained = load_hf_checkpoint(trained).state_dict()
    moe = [(j, b.split) for j, b in enumerate(load_hf_plan(up, 6).blocks) if b.moe and len(b.mlp) > 1]
    assert moe
    for j, host in moe:
        key = f"model.layers.{j}.mlp.experts.up_proj"
        assert torch.equal(after[key][host:], before[key][host:]) and not torch.equal(after[key], before[key])
        assert not torch.equal(retrained[key][host:], before[key][host:])
    proc = run_cli("convert.py", hf, out, "--from-checkpoint", healed, "--outtype", "f32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert_gguf_holds(out, after, llama)


@pytest.mark.slow
def test_healing_improves_smollm2(smollm2_dir, calibration_text, wikitext, tmp_path):
    """A short healing run makes the LF-UC model better than it was unhealed (which is the pruned model)."""
    from d2m_gguf.heal import HealSettings, heal

    spec = load_dense_spec(smollm2_dir)
    teacher = upcycle(spec, Checkpoint(smollm2_dir), identity_plan(30))
    scores = analyze(teacher, chunks_of(smollm2_dir, calibration_text, 128, 8), progress=False)
    plan = build_plan(spec, scores, PlanRequest(method="lfuc"), 4)
    model = upcycle(spec, Checkpoint(smollm2_dir), plan)
    tok = Tokenizer(smollm2_dir)
    evaluation = token_chunks(tok.encode(wikitext.read_text(encoding="utf-8")[:40000]), 256, 6, tok.bos)
    before = perplexity(model, evaluation)
    settings = HealSettings(tokens=40_000, max_chunks=96)
    model = heal(model, teacher, plan, spec, chunks_of(smollm2_dir, calibration_text, 256, 96), settings, tmp_path,
                 progress=False).model
    after = perplexity(model, evaluation)
    assert after < 0.95 * before, (before, after)
