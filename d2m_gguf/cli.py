"""The `d2m` command line (and `python convert.py`, which is `d2m convert`).

Every user error is one line on stderr and exit status 2; --verbose shows the traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from .errors import D2MError

log = logging.getLogger("d2m")

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    if not verbose:
        for noisy in ("gguf", "transformers", "httpx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def user_errors(fn):
    """Turn D2MError into `error: ...` + exit 2 (traceback only with --verbose)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        verbose = kwargs.get("verbose", False)
        _setup_logging(verbose)
        try:
            return fn(*args, **kwargs)
        except D2MError as e:
            if verbose:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was written", err=True)
            sys.exit(130)

    return wrapper


verbose_option = click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="d2m-gguf")
def main() -> None:
    """d2m: turn a dense Hugging Face LLM into a faster Mixture-of-Experts GGUF for llama.cpp.

    \b
    Pipeline (each stage also runs alone and its artefact can be reused):
      analyze -> plan -> upcycle -> heal -> convert (GGUF) -> quantize -> bench
    """


calibration_options = [
    click.option("--text", "text", type=click.Path(path_type=Path), default=None,
                 help="Calibration text file or HF dataset directory [default: ../shared/data/calibration-mixed.txt]."),
    click.option("--ctx", type=int, default=256, show_default=True, help="Tokens per calibration sequence."),
]


def with_options(options):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _calibration_chunks(hf_dir: Path, text: Path | None, ctx: int, n_chunks: int | None):
    from .data import DEFAULT_CALIBRATION, Tokenizer, read_text, token_chunks

    tok = Tokenizer(hf_dir)
    return token_chunks(tok.encode(read_text(text or DEFAULT_CALIBRATION)), ctx, n_chunks, tok.bos)


def _dense_reference(hf_dir: Path):
    from .checkpoint import Checkpoint
    from .plan import identity_plan
    from .spec import load_dense_spec
    from .upcycle import upcycle

    spec = load_dense_spec(hf_dir)
    ckpt = Checkpoint(hf_dir)
    ckpt.check(spec)
    return spec, ckpt, upcycle(spec, ckpt, identity_plan(spec.n_layer))


plan_options = [
    click.option("--method", type=click.Choice(["lfuc", "prune", "attn-prune", "upcycle"]), default="lfuc",
                 show_default=True, help="LF-UC, or a baseline made by the same machinery."),
    click.option("--fuse", type=int, default=None,
                 help="Fused groups (lfuc) / removed layers or attentions (baselines) / MLPs saved (upcycle)."),
    click.option("--target-speedup", type=float, default=None, help="Smallest plan predicted this much faster."),
    click.option("--max-bytes-per-token", type=float, default=None, help="Smallest plan reading at most this."),
    click.option("--depth", type=int, default=512, show_default=True, help="Context depth the plan targets."),
    click.option("--device", default="host", show_default=True,
                 help="Device profile for predictions (host, phone-i8mm, phone-dotprod, rpi5, ...)."),
    click.option("--split", type=int, default=6, show_default=True, help="Experts cut from each source MLP."),
    click.option("--top-k", type=int, default=None, help="Experts per token [default: split]."),
    click.option("--depth-aware", is_flag=True, help="lfuc: also drop attention alone where that is cheaper."),
]


def _plan_request(method, fuse, target_speedup, max_bytes_per_token, depth, split, top_k, depth_aware):
    from .planner import PlanRequest

    return PlanRequest(method=method, fuse=fuse, target_speedup=target_speedup, max_bytes_per_token=max_bytes_per_token,
                       depth=depth, split=split, top_k=top_k, depth_aware=depth_aware)


heal_options = [
    click.option("--heal-minutes", type=float, default=10.0, show_default=True,
                 help="Healing budget in minutes (block-local then end-to-end distillation)."),
    click.option("--heal-tokens", type=int, default=None, help="Healing budget in tokens (whichever ends first)."),
    click.option("--block-local-fraction", type=float, default=0.6, show_default=True,
                 help="Share of the budget for block-local distillation; the rest is end-to-end."),
    click.option("--no-heal", is_flag=True, help="Skip healing (routers keep their initialisation)."),
]


@main.command("convert")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dense", is_flag=True, help="Write the dense model as a standard llama.cpp GGUF (llama/qwen2/qwen3).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path),
              help="Use this fusion plan (JSON or YAML, docs/plan-format.md) instead of planning automatically.")
@click.option("--scores", type=click.Path(path_type=Path), default=None, help="Reuse scores from `d2m analyze`.")
@with_options(plan_options)
@with_options(heal_options)
@with_options(calibration_options)
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f16", show_default=True,
              help="Tensor type of the GGUF (norms and routers stay f32).")
@click.option("--router-init", type=click.Choice(["random", "host", "fit"]), default=None,
              help="Override the plan's router initialisation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for router initialisation and healing.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Where scores, plan, healing curves and checkpoints go [default: OUT.d2m/].")
