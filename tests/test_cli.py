"""The command line as a user meets it: help, inspect, and one clear error line for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .conftest import run_cli


def assert_user_error(proc, *fragments: str, out: Path | None = None) -> None:
    """Exit status 2, exactly one line on stderr that names the problem, no traceback, no output file."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if out is not None:
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()), "temporary file left"


def test_help_lists_the_commands():
    proc = run_cli("-m", "d2m_gguf", "--help")
    assert proc.returncode == 0
    for cmd in ("convert", "inspect", "validate"):
        assert cmd in proc.stdout
    proc = run_cli("convert.py", "--help")
    assert proc.returncode == 0 and "--dense" in proc.stdout and "--plan" in proc.stdout and "--outtype" in proc.stdout


def test_missing_directory(tmp_path):
    out = tmp_path / "out.gguf"
    proc = run_cli("convert.py", tmp_path / "nope", out, "--dense")
    assert_user_error(proc, "nope", "no such directory", out=out)


def test_unsupported_architecture(tiny_dirs, tmp_path):
    src = tmp_path / "gpt2"
    shutil.copytree(tiny_dirs["llama"], src)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    proc = run_cli("convert.py", src, out, "--dense")
    assert_user_error(proc, "config.json", "GPT2LMHeadModel", "not supported", out=out)


def test_missing_tensors(tiny_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "broken"
    shutil.copytree(tiny_dirs["qwen2"], src)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    out = tmp_path / "out.gguf"
    proc = run_cli("convert.py", src, out, "--dense")
    assert_user_error(proc, "model.layers.3.mlp.down_proj.weight", "missing", out=out)


def test_verbose_shows_the_traceback(tmp_path):
    proc = run_cli("convert.py", tmp_path / "nope", tmp_path / "o.gguf", "--dense", "--verbose")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_inspect_dense(tiny_dirs, tmp_path):
    out = tmp_path / "dense.gguf"
    proc = run_cli("convert.py", tiny_dirs["qwen3"], out, "--dense", "--outtype", "q8_0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run_cli("-m", "d2m_gguf", "inspect", "--json", out).stdout)
    assert info["architecture"] == "qwen3"
    assert len(info["layers"]) == 6
    assert all(l["attention"] and l["experts"] == 0 and l["experts_used"] == 0 for l in info["layers"])
    assert set(info["size_by_dtype"]) == {"F32", "Q8_0"}
    assert info["tensor_count"] == sum(v["tensors"] for v in info["size_by_dtype"].values())
    text = run_cli("-m", "d2m_gguf", "inspect", out).stdout
    assert "qwen3" in text and "blk.5" in text and "dense ffn" in text


def test_options_come_from_the_settings_dataclasses():
    """Each default is written once, on its dataclass: --help shows it, and an option left out keeps it."""
    from dataclasses import fields

    from click.testing import CliRunner

    from d2m_gguf import cli
    from d2m_gguf.distill import resolve_precision
    from d2m_gguf.heal import HealSettings
    from d2m_gguf.options import option_names
    from d2m_gguf.planner import PlanRequest

    help_text = " ".join(CliRunner().invoke(cli.main, ["convert", "--help"], terminal_width=200).output.split())
    for title in ("What to write:", "Plan (d2m plan):", "Healing:"):
        assert title in help_text
    defaults = {f.name: f.default for cls in (HealSettings, PlanRequest) for f in fields(cls)}
    for name in (*cli.HEAL_FIELDS, *cli.PLAN_FIELDS):
        value = defaults[name]
        if value is not None and not isinstance(value, bool):
            assert f"[default: {value}]" in help_text, name
    assert set(cli.HEAL_FIELDS) <= set(option_names(HealSettings))
    assert set(cli.PLAN_FIELDS) <= set(option_names(PlanRequest))
    # nothing given: the dataclasses' own defaults
    none = {name: None for name in (*cli.HEAL_FIELDS, "ctx")} | {"no_heal": False, "heal_precision": "auto"}
    assert cli.healing_from(none, with_ctx=True) == HealSettings().with_precision(resolve_precision("auto"))
    assert cli.plan_request_from({name: None for name in cli.PLAN_FIELDS}) == PlanRequest()
    # given: they win, and --no-heal turns healing off
    given = {**none, "tokens": 1234, "host_first": False, "ctx": 64}
    settings = cli.healing_from(given, with_ctx=True)
    assert (settings.tokens, settings.host_first, settings.ctx) == (1234, False, 64)
    assert not cli.healing_from({**given, "no_heal": True}).enabled
