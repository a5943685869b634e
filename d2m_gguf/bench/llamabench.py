"""Speed from llama-bench: the one place that runs it here and reads its `-o json` output.

`llama_bench` times files on this machine (both file orders, samples pooled); `bench_args` and
`parse_llama_bench` are also what `matrix.adb_bench` uses for a phone over adb, so every tok/s of every table
is read the same way: the mean and sample std of llama-bench's per-repetition `samples_ts`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import D2MError
from ..llamacpp import LlamaCpp


@dataclass
class SpeedRow:
    model: str
    depth: int
    decode_ts: float
    decode_std: float
    prompt_ts: float | None = None


Samples = dict[tuple[str, int, str], list[float]]   # (model file name, depth, "decode" | "prompt") -> tok/s


def bench_args(models: Sequence[Path | str], n_prompt: int, n_gen: int, repetitions: int, threads: int,
               depths: Sequence[int] | None = (0,), extra: Sequence[str] = ()) -> list[str]:
    """llama-bench's arguments for `models` (in this order), JSON output; `depths=None` leaves out -d; `extra`
    (e.g. `runtime_args`: KV-cache type and flash attention) goes last."""
    args: list = []
    for m in models:
        args += ["-m", m]
    args += ["-p", n_prompt, "-n", n_gen]
    if depths is not None:
        args += ["-d", ",".join(map(str, depths))]
    args += ["-r", repetitions, "-t", threads, "-o", "json", *extra]
    return [str(a) for a in args]


def runtime_args(kv: str = "f16", flash_attn: str = "on") -> list[str]:
    """The runtime settings a matrix row is measured with, the same for llama-bench and llama-perplexity: the
    KV-cache type of keys and values (`-ctk/-ctv`; a quantized V cache needs flash attention) and `-fa`."""
    return ["-ctk", kv, "-ctv", kv, "-fa", flash_attn]


def parse_llama_bench(text: str, into: Samples | None = None) -> Samples:
    """The per-repetition tok/s of each (model, depth, test) in llama-bench's JSON (text before the JSON array,
    e.g. a shell's, is skipped); tests mixing prompt and generation are left out. `into` pools several runs."""
    samples: Samples = {} if into is None else into
    start = text.find("[")
    try:
        records = json.loads(text[start:]) if start >= 0 else None
    except ValueError as e:
        raise D2MError(f"llama-bench printed no valid JSON: {e}") from None
    if not isinstance(records, list):
        raise D2MError("llama-bench printed no JSON array of results")
    for r in records:
        test = "decode" if r["n_gen"] > 0 and r["n_prompt"] == 0 else \
            "prompt" if r["n_prompt"] > 0 and r["n_gen"] == 0 else None
        if test is not None:
            key = (Path(r["model_filename"]).name, int(r.get("n_depth", 0)), test)
            samples.setdefault(key, []).extend(float(t) for t in r["samples_ts"])
    return samples


def speed_rows(samples: Samples) -> list[SpeedRow]:
    """One row per (model, depth): decode mean and sample std, prompt mean (None when not timed)."""
    rows: dict[tuple[str, int], SpeedRow] = {}
    for (model, depth, test), ts in samples.items():
        row = rows.setdefault((model, depth), SpeedRow(model, depth, 0.0, 0.0))
        if test == "decode":
            row.decode_ts, row.decode_std = statistics.fmean(ts), statistics.stdev(ts) if len(ts) > 1 else 0.0
        else:
            row.prompt_ts = statistics.fmean(ts)
    return list(rows.values())


def llama_bench(llama: LlamaCpp, models: list[Path], depths: tuple[int, ...] = (0,), n_gen: int = 64,
                n_prompt: int = 128, repetitions: int = 3, log_dir: Path | None = None,
                extra: Sequence[str] = ()) -> list[SpeedRow]:
    """Decode (and prompt) tokens/s of every model: one llama-bench process in the given order, then one in
    the reverse order, half the repetitions each (rounded up); mean and std over the samples of both.

    Why two orders: on a shared machine the speed drifts over a run and the first file can pay a warm-up
    (measured: an f16 SmolLM2 read 36-43 tok/s decoding first in a process, 49 last), so within one order
    the file order leaks into the ratios; in both orders it falls on every file alike.

    Past depth 0 every file gets its own process: llama-bench (pinned) keeps the KV state of its last depth fill
    and restores it into the next model's context; with a sliding-window cache (Gemma 3) that restore half
    succeeds and the next test fails ("failed to decode prompt batch, res = 1"), and elsewhere the next model
    would be timed on another model's cache."""
    orders = [models, models[::-1]] if len(models) > 1 else [models]
    per_order = max(1, math.ceil(repetitions / len(orders)))
    samples: Samples = {}
    for i, order in enumerate(orders):
        records, errs = [], []
        for run in ([[m] for m in order] if any(depths or ()) else [order]):
            proc = llama.run("llama-bench", bench_args(run, n_prompt, n_gen, per_order, llama.threads, depths, extra))
            parse_llama_bench(proc.stdout, into=samples)
            records += json.loads(proc.stdout[proc.stdout.find("["):])
            errs.append(proc.stderr)
        if log_dir is not None:
            name = "llama-bench" + ("-reversed" if i else "")
            (log_dir / f"{name}.json").write_text(json.dumps(records, indent=2))
            (log_dir / f"{name}.log").write_text("\n".join(errs))
    return speed_rows(samples)


__all__ = ["SpeedRow", "Samples", "bench_args", "runtime_args", "parse_llama_bench", "speed_rows", "llama_bench"]
