"""Hardening: outputs survive a kill, conversions are reproducible, broken files are reported in full,
and absurd sizes are refused before anything is allocated from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from d2m_gguf.constants import Keys
from d2m_gguf.errors import D2MError
from d2m_gguf.reader import field, open_gguf

from .conftest import REPO, run_cli
from .helpers import rewrite_gguf
from .test_parity import hybrid

PLAN = REPO / "examples" / "plans" / "tiny-all-kinds.json"
U32, BOOL, ARRAY = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL, gguf.GGUFValueType.ARRAY


# -- atomic output ---------------------------------------------------------------------------------

def _kill_mid_write(src: Path, out: Path) -> None:
    """Start a dense f32 conversion (SmolLM2: ~540 MB to write), SIGKILL it once its temporary file is growing."""
    proc = subprocess.Popen([sys.executable, "convert.py", str(src), str(out), "--dense", "--outtype", "f32",
                             "--quiet"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        sizes = []
        while time.monotonic() < deadline and proc.poll() is None:
            temps = list(out.parent.glob(f".{out.name}.*.tmp"))
            if temps:
                try:
                    sizes.append(temps[0].stat().st_size)
                except FileNotFoundError:
                    sizes.clear()
                # at least 32 MiB written and still growing: the kill lands mid-write
                if len(sizes) >= 2 and sizes[-1] > sizes[-2] and sizes[-1] > 32 << 20:
                    break
            time.sleep(0.01)
        assert proc.poll() is None, f"the conversion ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert sizes and sizes[-1] > 32 << 20, "the temporary file never grew"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_killed_conversion_leaves_no_output(smollm2_dir, tmp_path):
    out = tmp_path / "smollm2-f32.gguf"
    _kill_mid_write(smollm2_dir, out)
    assert not out.exists()
    # what is left is the hidden temporary file, never a file by the output's name
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(f".{out.name}.")] == []


@pytest.mark.slow
def test_killed_conversion_keeps_the_previous_output(smollm2_dir, tiny_dirs, tmp_path):
    out = tmp_path / "model.gguf"
    proc = run_cli("convert.py", tiny_dirs["llama"], out, "--dense", "--outtype", "f32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    before = out.read_bytes()
    _kill_mid_write(smollm2_dir, out)
    assert out.read_bytes() == before
    assert field(open_gguf(out), "general.architecture") == "llama"  # still the complete previous file


# -- determinism ------------------------------------------------------------------------------------

def _lfuc(src: Path, text: Path, out: Path, heal_tokens: int = 3072, seed: int = 0) -> bytes:
    out.parent.mkdir()
    proc = run_cli("convert.py", src, out, "--fuse", "1", "--split", "2", "--heal-tokens", heal_tokens, "--text", text,
                   "--ctx", "64", "--outtype", "f32", "--seed", seed, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_bytes()


def test_same_input_plan_and_seed_give_the_same_bytes(tiny_dirs, calibration_text, tmp_path):
    """The whole LF-UC job (analysis, planning, upcycling, both healing stages at a token budget, export)
    twice: byte-identical GGUFs. Runs with another healing budget, or another seed, differ (the comparison
    can fail, and the seed reaches every stage)."""
    text = tmp_path / "calibration.txt"
    text.write_text(calibration_text.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    src = tiny_dirs["mistral"]
    a = _lfuc(src, text, tmp_path / "a" / "m.gguf")
    b = _lfuc(src, text, tmp_path / "b" / "m.gguf")
    healing = json.loads(field(open_gguf(tmp_path / "a" / "m.gguf"), Keys.HEALING))
    trained = {s["stage"]: s["tokens"] for s in healing["stages"]}
    assert trained["block-local"] > 0 and trained["end-to-end"] > 0, trained   # healing really ran
    assert a == b, "two runs with the same input, plan and seed wrote different files"
    c = _lfuc(src, text, tmp_path / "c" / "m.gguf", heal_tokens=1536)
    assert c != a
    d = _lfuc(src, text, tmp_path / "d" / "m.gguf", seed=1)
    assert d != a


# -- validate lists every problem ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hybrid(tiny_dirs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hardening") / "tiny.gguf"
    hybrid(tiny_dirs["mistral"], PLAN, path, "f32")
    return path   # blocks: [no-attn moe 2 top-1, attn dense, attn moe 2 top-2, no-attn dense]


def test_validate_reports_every_problem(tiny_hybrid, tmp_path):
    bad = rewrite_gguf(tiny_hybrid, tmp_path / "bad.gguf", drop_tensors=("blk.2.ffn_up_exps.weight",),
                       replace_tensors={"blk.1.ffn_norm.weight": np.ones(64, dtype=np.float16),
                                        "blk.1.ffn_gate.weight": np.zeros((80, 64), dtype=np.float32)},
                       set_kv={Keys.EXPERT_USED_COUNT: ([1, 0, 3, 0], ARRAY, U32),
                               Keys.ATTENTION_PRESENT: ([False, True, True], ARRAY, BOOL)})
    proc = run_cli("-m", "d2m_gguf", "validate", bad)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    expected = [f"{Keys.ATTENTION_PRESENT} has 3 entries, {Keys.BLOCK_COUNT} is 4",
                "layer 2: 3 experts used > 2 experts",
                "tensor blk.2.ffn_up_exps.weight is missing",
                "tensor blk.1.ffn_norm.weight is F16, 1-D tensors must be F32",
                "tensor blk.1.ffn_gate.weight has shape [80, 64], expected [160, 64]"]
    for problem in expected:
        assert f"{bad}: {problem}" in proc.stderr, (problem, proc.stderr)
    assert f"{bad}: {len(expected)} problem(s)" in proc.stderr
    ok = run_cli("-m", "d2m_gguf", "validate", tiny_hybrid)
    assert ok.returncode == 0 and "valid dense2moe GGUF" in ok.stdout, ok.stderr


# -- resource bounds ------------------------------------------------------------------------------

ABSURD = {
    "expert-count-2^30": ({Keys.EXPERT_COUNT: ([1 << 30, 0, 2, 0], ARRAY, U32)},
                          "expert_count[0] = 1073741824 is out of range", "exceeds the maximum of 1024"),
    "n_embd-2^31": ({Keys.EMBEDDING_LENGTH: (1 << 31, U32)},
                    "embedding_length = 2147483648 is out of range", "token_embd.weight' has wrong shape"),
    "context-2^31": ({Keys.CONTEXT_LENGTH: ((1 << 31) - 1, U32)},
                     "context_length = 2147483647 is out of range", "context_length = 2147483647 must be in"),
    "block-count-2^20": ({Keys.BLOCK_COUNT: (1 << 20, U32)},
                         "block_count = 1048576 exceeds the maximum of 512", "block_count = 1048576 must be in"),
    "ffn-length-2^31": ({Keys.FEED_FORWARD_LENGTH: ([160, 1 << 31, 160, 160], ARRAY, U32)},
                        "feed_forward_length[1] = 2147483648 is out of range", "blk.1.ffn_gate.weight' has wrong shape"),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_sizes_are_refused_by_validate(case, tiny_hybrid, tmp_path):
    kv, ours, _ = ABSURD[case]
    bad = rewrite_gguf(tiny_hybrid, tmp_path / "bad.gguf", set_kv=kv)
    proc = run_cli("-m", "d2m_gguf", "validate", bad)
    assert proc.returncode == 2 and ours in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", sorted(ABSURD))
@pytest.mark.parametrize("tool", ["llama-d2m-logits", "llama-completion"])
def test_absurd_sizes_are_refused_by_llama_cpp(case, tool, tiny_hybrid, llama, tmp_path):
    """A clean error, not an allocation attempt: llama-completion sizes its context from
    the file's context_length (it runs with no -c), and its memory is capped well below the absurd sizes."""
    import resource

    kv, _, theirs = ABSURD[case]
    bad = rewrite_gguf(tiny_hybrid, tmp_path / "bad.gguf", set_kv=kv)
    if tool == "llama-d2m-logits":
        tokens = tmp_path / "tokens.bin"
        np.arange(1, 9, dtype="<i4").tofile(tokens)
        args = ["-m", bad, "--tokens", tokens, "--out", tmp_path / "out.bin", "-t", "1"]
    else:
        # -v: without it llama-completion drops some loader errors from its log (seen for block_count)
        args = ["-m", bad, "-p", "hello", "-n", "2", "--temp", "0", "-no-cnv", "-t", "1", "-v"]

    def cap_memory():  # 8 GiB of address space: far below what the absurd sizes would need
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    # llama-completion logs through common_log's worker thread, which an early exit(1) can outrun: the refusal
    # is asserted on every run, its message on at least one of a few (the timeout only guards against a hang)
    stderr = []
    for _ in range(1 if tool == "llama-d2m-logits" else 5):
        proc = subprocess.run([str(llama.tool(tool)), *map(str, args)], capture_output=True, text=True,
                              errors="replace", timeout=300, preexec_fn=cap_memory)
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
        stderr.append(proc.stderr)
        if theirs in proc.stderr:
            break
    assert any(theirs in s for s in stderr), stderr[-1][-3000:]