@click.option("--pre-tokenizer", default=None, help="llama.cpp BPE pre-tokenizer name, when it is not recognised.")
@click.option("--save-hf", type=click.Path(path_type=Path), default=None,
              help="Also save the upcycled model as an HF-style checkpoint (safetensors + config) here.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
@user_errors
def convert(hf_dir: Path, out: Path, dense: bool, plan_path: Path | None, scores: Path | None, method, fuse,
            target_speedup, max_bytes_per_token, depth, device, split, top_k, depth_aware, heal_minutes, heal_tokens,
            block_local_fraction, no_heal, text, ctx, outtype: str, router_init: str | None, seed: int,
            work_dir: Path | None, pre_tokenizer: str | None, save_hf: Path | None, quiet: bool, verbose: bool) -> None:
    """Convert HF_DIR (a Hugging Face checkpoint) to OUT (a GGUF).

    \b
    By default the whole LF-UC job: analyse the layers on calibration text, plan
    which to fuse (--fuse N, --target-speedup X or --max-bytes-per-token B; default
    --fuse 8), upcycle, heal within the budget, write a dense2moe GGUF.
    --dense         the dense model, as llama.cpp's convert_hf_to_gguf.py writes it
    --plan PLAN     a hand-written (or earlier) fusion plan instead of planning
    """
    from .atomic import check_output_path
    from .ggufout import OutType
    from .spec import load_dense_spec

    if dense and plan_path:
        raise D2MError("--dense and --plan exclude each other")
    spec = load_dense_spec(hf_dir)  # fails early, before any work, on a bad checkpoint
    check_output_path(out)
    if dense:
        from .dense_export import export_dense

        export_dense(hf_dir, out, OutType(outtype), pre_tokenizer=pre_tokenizer, progress=not quiet)
        log.info("wrote %s (dense %s, %s)", out, spec.dense_gguf_arch, outtype)
        return

    from dataclasses import replace

    from .pipeline import ConvertRequest, HealSettings, run

    if plan_path is None and fuse is None and target_speedup is None and max_bytes_per_token is None:
        fuse = 8
    request = _plan_request(method, fuse, target_speedup, max_bytes_per_token, depth, split, top_k, depth_aware)
    if router_init:
        request = replace(request, router_init=router_init)
    heal = HealSettings(minutes=0 if no_heal else heal_minutes, tokens=None if no_heal else heal_tokens,
                        block_local_fraction=block_local_fraction, ctx=ctx)
    summary = run(ConvertRequest(hf_dir=hf_dir, out=out, outtype=OutType(outtype), plan=plan_path, scores=scores,
                                 request=request, device=device, text=text, heal=heal, work_dir=work_dir,
                                 save_hf=save_hf, pre_tokenizer=pre_tokenizer, seed=seed, progress=not quiet,
                                 router_init=router_init))
    log.info("wrote %s (dense2moe, %s): %s", out, outtype, json.dumps(summary["plan"]))


@main.command("inspect")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with a `layers` list).")
@verbose_option
@user_errors
def inspect(gguf_file: Path, as_json: bool, verbose: bool) -> None:
    """Show a GGUF's architecture, per-layer map (attention, dense FFN or experts), tensors and size by type."""
    from .reader import inspect_gguf

    info = inspect_gguf(gguf_file)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['file']}: {info['architecture']} '{info['name']}', {info['tensor_count']} tensors, "
               f"{info['size_bytes'] / 2**20:.1f} MiB")
    if info.get("plan"):
        click.echo(f"method {info['method']} from {info['source_model']}")
    click.echo("size by type: " + ", ".join(f"{k} {v['tensors']} tensors {v['bytes'] / 2**20:.1f} MiB"
                                            for k, v in info["size_by_dtype"].items()))
    layers = info["layers"]
    click.echo(f"{len(layers)} layers, {sum(l['attention'] for l in layers)} with attention (KV cache):")
    for layer in layers:
        ffn = (f"moe {layer['experts']} experts, top-{layer['experts_used']}" if layer["experts"]
               else "dense ffn")
        width = f" (ffn {layer['ffn_length']})" if layer["ffn_length"] else ""
        click.echo(f"  blk.{layer['layer']:<3} {'attn   ' if layer['attention'] else 'no-attn'}  {ffn}{width}")


@main.command("validate")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@verbose_option
@user_errors
def validate(gguf_file: Path, verbose: bool) -> None:
    """Check a dense2moe GGUF against the contract (docs/gguf-format.md); list every problem."""
    from .reader import validate_gguf

    problems = validate_gguf(gguf_file)
    for p in problems:
        click.echo(f"{gguf_file}: {p}", err=True)
    if problems:
        raise D2MError(f"{gguf_file}: {len(problems)} problem(s)")
    click.echo(f"{gguf_file}: valid dense2moe GGUF")


