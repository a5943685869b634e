"""`d2m bench scale` (`make bench-scale`): wall time and peak memory of each stage on models of real sizes.

For each size a synthetic checkpoint with the shapes of a real model (SHAPES) is written to a temporary folder:
random bf16 weights, sharded like Hugging Face's (model-0000i-of-0000n.safetensors + index), generated tensor by
tensor so that the generator itself never holds more than a shard, with a real config (transformers' LlamaConfig /
Qwen2Config) and SmolLM2's byte-level BPE tokenizer (both converters pad the vocabulary with [PAD<i>] tokens up to
the config's vocab_size). Each stage then runs as a process of its own, whose wall time and peak RSS (the child's
ru_maxrss from wait4, `measure`) are recorded:

    upstream-dense     llama.cpp's convert_hf_to_gguf.py, --outtype f16 (the reference)
    d2m-dense          d2m convert --dense --outtype f16
    analyze            d2m analyze --chunks C --ctx T (its scores feed the next two)
    plan-write         d2m convert --scores S --fuse F --no-heal: plan application + write
    heal-block-local   d2m convert --scores S --fuse F --heal-tokens N --block-local-fraction 1 --ctx T

Issue 33's target: plan-write within 1.2x of upstream-dense's time and peak RSS at every size. A stage's output
is deleted once measured and the whole folder after each size (only the logs stay). heal-block-local may refuse
(exit status 2, one line: the memory it needs does not fit); that is recorded as `refused`, not as a failure. Any
other failure is recorded with its stderr tail and the bench goes on. Nothing here asserts a timing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import D2MError
from ..llamacpp import REPO
from ..options import setting
from ..spec import DenseSpec, dense_spec
from .pareto import num
from .provenance import memory, provenance
from .tables import markdown_table, publish, write_table
from .variants import results_setting

log = logging.getLogger("d2m")


@dataclass(frozen=True)
class Shape:
    """The dimensions of a real model (its weights here are random). `qwen2` has q/k/v biases (spec.py)."""

    like: str              # the model whose shapes these are
    family: str            # llama | qwen2
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_pos: int = 4096

    def config(self):
        """The transformers config of this shape (bos/eos of the borrowed SmolLM2 tokenizer; plain RoPE)."""
        from transformers import LlamaConfig, Qwen2Config

        kind = {"llama": (LlamaConfig, "LlamaForCausalLM"), "qwen2": (Qwen2Config, "Qwen2ForCausalLM")}
        if self.family not in kind:
            raise D2MError(f"shape of {self.like}: family {self.family!r} is not one of {', '.join(kind)}")
        cls, arch = kind[self.family]
        return cls(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
                   num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                   max_position_embeddings=self.max_pos, rms_norm_eps=self.rms_eps, rope_theta=self.rope_theta,
                   tie_word_embeddings=self.tied, bos_token_id=1, eos_token_id=2, architectures=[arch],
                   dtype="bfloat16")

    def spec(self) -> DenseSpec:
        return dense_spec(self.config().to_dict(), f"shape of {self.like}")

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.spec().hf_tensor_shapes().values())


# The config.json numbers of the models named (hidden, layers, ffn, heads/kv heads, vocab, tied embeddings, RoPE
# base, RMSNorm eps, context). The Llama 3.x models' rope_scaling (type llama3) is left out: d2m refuses it
# (spec.py), and it changes no tensor the conversion writes but a small rope_freqs.
SHAPES: dict[str, Shape] = {
    "qwen2.5-0.5b": Shape("Qwen/Qwen2.5-0.5B", "qwen2", 896, 24, 4864, 14, 2, 151936, True, 1e6, 1e-6, 32768),
    "qwen2.5-1.5b": Shape("Qwen/Qwen2.5-1.5B", "qwen2", 1536, 28, 8960, 12, 2, 151936, True, 1e6, 1e-6, 131072),
    "llama3.2-3b": Shape("meta-llama/Llama-3.2-3B", "llama", 3072, 28, 8192, 24, 8, 128256, True, 5e5, 1e-5, 131072),
    "llama3.1-8b": Shape("meta-llama/Llama-3.1-8B", "llama", 4096, 32, 14336, 32, 8, 128256, False, 5e5, 1e-5,
                         131072),
}

STAGES = ("upstream-dense", "d2m-dense", "analyze", "plan-write", "heal-block-local")
REFUSABLE = ("heal-block-local",)     # exit status 2 there: "the memory it needs does not fit", a refusal
NEEDS_SCORES = ("plan-write", "heal-block-local")
TARGET = 1.2                          # plan-write within 1.2x upstream-dense's time and peak RSS (issue 33)
SHARD_BYTES = 4 * 10**9               # at most this much per safetensors shard, as HF shards
OUTTYPE = "f16"


@dataclass
class ScaleRequest:
    sizes: tuple[str, ...] | None = setting(None, "Model shapes to generate and measure (SHAPES in "
                                            "d2m_gguf/bench/scale.py).", default_text=",".join(SHAPES))
    chunks: int = setting(4, "Calibration sequences of the analyze stage.", bounds=(1, None))
    ctx: int = setting(128, "Tokens per calibration and healing sequence (analyze, heal-block-local).",
                       bounds=(2, None))
    heal_tokens: int = setting(2048, "Healing tokens of the heal-block-local stage (all block-local).",
                               bounds=(1, None))
    fuse: int = setting(8, "Fused groups of the plan-write and heal-block-local stages.", bounds=(1, None))
    tokenizer: Path | None = setting(None, "Checkpoint whose tokenizer the synthetic models borrow.",
                                     default_text="$D2M_SMOLLM2, else models/smollm2-135m-instruct")
    llama_src: Path | None = setting(None, "llama.cpp source with convert_hf_to_gguf.py (make llama-src).",
                                     default_text="$D2M_LLAMA_SRC, else build/llama.cpp-src")
    tmp: Path | None = setting(None, "Where a size's checkpoint and outputs are written (deleted after it).",
                               default_text="the results folder of the run")
    results: Path = results_setting()
    publish: Path | None = setting(None, "Also copy scale.md/.csv/.png and settings.json here.")
    seed: int = 0
    shapes: dict[str, Shape] = field(default_factory=lambda: dict(SHAPES))   # tests measure tiny ones
    progress: bool = True


# ---- measuring one process ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_mb: float     # the process's own ru_maxrss, in 10^6 bytes
    returncode: int        # negative: killed by that signal


# A process's ru_maxrss counts the image it was forked from (Linux keeps the pre-exec high-water mark), so a stage
# started straight from this process would report at least our own size (torch and all). It is started from this
# small launcher instead (Python without site, ~10 MB): the launcher spawns the stage, waits for it with wait4
# and reports its exit status, peak RSS (KiB) and wall time through a file.
_LAUNCHER = """
import os, sys, time
t0 = time.monotonic()
try:
    pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
