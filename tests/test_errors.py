"""Bad input is one clear line, exit status 2, no traceback and no output: a corpus generated here.

Every case builds its broken input from a tiny checkpoint (tiny_dirs) in a fresh
directory, runs `python convert.py` as a user would, and checks: exit status 2,
exactly one `error: ...` line on stderr that contains the case's distinctive
fragment (what is wrong and where), no traceback, and nothing written beside the
output path (no GGUF, no temporary file, no work directory).

The tests run as root here, so permission bits stop nothing: a read-only output
directory is a real one instead (sysfs, where not even root can create a file),
and the other output failures are a missing directory, a file in the place of the
directory, and (in-process) a disk reported full.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest

from .conftest import REPO, run_cli
from .test_cli import assert_user_error

PLAN = REPO / "examples" / "plans" / "tiny-all-kinds.json"   # a valid plan for the 6-layer tiny models


# -- building broken inputs ---------------------------------------------------------------------

def _copy(tiny_dirs, tmp: Path, family: str = "llama") -> Path:
    src = tmp / f"src-{family}"
    shutil.copytree(tiny_dirs[family], src)
    return src


def _replace(src: Path, name: str, content: bytes | None) -> Path:
    """`src` with its file `name` replaced by `content` (None: removed)."""
    if content is None:
        (src / name).unlink()
    else:
        (src / name).write_bytes(content)
    return src


def _edit_config(src: Path, **changes) -> Path:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))
    return src


def _edit_tensors(src: Path, edit: Callable[[dict], None]) -> Path:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"))
    return src


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def _offsets_past_end(src: Path) -> Path:
    """The last tensor's offsets moved past the end of the file (its size still matches its shape)."""
    path = src / "model.safetensors"
    header, data = _safetensors_parts(path)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 4096, end + 4096]
    _write_safetensors(path, header, data)
    return src


def _plan(tmp: Path, text: str, suffix: str = ".json") -> Path:
    path = tmp / f"plan{suffix}"
    path.write_text(text)
    return path


def _plan_with(tmp: Path, edit: Callable[[dict], None]) -> Path:
    doc = json.loads(PLAN.read_text())
    edit(doc)
    return _plan(tmp, json.dumps(doc))


def _block(i: int, **changes) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        doc["blocks"][i].update(changes)
    return edit


def _bpe_token_beyond_vocab(src: Path) -> Path:
    """An added token whose id is past config.json's vocab_size (the checkpoint itself is consistent)."""
    vocab_size = json.loads((src / "config.json").read_text())["vocab_size"]
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": vocab_size + 7, "content": "<|beyond|>", "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (src / "tokenizer.json").write_text(json.dumps(tok))
    return src


def _spm_bigger_than_vocab(src: Path) -> Path:
    """A SentencePiece model with more pieces than a (consistently shrunk) checkpoint's vocab_size."""
    vocab_size = json.loads((src / "config.json").read_text())["vocab_size"] - 24

    def shrink(tensors: dict) -> None:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][:vocab_size].copy()
    _edit_tensors(src, shrink)
    return _edit_config(src, vocab_size=vocab_size)


# -- the corpus ---------------------------------------------------------------------------------
# id -> (make(tiny_dirs, tmp) -> the convert.py arguments before OUT's options, extra options, fragments)
# The first argument is the source directory, the output is always tmp/out/model.gguf.

Case = tuple[Callable, tuple[str, ...], tuple[str, ...]]
DENSE = ("--dense", "--outtype", "f32")
HYBRID = ("--outtype", "f32", "--no-heal")