@main.command("analyze")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@with_options(calibration_options)
@click.option("--chunks", type=int, default=32, show_default=True, help="Calibration sequences to run.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("scores.json"), show_default=True,
              help="Per-layer scores (JSON).")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Also draw the scores as a PNG [default: OUTPUT with .png].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
@user_errors
def analyze_cmd(hf_dir: Path, text: Path | None, ctx: int, chunks: int, output: Path, plot: Path | None,
                quiet: bool, verbose: bool) -> None:
    """Score every layer of HF_DIR on calibration text: block, attention and MLP influence, MLP similarity."""
    from .analysis import analyze, plot_scores

    spec, _, model = _dense_reference(hf_dir)
    scores = analyze(model, _calibration_chunks(hf_dir, text, ctx, chunks), progress=not quiet, source=hf_dir.name)
    scores.save(output)
    plot_scores(scores, plot or output.with_suffix(".png"))
    order = sorted(range(1, spec.n_layer - 1), key=lambda i: scores.influence[i])
    click.echo(f"wrote {output} and {plot or output.with_suffix('.png')}; most redundant layers: {order[:8]}")


@main.command("plan")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("--scores", type=click.Path(path_type=Path), default=None,
              help="Scores from `d2m analyze` (computed now if not given).")
@with_options(plan_options)
@with_options(calibration_options)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("plan.json"), show_default=True)
@verbose_option
@user_errors
def plan_cmd(hf_dir: Path, scores: Path | None, method, fuse, target_speedup, max_bytes_per_token, depth, device,
             split, top_k, depth_aware, text, ctx, output: Path, verbose: bool) -> None:
    """Make a fusion plan for HF_DIR that meets a speed target, and print its predicted speedup."""
    from .analysis import LayerScores, analyze
    from .costmodel import get_device
    from .planner import choose_plan
    from .plan import plan_summary
    from .spec import load_dense_spec

    spec = load_dense_spec(hf_dir)
    if scores is not None:
        layer_scores = LayerScores.load(scores)
    else:
        _, _, model = _dense_reference(hf_dir)
        layer_scores = analyze(model, _calibration_chunks(hf_dir, text, ctx, 32), source=hf_dir.name)
    req = _plan_request(method, fuse, target_speedup, max_bytes_per_token, depth, split, top_k, depth_aware)
    dev = get_device(device)
    choice = choose_plan(spec, layer_scores, req, dev)
    choice.plan.save(output)
    click.echo(f"wrote {output}: {method} fuse={choice.fuse} {json.dumps(plan_summary(choice.plan))}")
    click.echo(f"predicted on {dev.name} at depth {depth}: {choice.dense_bytes / 1e6:.1f} -> "
               f"{choice.plan_bytes / 1e6:.1f} MB/token, speedup x{choice.predicted_speedup:.2f}")


@main.group("bench")
def bench() -> None:
    """Benchmarks with the patched llama.cpp (quality with llama-perplexity, speed with llama-bench)."""


@bench.command("lfuc")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("--sizes", default="4,6,8", show_default=True, help="Fused groups / removed layers per variant.")
@click.option("--methods", default="lfuc,prune", show_default=True, help="Methods to compare (plus dense).")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="q8_0", show_default=True)
@with_options(heal_options)
@click.option("--ctx", type=int, default=512, show_default=True, help="llama-perplexity context.")
@click.option("--chunks", type=int, default=None, help="WikiText chunks (default: the whole test set).")
@click.option("--depth", type=int, default=0, show_default=True, help="Context depth of the decode timing.")
@click.option("--scores", type=click.Path(path_type=Path), default=None, help="Reuse scores from `d2m analyze`.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("bench/results"), show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
@user_errors
def bench_lfuc(hf_dir, sizes, methods, outtype, heal_minutes, heal_tokens, block_local_fraction, no_heal, ctx, chunks,
               depth, scores, results, quiet, verbose) -> None:
    """LF-UC against equally healed pruning baselines at each size, and the dense model: ppl and decode speed."""
    from .bench import LfucTableRequest, lfuc_table
    from .ggufout import OutType
    from .pipeline import HealSettings

    heal = HealSettings(minutes=0 if no_heal else heal_minutes, tokens=None if no_heal else heal_tokens,
                        block_local_fraction=block_local_fraction)
    out = lfuc_table(LfucTableRequest(hf_dir=hf_dir, sizes=tuple(int(s) for s in sizes.split(",")),
                                      methods=tuple(methods.split(",")), outtype=OutType(outtype), heal=heal,
                                      ctx=ctx, chunks=chunks, depth=depth, scores=scores, results=results,
                                      progress=not quiet))
    click.echo((out / "lfuc.md").read_text())
    click.echo(f"results in {out}")


def convert_main() -> None:
    """`python convert.py HF_DIR OUT.gguf ...`: the same as `d2m convert`."""
    convert(prog_name="convert.py")