except OSError as e:
    open(sys.argv[1], "w").write("error " + str(e))
    sys.exit(127)
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write("%d %d %.6f" % (os.waitstatus_to_exitcode(status), usage.ru_maxrss, time.monotonic() - t0))
"""


def measure(cmd: list[str], stdout: Path, stderr: Path) -> Measured:
    """Run `cmd` as a process of its own (output to the two files): its wall time and its own peak RSS (wait4).
    OSError when it cannot be started."""
    report = stdout.with_name(stdout.name + ".rusage")
    report.unlink(missing_ok=True)
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        # a session of its own, so that an interruption here takes the stage down with its launcher
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *map(str, cmd)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    try:
        fields = report.read_text().split(maxsplit=1)
        report.unlink()
    except OSError:
        fields = ["error", f"the launcher exited {proc.returncode} without a report"]
    if fields[0] == "error":
        raise OSError(fields[1])
    code, kib, seconds = fields[0], *fields[1].split()
    return Measured(float(seconds), int(kib) * 1024 / 1e6, int(code))


# ---- the synthetic checkpoint ------------------------------------------------------------------------------

def _hf_order(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Tensor names as HF stores them: embeddings, the layers in order, the final norm, the head."""
    tail = [n for n in ("model.norm.weight", "lm_head.weight") if n in shapes]
    return [n for n in shapes if n not in tail] + tail