CASES: dict[str, Case] = {
    # the checkpoint directory and config.json
    "missing-directory": (lambda d, t: t / "nope", DENSE, ("nope", "no such directory")),
    "not-a-directory": (lambda d, t: (t / "file").write_text("x") and t / "file", DENSE, ("file", "not a directory")),
    "no-config": (lambda d, t: _replace(_copy(d, t), "config.json", None), DENSE, ("config.json", "missing")),
    "config-unreadable": (lambda d, t: _replace(_copy(d, t), "config.json", b"\xff\xfe{"), DENSE,
                          ("config.json", "cannot read")),
    "config-invalid-json": (lambda d, t: _replace(_copy(d, t), "config.json", b'{"a": 1,,}'), DENSE,
                            ("config.json", "invalid JSON at line 1")),
    "unsupported-architecture": (lambda d, t: _edit_config(_copy(d, t), architectures=["GPT2LMHeadModel"]), DENSE,
                                 ("config.json", "GPT2LMHeadModel", "not supported")),
    "config-missing-key": (lambda d, t: _drop_key(_copy(d, t), "num_hidden_layers"), DENSE,
                           ("config.json", "missing required key 'num_hidden_layers'")),
    # tensors
    "no-weights": (lambda d, t: _replace(_copy(d, t), "model.safetensors", None), DENSE, ("no model.safetensors",)),
    "pytorch-bin-only": (lambda d, t: (_copy(d, t) / "model.safetensors").rename(t / "src-llama" / "pytorch_model.bin")
                         and t / "src-llama", DENSE, ("only safetensors",)),
    "index-missing-shard": (lambda d, t: _index_missing_shard(_copy(d, t)), DENSE, ("shard", "is missing")),
    "missing-tensor": (lambda d, t: _edit_tensors(_copy(d, t), lambda ts: ts.pop("model.layers.3.mlp.down_proj.weight")),
                       DENSE, ("model.layers.3.mlp.down_proj.weight", "is missing")),
    "extra-tensor": (lambda d, t: _edit_tensors(_copy(d, t), lambda ts: ts.update(
        {"model.layers.2.mlp.extra_proj.weight": ts["model.norm.weight"]})), DENSE,
        ("unexpected tensor model.layers.2.mlp.extra_proj.weight",)),
    "wrong-shape": (lambda d, t: _edit_tensors(_copy(d, t), lambda ts: ts.update(
        {"model.layers.1.self_attn.q_proj.weight": ts["model.layers.1.self_attn.q_proj.weight"][:, :32].copy()})),
        DENSE, ("model.layers.1.self_attn.q_proj.weight", "has shape [64, 32], expected [64, 64]")),
    "safetensors-header-length": (lambda d, t: _patch_bytes(_copy(d, t) / "model.safetensors", 0,
                                                            struct.pack("<Q", 1 << 40)), DENSE,
                                  ("model.safetensors", "corrupt or truncated", "header too large")),
    "safetensors-truncated": (lambda d, t: _truncate(_copy(d, t) / "model.safetensors"), DENSE,
                              ("model.safetensors", "corrupt or truncated")),
    "safetensors-offsets-past-end": (lambda d, t: _offsets_past_end(_copy(d, t)), DENSE,
                                     ("model.safetensors", "corrupt or truncated")),
    "safetensors-header-garbage": (lambda d, t: _patch_bytes(_copy(d, t) / "model.safetensors", 8, b"{not json"),
                                   DENSE, ("model.safetensors", "corrupt or truncated", "JSON")),
    # the tokenizer
    "no-tokenizer": (lambda d, t: _replace(_copy(d, t), "tokenizer.json", None), DENSE, ("no tokenizer",)),
    "tokenizer-invalid-json": (lambda d, t: _replace(_copy(d, t), "tokenizer.json", b'{"model": '), DENSE,
                               ("tokenizer.json", "cannot read tokenizer file")),
    "bpe-token-beyond-vocab": (lambda d, t: _bpe_token_beyond_vocab(_copy(d, t)), HYBRID + ("--plan", str(PLAN)),
                               ("tokenizer.json", "do not fit the model's vocab_size 49152")),
    "spm-bigger-than-vocab": (lambda d, t: _spm_bigger_than_vocab(_copy(d, t, "mistral")), DENSE,
                              ("tokenizer.model", "do not fit the model's vocab_size 1000")),
    # plans
    "plan-invalid-json": (lambda d, t: d["llama"], HYBRID + ("--plan", "{tmp}/plan.json"),
                          ("plan.json", "invalid JSON at line")),
    "plan-invalid-yaml": (lambda d, t: d["llama"], HYBRID + ("--plan", "{tmp}/plan.yaml"),
                          ("plan.yaml", "invalid YAML")),
    "plan-missing-file": (lambda d, t: d["llama"], HYBRID + ("--plan", "{tmp}/absent.json"),
                          ("absent.json", "cannot read plan")),
    "plan-missing-layer": (lambda d, t: d["llama"], HYBRID + ("--plan", "{tmp}/plan.json"),
                           ("plan.json: block 3", "mlp source 6 is out of range 0..5")),
    "plan-source-used-twice": (lambda d, t: d["llama"], HYBRID + ("--plan", "{tmp}/plan.json"),
                               ("plan.json", "mlp of layer 2 is used 2 times")),
    "plan-top-k-above-experts": (lambda d, t: d["llama"], HYBRID + ("--plan", "{tmp}/plan.json"),
                                 ("plan.json: block 2", "top_k 3 must be between 1 and the 2 experts")),
    "plan-wrong-layer-count": (lambda d, t: d["llama"], HYBRID + ("--plan", "{tmp}/plan.json"),
                               ("plan.json", "written for a 7-layer model, the source has 6 layers")),
    "plan-split-not-dividing": (lambda d, t: d["llama"], HYBRID + ("--plan", "{tmp}/plan.json"),
                                ("plan.json: block 0", "split 3 does not divide the MLP width 160")),
    # calibration text
    "calibration-too-short": (lambda d, t: (t / "short.txt").write_text("Too short to heal on. " * 5) and d["llama"],
                              ("--outtype", "f32", "--plan", str(PLAN), "--heal-tokens", "4096", "--text",
                               "{tmp}/short.txt", "--ctx", "64"),
                              ("short.txt (--ctx 64)", "text too short", "need at least 64")),
    "calibration-missing": (lambda d, t: d["llama"], ("--outtype", "f32", "--plan", str(PLAN), "--heal-tokens", "64",
                                                       "--text", "{tmp}/absent.txt"),
                            ("absent.txt", "no such calibration text file")),
    # the output path
    "output-directory-missing": (lambda d, t: d["llama"], DENSE, ("does not exist",)),
    "output-directory-read-only": (lambda d, t: d["llama"], DENSE, ("/sys", "is not writable")),
    "output-parent-is-a-file": (lambda d, t: d["llama"], DENSE, ("is not a directory",)),
    "output-is-a-directory": (lambda d, t: d["llama"], DENSE, ("is a directory",)),
}