def test_the_fast_reader_reads_what_gguf_py_reads(tmp_path):
    """open_gguf reads numeric metadata arrays as one view (GGUFFileReader): every field's contents and types, and
    every tensor, equal gguf-py's own reader's, empty arrays included; an array running past the file is refused."""
    path = tmp_path / "arrays.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_array("test.scores", [0.5, -1.25, 3.0])
    w.add_array("test.types", [1, 2, 3, 6])
    w.add_array("test.flags", [True, False, True])
    w.add_array("test.empty", [])
    w.add_array("test.tokens", ["<s>", "▁a", "b"])
    w.add_uint32("test.scalar", 7)
    w.add_tensor("t", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, f in theirs.fields.items():
        assert (ours.fields[key].contents(), ours.fields[key].types) == (f.contents(), f.types), key
    assert ours.fields["test.scores"].contents() == [0.5, -1.25, 3.0]
    assert [(t.name, t.tensor_type, t.data.tolist()) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data.tolist()) for t in theirs.tensors]
    data = bytearray(path.read_bytes())
    at = data.find(b"test.types") + len(b"test.types") + 4 + 4     # the key, its value type, the item type
    data[at:at + 8] = (1 << 40).to_bytes(8, "little")               # 2^40 elements
    path.write_bytes(bytes(data))
    with pytest.raises(D2MError, match="not a readable GGUF"):
        open_gguf(path)