def _shards(names: list[str], shapes: dict[str, tuple[int, ...]], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = 2 * math.prod(shapes[n])
        if shards[-1] and size + b > limit:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    return shards


def write_checkpoint(shape: Shape, out_dir: Path, tokenizer_dir: Path, seed: int = 0,
                     shard_bytes: int = SHARD_BYTES, progress: bool = False) -> int:
    """A random bf16 checkpoint of `shape` in `out_dir` (config, tokenizer, shards); its weight bytes. Weights
    ~ N(0, 0.02), norms ~ 1 + N(0, 0.02), biases ~ N(0, 0.02); one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..fixtures.tiny import borrow_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    shape.config().save_pretrained(str(out_dir))
    borrow_tokenizer(tokenizer_dir, out_dir)
    shapes = shape.spec().hf_tensor_shapes()
    names = _hf_order(shapes)
    shards = _shards(names, shapes, shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    bar = tqdm(total=len(names), desc=f"writing {shape.like} (random)", unit="tensor", disable=not progress,
               leave=False)
    for shard, fname in zip(shards, files):
        tensors = {}
        for n in shard:
            t = torch.randn(shapes[n], generator=gen, dtype=torch.bfloat16).mul_(0.02)
            if n.endswith("norm.weight"):
                t.add_(1.0)
            tensors[n] = t
            weight_map[n] = fname
            total += t.numel() * t.element_size()
            bar.update()
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        del tensors
    bar.close()
    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return total


# ---- the stages --------------------------------------------------------------------------------------------

def stage_command(stage: str, hf: Path, out: Path, scores: Path, req: ScaleRequest, converter: Path) -> list[str]:
    """The command line a stage runs (`python -m d2m_gguf` is `d2m`)."""
    d2m = [sys.executable, "-m", "d2m_gguf"]
    convert = [*d2m, "convert", str(hf), str(out), "--outtype", OUTTYPE, "--quiet"]
    fused = ["--scores", str(scores), "--fuse", str(req.fuse)]
    return {
        "upstream-dense": [sys.executable, str(converter), str(hf), "--outfile", str(out), "--outtype", OUTTYPE],
        "d2m-dense": [*convert, "--dense"],
        "analyze": [*d2m, "analyze", str(hf), "--chunks", str(req.chunks), "--ctx", str(req.ctx), "-o",
                    str(scores), "--quiet"],
        "plan-write": [*convert, *fused, "--no-heal"],
        "heal-block-local": [*convert, *fused, "--heal-tokens", str(req.heal_tokens), "--block-local-fraction", "1",
                             "--ctx", str(req.ctx)],
    }[stage]


def _one_line(text: str) -> str:
    return text.replace("|", "/").replace("\n", " / ").strip()


def _tail(path: Path, lines: int) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()][-lines:]


def run_stage(stage: str, cmd: list[str], output: Path, logs: Path) -> dict:
    """One stage measured: seconds, peak_rss_mb, status (ok | refused | failed), note (the refusal's line, the
    failure's stderr tail, or the output's size)."""
    err = logs / f"{stage}.stderr"
    try:
        m = measure(cmd, logs / f"{stage}.stdout", err)
    except OSError as e:
        return {"seconds": "", "peak_rss_mb": "", "status": "failed", "note": _one_line(f"cannot start: {e}")}
    row = {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak_rss_mb, 1)}
    if m.returncode == 0 and output.exists():
        mb = output.stat().st_size / 1e6
        return {**row, "status": "ok", "note": f"output {mb:.0f} MB" if mb >= 1 else ""}
    if m.returncode == 2 and stage in REFUSABLE:
        return {**row, "status": "refused", "note": _one_line((_tail(err, 1) or ["exit 2"])[0])}
    why = (f"killed by signal {-m.returncode}" + (" (out of memory?)" if m.returncode == -9 else "")
           if m.returncode < 0 else f"exit {m.returncode}")
    if m.returncode == 0:
        why = f"exit 0 but no {output.name}"
    return {**row, "status": "failed", "note": _one_line("; ".join([why, *_tail(err, 5)]))}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def measure_size(name: str, shape: Shape, req: ScaleRequest, converter: Path, tokenizer: Path, work: Path,
                 logs: Path) -> list[dict]:
    """Generate one size's checkpoint in `work`, run every stage on it, delete what they wrote; its rows."""
    logs.mkdir(parents=True, exist_ok=True)
    hf, scores = work / "hf", work / "scores.json"
    t0 = time.monotonic()
    nbytes = write_checkpoint(shape, hf, tokenizer, req.seed, progress=req.progress)
    log.info("%s: wrote a random %.2f GB bf16 checkpoint in %.0f s", name, nbytes / 1e9, time.monotonic() - t0)
    base = {"size": name, "params": shape.params}
    rows = []
    for stage in STAGES:
        out = scores if stage == "analyze" else work / f"{stage}.gguf"
        if stage in NEEDS_SCORES and not scores.is_file():
            rows.append({**base, "stage": stage, "seconds": "", "peak_rss_mb": "", "status": "skipped",
                         "note": "no scores: the analyze stage did not succeed"})
            log.info("%s %s: skipped (no scores)", name, stage)
            continue
        r = run_stage(stage, stage_command(stage, hf, out, scores, req, converter), out, logs)
        rows.append({**base, "stage": stage, **r})
        log.info("%s %s: %s, %s s, peak RSS %s MB%s", name, stage, r["status"], r["seconds"], r["peak_rss_mb"],
                 f" ({r['note']})" if r["note"] and r["status"] != "ok" else "")
        if stage != "analyze":
            for p in (out, out.with_suffix(".d2m")):
                _remove(p)
    return rows


# ---- tables and picture ------------------------------------------------------------------------------------

def _ok(rows: list[dict], size: str, stage: str) -> dict | None:
    return next((r for r in rows if r["size"] == size and r["stage"] == stage and r["status"] == "ok"), None)


def verdicts(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The wide summary (per size: each stage's seconds and MB, plan-write / upstream-dense ratios) and one
    sentence per size on the target."""
    summary, lines = [], []
    for size in dict.fromkeys(r["size"] for r in rows):
        mine = [r for r in rows if r["size"] == size]
        s = {"size": size, "params (M)": round(mine[0]["params"] / 1e6, 1)}
        for r in mine:
            ok = r["status"] == "ok"
            s[f"{r['stage']} s"] = r["seconds"] if ok else r["status"]
            s[f"{r['stage']} MB"] = r["peak_rss_mb"] if ok else r["status"]
        plan, ref = _ok(rows, size, "plan-write"), _ok(rows, size, "upstream-dense")
        if plan and ref:
            t, m = plan["seconds"] / ref["seconds"], plan["peak_rss_mb"] / ref["peak_rss_mb"]
            meets = t <= TARGET and m <= TARGET
            s.update({"time ratio": round(t, 2), "RSS ratio": round(m, 2),
                      f"within {TARGET}x": "yes" if meets else "NO"})
            lines.append(f"{size}: plan-write {plan['seconds']} s, {plan['peak_rss_mb']} MB = {t:.2f}x time, "
                         f"{m:.2f}x peak RSS of upstream-dense: {'meets' if meets else 'MISSES'} the {TARGET}x target")
        else:
            s.update({"time ratio": "", "RSS ratio": "", f"within {TARGET}x": "not measured"})
            lines.append(f"{size}: not measured (plan-write or upstream-dense did not succeed)")
        summary.append(s)
    return summary, lines


def plot_scale(rows: list[dict], path: Path) -> None:
    """Seconds and peak RSS against parameters, log-log, one line per stage (its successful sizes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    sizes = sorted({r["params"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "seconds", "wall time (s)"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        for stage in STAGES:
            pts = sorted((r["params"], num(r[key])) for r in rows if r["stage"] == stage and r["status"] == "ok"
                         and num(r[key]))
            if pts:
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=stage)
                for r in rows:   # a refused or failed size: an x at the stage's last measured value
                    if r["stage"] == stage and r["status"] != "ok" and r["params"] > pts[-1][0]:
                        ax.plot([r["params"]], [pts[-1][1]], marker="x", ms=9, color=line.get_color())
                        ax.annotate(r["status"], (r["params"], pts[-1][1]), textcoords="offset points",
                                    xytext=(-44, -4), fontsize=7, color=line.get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [f"{n / 1e9:.2g}B" for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("parameters (an x: refused or failed at that size)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("conversion stages against model size (random weights, this machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the bench ---------------------------------------------------------------------------------------------

def _paths(req: ScaleRequest) -> tuple[Path, Path]:
    tokenizer = Path(req.tokenizer or os.environ.get("D2M_SMOLLM2", REPO / "models" / "smollm2-135m-instruct"))
    src = Path(req.llama_src or os.environ.get("D2M_LLAMA_SRC", REPO / "build" / "llama.cpp-src"))
    if not (tokenizer / "tokenizer.json").is_file():
        raise D2MError(f"{tokenizer}: no tokenizer.json to borrow (make smollm2, or give --tokenizer)")
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise D2MError(f"{src}: no convert_hf_to_gguf.py (make llama-src, or give --llama-src)")
    return tokenizer, src / "convert_hf_to_gguf.py"


def run_scale(req: ScaleRequest) -> Path:
    """scale.csv, scale.md, scale.png and settings.json under RESULTS/scale-<stamp>/ (logs/<size>/ beside them)."""
    from ..atomic import check_output_path

    prov = {**provenance(), "memory": memory()}
    t0 = time.monotonic()
    sizes = tuple(req.sizes or req.shapes)
    unknown = [s for s in sizes if s not in req.shapes]
    if unknown:
        raise D2MError(f"unknown size {unknown[0]!r} (known: {', '.join(req.shapes)})")
    tokenizer, converter = _paths(req)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(req.results) / f"scale-{stamp}"
    n = 1
    while out_dir.exists():
        out_dir = Path(req.results) / f"scale-{stamp}-{n}"
        n += 1
    out_dir.mkdir(parents=True)
    tmp_root = Path(req.tmp) if req.tmp else out_dir
    # room for the largest checkpoint, a dense f16 GGUF of it and healing's files: checked before any work
    need = max(int(2.2 * 2 * req.shapes[s].params) + 2**30 for s in sizes)
    try:
        check_output_path(tmp_root / "scale.probe", need_bytes=need)
    except D2MError:
        out_dir.rmdir()
        raise
    rows: list[dict] = []
    for name in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_root))
        try:
            rows += measure_size(name, req.shapes[name], req, converter, tokenizer, work, out_dir / "logs" / name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    summary, lines = verdicts(rows)
    title = (f"Stage wall time and peak RSS on random bf16 checkpoints of real shapes (--outtype {OUTTYPE}; analyze "
             f"{req.chunks} x {req.ctx} tokens; fuse {req.fuse}; heal {req.heal_tokens} tokens block-local)")
    before = ["### Target: plan-write within 1.2x of upstream-dense's time and peak RSS", "",
              *[f"- {line}" for line in lines], "",
              *markdown_table(summary, "Per size: seconds and peak RSS (MB) of each stage")]
    write_table(rows, out_dir / "scale", title=title, provenance=prov, before=before)
    plot_scale(rows, out_dir / "scale.png")
    settings = {"provenance": prov}
    settings.update((k, str(v) if isinstance(v, Path) else v) for k, v in vars(req).items() if k != "shapes")
    settings.update(sizes=list(sizes), tokenizer=str(tokenizer), llama_src=str(converter.parent))
    settings["shapes"] = {s: asdict(req.shapes[s]) for s in sizes}
    settings["target"] = lines
    settings["wall_s"] = round(time.monotonic() - t0, 1)
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=1, default=str) + "\n")
    if req.publish is not None:
        publish(out_dir, Path(req.publish), ("scale.md", "scale.csv", "settings.json"), "scale.png")
    for line in lines:
        log.info("%s", line)
    return out_dir


__all__ = ["Shape", "SHAPES", "STAGES", "ScaleRequest", "Measured", "measure", "write_checkpoint", "stage_command",
           "run_stage", "verdicts", "plot_scale", "run_scale"]