PLAN_TEXTS = {
    "plan-invalid-json": ("plan.json", '{"format": "d2m-plan/1", "blocks": [}'),
    "plan-invalid-yaml": ("plan.yaml", "blocks: [\n  - {attention: 0, mlp: [0]\n"),
}
PLAN_EDITS = {
    "plan-missing-layer": _block(3, mlp=[6]),
    "plan-source-used-twice": _block(3, mlp=[2]),
    "plan-top-k-above-experts": _block(2, top_k=3),
    "plan-wrong-layer-count": lambda doc: doc.update(source_layers=7),
    "plan-split-not-dividing": _block(0, split=3),
}


def _drop_key(src: Path, key: str) -> Path:
    config = json.loads((src / "config.json").read_text())
    del config[key]
    (src / "config.json").write_text(json.dumps(config))
    return src


def _index_missing_shard(src: Path) -> Path:
    header, _ = _safetensors_parts(src / "model.safetensors")
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in header if k != "__metadata__"}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src


def _patch_bytes(path: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return path.parent


def _truncate(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    return path.parent


def _output(case: str, tmp: Path) -> Path:
    if case == "output-directory-missing":
        return tmp / "missing" / "model.gguf"
    if case == "output-directory-read-only":
        return Path("/sys") / f"d2m-{tmp.name}.gguf"
    if case == "output-parent-is-a-file":
        (tmp / "out").write_text("a file, not a directory")
        return tmp / "out" / "model.gguf"
    out_dir = tmp / "out"
    out_dir.mkdir()
    if case == "output-is-a-directory":
        (out_dir / "model.gguf").mkdir()
    return out_dir / "model.gguf"


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(case, tiny_dirs, tmp_path):
    make, options, fragments = CASES[case]
    if case in PLAN_TEXTS:
        _plan(tmp_path, PLAN_TEXTS[case][1], Path(PLAN_TEXTS[case][0]).suffix)
    if case in PLAN_EDITS:
        _plan_with(tmp_path, PLAN_EDITS[case])
    src = make(tiny_dirs, tmp_path)
    out = _output(case, tmp_path)
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() and out.parent != Path("/sys") else []
    args = [a.replace("{tmp}", str(tmp_path)) for a in options]
    proc = run_cli("convert.py", src, out, "--quiet", *args)
    assert_user_error(proc, *fragments)
    if case != "output-is-a-directory":
        assert not out.exists()
    if out.parent.is_dir() and out.parent != Path("/sys"):
        # no GGUF, no temporary file, no work directory (OUT.d2m) beside the target
        assert sorted(p.name for p in out.parent.iterdir()) == before


@pytest.fixture
def in_process_convert(monkeypatch):
    """`d2m convert` in this process (to fake a full disk), returning (exit code, stderr)."""
    from click.testing import CliRunner

    from d2m_gguf import cli

    def run(*args) -> tuple[int, str]:
        result = CliRunner().invoke(cli.main, ["convert", *map(str, args)])
        assert isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, result.stderr
    return run


@pytest.mark.parametrize("mode", [DENSE, HYBRID + ("--plan", str(PLAN))], ids=["dense", "dense2moe"])
def test_not_enough_disk_space(mode, tiny_dirs, tmp_path, monkeypatch, in_process_convert):
    """shutil.disk_usage reports 1 MiB free: refused before writing (the tiny f32 model needs ~15 MiB)."""
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage(1 << 40, (1 << 40) - (1 << 20), 1 << 20))
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    code, stderr = in_process_convert(tiny_dirs["llama"], out, "--quiet", *mode)
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert "not enough disk space" in lines[0] and "1 MiB free" in lines[0], lines[0]
    assert list(out.parent.iterdir()) == []
