"""The PyTorch reference: equal to transformers on the identity plan, exact folds, GGUF/HF round trips."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from d2m_gguf.checkpoint import Checkpoint
from d2m_gguf.ggufout import OutType
from d2m_gguf.hf_export import load_hf_checkpoint, save_hf_checkpoint
from d2m_gguf.hybrid_export import export_hybrid
from d2m_gguf.plan import identity_plan, parse_plan
from d2m_gguf.reader import inspect_gguf, load_hybrid, validate_gguf
from d2m_gguf.spec import load_dense_spec
from d2m_gguf.upcycle import upcycle

from .helpers import nmse
from .test_plan import ALL_KINDS


def tokens(vocab: int, n: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def build(hf_dir, plan_doc_or_plan, seed=0):
    spec = load_dense_spec(hf_dir)
    plan = plan_doc_or_plan if not isinstance(plan_doc_or_plan, dict) else parse_plan(plan_doc_or_plan)
    return spec, plan, upcycle(spec, Checkpoint(hf_dir), plan, seed=seed)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_identity_plan_equals_transformers(tiny_dirs, family):
    spec, _, model = build(tiny_dirs[family], identity_plan(6))
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32)
    t = tokens(spec.vocab_size)
    with torch.no_grad():
        assert nmse(model(t).numpy(), hf(t).logits.numpy()) < 1e-10


@pytest.mark.slow
def test_identity_plan_equals_transformers_smollm2(smollm2_dir):
    spec, _, model = build(smollm2_dir, identity_plan(30))
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    t = tokens(spec.vocab_size, 96)
    with torch.no_grad():
        assert nmse(model(t).numpy(), hf(t).logits.numpy()) < 1e-10


def test_host_router_is_pruning(tiny_dirs):
    """A top-1 router that always picks the host expert computes what dropping the other MLP computes."""
    pruned = {"source_layers": 6, "blocks": [{"attention": i, "mlp": [i]} for i in (0, 1, 3, 4, 5)]}
    fused = {"source_layers": 6, "router_init": "host", "blocks": [
        {"attention": 0, "mlp": [0]}, {"attention": 1, "mlp": [1, 2], "top_k": 1},
        {"attention": 3, "mlp": [3]}, {"attention": 4, "mlp": [4]}, {"attention": 5, "mlp": [5]}]}
    _, _, a = build(tiny_dirs["qwen2"], pruned)
    _, _, b = build(tiny_dirs["qwen2"], fused)
    t = tokens(49152)
    with torch.no_grad():
        assert nmse(b(t).numpy(), a(t).numpy()) < 1e-10


def test_pruned_blocks_that_heal_carry_their_norm_gain_folded(tiny_dirs):
    """A dense block that stands for a pruned layer (healing trains it) gets its FFN norm gain folded into
    gate/up, the parametrisation LF-UC's routed blocks heal in, and still computes dropping that layer;
    blocks that copy one layer keep their norm as it is."""
    pruned = {"source_layers": 6, "blocks": [{"attention": i, "mlp": [i]} for i in (0, 1, 3, 4, 5)]}
    spec, _, dense = build(tiny_dirs["qwen2"], identity_plan(6))
    _, plan, model = build(tiny_dirs["qwen2"], pruned)
    ckpt = Checkpoint(tiny_dirs["qwen2"])
    gain = torch.from_numpy(ckpt.get("model.layers.1.post_attention_layernorm.weight")).float()
    assert not torch.allclose(gain, torch.ones_like(gain))   # the tiny model's gains are not 1: folding shows
    healed = model.layers[1]
    assert torch.equal(healed.post_attention_layernorm.weight, torch.ones_like(gain))
    assert torch.equal(healed.mlp.gate_proj.weight, dense.layers[1].mlp.gate_proj.weight * gain)
    assert torch.equal(model.layers[2].post_attention_layernorm.weight, dense.layers[3].post_attention_layernorm.weight)
    del dense.layers[2]
    t = tokens(spec.vocab_size)
    with torch.no_grad():
        assert nmse(model(t).numpy(), dense(t).numpy()) < 1e-10


def test_idle_experts_are_dropped_and_the_output_is_kept(tiny_dirs):
    """Experts the router never picks are removed: a block left with one expert (here the guest: the host
    is idle) becomes dense, a block keeping two loses only the idle one, and the logits stay the same."""
    from d2m_gguf.heal import expert_usage
    from d2m_gguf.upcycle import drop_idle_experts

    fused = {"source_layers": 6, "router_init": "random", "blocks": [
        {"attention": 0, "mlp": [0]}, {"attention": 1, "mlp": [1, 2], "top_k": 1},
        {"attention": 3, "mlp": [3, 4, 5], "top_k": 1}]}
    spec, plan, model = build(tiny_dirs["qwen2"], fused)
    t = tokens(spec.vocab_size, 96)
    moe = model.layers[2].mlp
    seen = []
    hook = moe.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, spec.n_embd)))
    with torch.no_grad():
        model.layers[1].mlp.router.bias[:] = torch.tensor([-1e4, 0.0])     # layer 2's guest only
        model(t)
        hook.remove()
        projection = seen[0] @ moe.router.weight[1]                        # host or layer 4's guest, half
        moe.router.weight[0] = 0.0                                         # the tokens each; layer 5's idle
        moe.router.bias[:] = torch.tensor([0.0, -projection.median().item(), -1e4])
    usage = expert_usage(model, t)
    assert usage[1] == [0.0, 1.0] and usage[2][2] == 0.0 and 0.0 < usage[2][1] < 1.0
    dropped, new_plan = drop_idle_experts(model, plan, spec, usage, min_share=0.001)
    assert [b.kind for b in new_plan.blocks] == ["attn+dense", "attn+dense", "attn+moe"]
    assert new_plan.blocks[1].mlp == (2,) and new_plan.blocks[1].attention == 1 and new_plan.blocks[2].mlp == (3, 4)
    assert new_plan.notes["idle_experts_dropped"] == {"1": [1], "2": [5]}
    assert dropped.layers[2].mlp.router.weight.shape == (2, spec.n_embd)
    with torch.no_grad():
        assert nmse(dropped(t).numpy(), model(t).numpy()) < 1e-12
    assert drop_idle_experts(model, plan, spec, usage, min_share=0.0) == (model, plan)   # 0 keeps every expert


def test_all_experts_of_identical_inputs_is_the_dense_mlp(tiny_dirs):
    """top-k = all experts over copies of one MLP, renormalised, folds back to that MLP exactly."""
    dense = identity_plan(6)
    doubled = {"source_layers": 6, "shared": [2], "blocks": [
        {"attention": i, "mlp": [i, i] if i == 2 else [i], **({"top_k": 2} if i == 2 else {})} for i in range(6)]}
    _, _, a = build(tiny_dirs["llama"], dense)
    _, _, b = build(tiny_dirs["llama"], doubled)
    t = tokens(49152)
    with torch.no_grad():
        assert nmse(b(t).numpy(), a(t).numpy()) < 1e-10


def test_moe_routing_follows_topk(tiny_dirs):
    _, _, model = build(tiny_dirs["mistral"], ALL_KINDS)
    with torch.no_grad():
        model(tokens(1024))
    sel = model.layers[2].mlp.last_selection
    assert sel.shape[-1] == 2 and set(sel.unique().tolist()) <= {0, 1}
    assert sel.unique().numel() == 2  # a random router routes to both experts


def test_top1_router_learns_from_the_output_loss(tiny_dirs):
    """Top-1 with renormalisation weighs the chosen expert exactly 1, so a loss on the block's output would give
    the router no gradient; in training the weight is p / stop_grad(p): the same output, and a gradient."""
    _, _, model = build(tiny_dirs["llama"], ALL_KINDS)
    moe = model.layers[0].mlp
    assert moe.n_expert_used == 1 and moe.normalize
    h = torch.randn(32, model.cfg.n_embd, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        served = moe(h)
    moe.train()
    trained = moe(h)
    assert torch.equal(trained.detach(), served)
    trained.pow(2).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gguf_round_trip_f32(tiny_dirs, tmp_path, family):
    spec, plan, model = build(tiny_dirs[family], ALL_KINDS)
    out = tmp_path / "m.gguf"
    export_hybrid(model, plan, spec, tiny_dirs[family], out, OutType.F32, progress=False)
    assert validate_gguf(out) == []
    back = load_hybrid(out)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    info = inspect_gguf(out)
    assert [(l["attention"], l["experts"], l["experts_used"]) for l in info["layers"]] == \
        [(False, 2, 1), (True, 0, 0), (True, 2, 2), (False, 0, 0)]
    assert info["method"] == "manual" and info["plan"]["blocks"][2]["top_k"] == 2


def test_gguf_round_trip_f16_and_router_stays_f32(tiny_dirs, tmp_path):
    spec, plan, model = build(tiny_dirs["qwen2"], ALL_KINDS)
    out = tmp_path / "m.gguf"
    export_hybrid(model, plan, spec, tiny_dirs["qwen2"], out, OutType.F16, progress=False)
    back = load_hybrid(out)
    for key, value in model.state_dict().items():
        expected = value if value.dim() == 1 or ".mlp.router." in key else value.half().float()
        assert torch.equal(back.state_dict()[key], expected), key


def test_hf_checkpoint_round_trip(tiny_dirs, tmp_path):
    spec, plan, model = build(tiny_dirs["qwen3"], ALL_KINDS)
    save_hf_checkpoint(model, plan, spec, tiny_dirs["qwen3"], tmp_path / "hf")
    back = load_hf_checkpoint(tmp_path / "hf")
    t = tokens(49152)
    with torch.no_grad():
        assert torch.equal(back(t), model(t))
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "d2m_plan.json").is_file()
