"""Fusion plans: parsing, validation errors, round trip."""

from __future__ import annotations

import json

import pytest

from d2m_gguf.errors import D2MError
from d2m_gguf.plan import FusionPlan, identity_plan, load_plan, parse_plan

from .conftest import REPO

ALL_KINDS = {"source_layers": 6, "blocks": [
    {"attention": None, "mlp": [0, 1], "top_k": 1},
    {"attention": 2, "mlp": [2]},
    {"attention": 3, "mlp": [3, 4], "top_k": 2},
    {"attention": None, "mlp": [5]},
]}


def test_block_kinds_and_defaults():
    plan = parse_plan(ALL_KINDS)
    assert [b.kind for b in plan.blocks] == ["no-attn+moe", "attn+dense", "attn+moe", "no-attn+dense"]
    assert [b.top_k for b in plan.blocks] == [1, 0, 2, 0]
    assert plan.normalize_topk and plan.router_init == "random"
    assert plan.dropped_layers() == []


def test_round_trip(tmp_path):
    plan = parse_plan({**ALL_KINDS, "shared": [5], "notes": {"why": "test"}})
    path = tmp_path / "plan.json"
    plan.save(path)
    assert load_plan(path, 6) == plan
    assert json.loads(path.read_text())["blocks"][2] == {"attention": 3, "mlp": [3, 4], "top_k": 2}


def test_yaml(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("source_layers: 6\nblocks:\n  - {attention: 0, mlp: [0, 1]}\n  - {attention: null, mlp: 2}\n")
    plan = load_plan(path)
    assert plan.blocks[0].moe and not plan.blocks[1].moe and plan.blocks[1].mlp == (2,)


def test_dense_block_summing_several_mlps():
    plan = parse_plan({"source_layers": 4, "blocks": [{"attention": 0, "mlp": [0, 1], "ffn": "dense"},
                                                      {"attention": 2, "mlp": [2, 3]}]})
    assert not plan.blocks[0].moe and plan.blocks[0].n_expert == 0
    assert plan.blocks[1].moe and plan.blocks[1].n_expert == 2


@pytest.mark.parametrize("doc, message", [
    ({"source_layers": 6, "blocks": []}, "non-empty list"),
    ({"blocks": [{"attention": 0, "mlp": [0]}]}, "'source_layers' must be an integer"),
    ({"source_layers": 6, "blocks": [{"attention": 6, "mlp": [0]}]}, "block 0: attention source 6 is out of range"),
    ({"source_layers": 6, "blocks": [{"attention": 0, "mlp": [0, 9]}]}, "block 0: mlp source 9 is out of range"),
    ({"source_layers": 6, "blocks": [{"attention": 0, "mlp": [0]}, {"attention": 1, "mlp": [0, 1]}]},
     "mlp of layer 0 is used 2 times"),
    ({"source_layers": 6, "blocks": [{"attention": 0, "mlp": [0]}, {"attention": 0, "mlp": [1]}]},
     "attention of layer 0 is used 2 times"),
    ({"source_layers": 6, "blocks": [{"attention": 0, "mlp": [0, 1], "top_k": 3}]}, "top_k 3 must be between 1 and the 2"),
    ({"source_layers": 6, "blocks": [{"attention": 0, "mlp": [0, 1], "top_k": 0}]}, "top_k 0"),
    ({"source_layers": 6, "blocks": [{"attention": 0, "mlp": [0], "top_k": 1}]}, "'top_k' is only for"),
    ({"source_layers": 6, "blocks": [{"attention": 0, "mlp": [0], "ffn": "sparse"}]}, "'ffn' must be"),
    ({"source_layers": 6, "blocks": [{"attention": 0, "mlp": []}]}, "'mlp' must be a non-empty list"),
    ({"source_layers": 6, "blocks": [{"attention": "0", "mlp": [0]}]}, "'attention' must be an integer"),
    ({"source_layers": 6, "blocks": [{"attention": 0, "mlp": [0], "experts": 2}]}, "unknown field 'experts'"),
    ({"source_layers": 6, "router_init": "magic", "blocks": [{"attention": 0, "mlp": [0]}]}, "'router_init' must be"),
    ({"source_layers": 6, "format": "other/2", "blocks": [{"attention": 0, "mlp": [0]}]}, "unknown format"),
])
def test_invalid_plans(doc, message):
    with pytest.raises(D2MError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_plan(doc)


def test_plan_for_another_depth(tmp_path):
    path = tmp_path / "p.json"
    identity_plan(4).save(path)
    with pytest.raises(D2MError, match="written for a 4-layer model, the source has 30"):
        load_plan(path, 30)


def test_invalid_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"blocks": [')
    with pytest.raises(D2MError, match="invalid JSON at line 1"):
        load_plan(path)


def test_shipped_plans_are_valid():
    for path in (REPO / "examples" / "plans").glob("*.json"):
        plan = load_plan(path)
        assert isinstance(plan, FusionPlan)
    kinds = {b.kind for b in load_plan(REPO / "examples" / "plans" / "smollm2-all-kinds.json", 30).blocks}
    assert kinds == {"attn+dense", "attn+moe", "no-attn+moe", "no-attn+dense"}
