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
    `synth` samples more healing text (--text) from the dense model itself.
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
    click.option("--split", type=int, default=None,
                 help="Experts cut from each source MLP [default: 1 for lfuc (whole MLPs, top-1), 6 for upcycle]."),
    click.option("--top-k", type=int, default=None, help="Experts per token [default: split]."),
    click.option("--depth-aware", is_flag=True,
                 help="lfuc, prune: the cheapest mix of removed layers and attentions dropped alone that saves "
                      "--fuse layers' bytes at --depth."),
    click.option("--attach", type=click.Choice(["nearest", "before"]), default="nearest", show_default=True,
                 help="lfuc: a removed layer's MLP joins the nearest kept layer on either side, or the one before."),
]


def _plan_request(method, fuse, target_speedup, max_bytes_per_token, depth, split, top_k, depth_aware, attach):
    from .planner import PlanRequest

    return PlanRequest(method=method, fuse=fuse, target_speedup=target_speedup, max_bytes_per_token=max_bytes_per_token,
                       depth=depth, split=split, top_k=top_k, depth_aware=depth_aware, attach=attach)


heal_options = [
    click.option("--heal-tokens", type=int, default=None,
                 help="Healing budget in tokens [default: 640000: 600k of block-local distillation, cheap since only "
                      "the fused blocks run, then 40k end-to-end; for SmolLM2-135M --fuse 8 on 2 cores about 8 "
                      "minutes with native bf16, 22 on AVX2 alone]. It drives the schedule, so the result is "
                      "reproducible."),
    click.option("--heal-minutes", type=float, default=None,
                 help="A time limit on healing (whichever ends first; alone, 0 tokens: a time budget)."),
    click.option("--block-local-fraction", type=float, default=None,
                 help="Share of the budget for block-local distillation; the rest is end-to-end [default: 0.9375]."),
    click.option("--no-heal", is_flag=True, help="Skip healing (routers keep their initialisation)."),
    click.option("--heal-precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
                 help="Matmul precision of healing (weights stay fp32); auto: bf16 where the hardware has it."),
    click.option("--freeze-guests/--train-guests", default=None,
                 help="lfuc: keep the guest experts (removed layers' MLPs) at their pretrained weights while the "
                      "host, attention, norms and routers heal [default: keep them; measured better than training "
                      "them at 4 and 6 fused layers, level at 8]."),
    click.option("--min-expert-share", type=click.FloatRange(0.0, 1.0), default=None,
                 help="After healing, drop the experts a top-1 router picks for fewer than this share of the "
                      "calibration tokens (the most used one stays); a routed block left with one expert is written "
                      "dense, without the router and expert lookup [default: 0.001; 0 keeps every expert]."),
    click.option("--host-first/--route-first", default=None,
                 help="lfuc: block-local distillation heals every routed block with all tokens on its host (routers "
                      "frozen: the pruned model's healing, token for token), then the router fit admits a guest "
                      "only where it lowers the healed block's held-out error; experts no token then reaches are "
                      "dropped, and end-to-end distillation heals the rest. LF-UC then heals no worse than "
                      "pruning (SmolLM2, 6 and 8 fused: level with it, 0.2% better than --route-first, which fits "
                      "the routers first and trains them while the blocks heal) [default: host first]."),
]


def _heal_settings(heal_minutes, heal_tokens, block_local_fraction, no_heal, heal_precision, freeze_guests,
                   min_expert_share, host_first, **kw):
    """HealSettings from the heal options; an option not given keeps the HealSettings default."""
    from .pipeline import HealSettings

    given = {"minutes": 0 if no_heal else heal_minutes, "tokens": 0 if no_heal else heal_tokens,
             "block_local_fraction": block_local_fraction, "freeze_guests": freeze_guests,
             "min_expert_share": min_expert_share, "host_first": host_first, **kw}
    settings = HealSettings(**{k: v for k, v in given.items() if v is not None})
    from .heal import resolve_precision

    return settings.with_precision(resolve_precision(heal_precision))


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
@click.option("--from-checkpoint", "student", type=click.Path(path_type=Path), default=None,
              help="Write this upcycled HF-style checkpoint (from --save-hf or `d2m heal`) instead of planning, "
                   "upcycling and healing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
@user_errors
def convert(hf_dir: Path, out: Path, dense: bool, plan_path: Path | None, scores: Path | None, method, fuse,
            target_speedup, max_bytes_per_token, depth, device, split, top_k, depth_aware, attach, heal_minutes,
            heal_tokens, block_local_fraction, no_heal, heal_precision, freeze_guests, min_expert_share, host_first,
            text, ctx,
            outtype: str, router_init: str | None, seed: int, work_dir: Path | None, pre_tokenizer: str | None,
            save_hf: Path | None, student: Path | None, quiet: bool, verbose: bool) -> None:
    """Convert HF_DIR (a Hugging Face checkpoint) to OUT (a GGUF).

    \b
    By default the whole LF-UC job: analyse the layers on calibration text, plan
    which to fuse (--fuse N, --target-speedup X or --max-bytes-per-token B; default
    --fuse 8), upcycle, heal within the budget, write a dense2moe GGUF.
    --dense         the dense model, as llama.cpp's convert_hf_to_gguf.py writes it
    --plan PLAN     a hand-written (or earlier) fusion plan instead of planning
    --from-checkpoint DIR   an upcycled checkpoint healed elsewhere (`d2m heal`)
    """
    from .atomic import check_output_path
    from .ggufout import OutType
    from .spec import load_dense_spec

    if sum(map(bool, (dense, plan_path, student))) > 1:
        raise D2MError("--dense, --plan and --from-checkpoint exclude each other")
    spec = load_dense_spec(hf_dir)  # fails early, before any work, on a bad checkpoint
    check_output_path(out)
    if dense:
        from .dense_export import export_dense

        export_dense(hf_dir, out, OutType(outtype), pre_tokenizer=pre_tokenizer, progress=not quiet)
        log.info("wrote %s (dense %s, %s)", out, spec.dense_gguf_arch, outtype)
        return

    from dataclasses import replace

    from .pipeline import ConvertRequest, run

    if plan_path is None and fuse is None and target_speedup is None and max_bytes_per_token is None:
        fuse = 8
    request = _plan_request(method, fuse, target_speedup, max_bytes_per_token, depth, split, top_k, depth_aware, attach)
    if router_init:
        request = replace(request, router_init=router_init)
    heal = _heal_settings(heal_minutes, heal_tokens, block_local_fraction, no_heal, heal_precision, freeze_guests,
                          min_expert_share, host_first, ctx=ctx)
    summary = run(ConvertRequest(hf_dir=hf_dir, out=out, outtype=OutType(outtype), plan=plan_path, scores=scores,
                                 request=request, device=device, text=text, heal=heal, work_dir=work_dir,
                                 save_hf=save_hf, pre_tokenizer=pre_tokenizer, seed=seed, progress=not quiet,
                                 router_init=router_init, student=student))
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
    from .pipeline import calibration

    spec, _, model = _dense_reference(hf_dir)
    scores = analyze(model, calibration(hf_dir, text, ctx, chunks), progress=not quiet, source=hf_dir.name)
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
             split, top_k, depth_aware, attach, text, ctx, output: Path, verbose: bool) -> None:
    """Make a fusion plan for HF_DIR that meets a speed target, and print its predicted speedup."""
    from .analysis import LayerScores, analyze
    from .pipeline import calibration
    from .costmodel import get_device
    from .planner import choose_plan
    from .plan import plan_summary
    from .spec import load_dense_spec

    spec = load_dense_spec(hf_dir)
    if scores is not None:
        layer_scores = LayerScores.load(scores)
    else:
        _, _, model = _dense_reference(hf_dir)
        layer_scores = analyze(model, calibration(hf_dir, text, ctx, 32), source=hf_dir.name)
    req = _plan_request(method, fuse, target_speedup, max_bytes_per_token, depth, split, top_k, depth_aware, attach)
    dev = get_device(device)
    choice = choose_plan(spec, layer_scores, req, dev)
    choice.plan.save(output)
    click.echo(f"wrote {output}: {method} fuse={choice.fuse} {json.dumps(plan_summary(choice.plan))}")
    click.echo(f"predicted on {dev.name} at depth {depth}: {choice.dense_bytes / 1e6:.1f} -> "
               f"{choice.plan_bytes / 1e6:.1f} MB/token, speedup x{choice.predicted_speedup:.2f}")


@main.command("heal")
@click.argument("student", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(path_type=Path), required=True,
              help="The dense HF checkpoint the student was upcycled from.")
@click.option("--minutes", type=float, default=10.0, show_default=True, help="Budget in minutes (0: none).")
@click.option("--tokens", type=int, default=None, help="Budget in training tokens (whichever ends first).")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate (cosine decay).")
@click.option("--batch", type=int, default=4, show_default=True, help="Sequences per step (per process).")
@click.option("--kd-weight", type=float, default=1.0, show_default=True, help="Weight of KL(teacher || student).")
@click.option("--lm-weight", type=float, default=0.1, show_default=True, help="Weight of the next-token loss.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Matmul precision (weights stay fp32); auto: bf16 on GPUs and CPUs with native bf16.")
@click.option("--freeze-guests/--train-guests", default=True, show_default=True,
              help="Keep the guest experts (removed layers' MLPs) as they are in STUDENT, as convert does.")
@with_options(calibration_options)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
@user_errors
def heal_cmd(student: Path, out: Path, teacher: Path, minutes: float, tokens: int | None, lr: float, batch: int,
             kd_weight: float, lm_weight: float, precision: str, freeze_guests: bool, text: Path | None, ctx: int, quiet: bool,
             verbose: bool) -> None:
    """End-to-end distillation of STUDENT (an upcycled checkpoint from `convert --save-hf`) into OUT.

    \b
    On CPU for small budgets; for real budgets on GPUs run it under torchrun (DDP):
      torchrun --nproc-per-node 8 -m d2m_gguf heal STUDENT OUT --teacher HF_DIR --tokens 200000000
    It checkpoints to OUT/checkpoint.pt and resumes from it; write the result with
    `convert.py HF_DIR OUT.gguf --from-checkpoint OUT`.
    """
    from .heal import Budget, E2EConfig, resolve_precision
    from .pipeline import HealRequest, heal_checkpoint

    if not minutes and not tokens:
        raise D2MError("give a budget: --minutes and/or --tokens")
    stage = heal_checkpoint(HealRequest(student=student, teacher=teacher, out=out,
                                        budget=Budget(tokens=tokens, minutes=minutes or None), text=text, ctx=ctx,
                                        e2e=E2EConfig(lr=lr, batch=batch, kd_weight=kd_weight, lm_weight=lm_weight,
                                                      precision=resolve_precision(precision)),
                                        freeze_guests=freeze_guests, progress=not quiet))
    if stage is None:
        return  # another rank of a torchrun job; rank 0 reports
    last = stage.rows[-1] if stage.rows else {}
    click.echo(f"healed {stage.tokens} tokens in {stage.seconds / 60:.1f} min (kd {last.get('kd', float('nan')):.4f}); "
               f"wrote {out}")


@main.command("synth")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tokens", type=int, default=300_000, show_default=True, help="Tokens to sample.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens sampled per sample.")
@click.option("--batch", type=int, default=32, show_default=True, help="Samples drawn at once.")
@click.option("--prompt", type=click.Path(path_type=Path), default=None,
              help="Text the samples start from [default: ../shared/data/calibration-mixed.txt].")
@click.option("--prompt-len", type=int, default=8, show_default=True,
              help="Tokens of the prompt text each sample starts from (0: start from BOS alone).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@verbose_option
@user_errors
def synth_cmd(hf_dir: Path, out: Path, tokens: int, seq_len: int, batch: int, prompt: Path | None, prompt_len: int,
              temperature: float, seed: int, quiet: bool, verbose: bool) -> None:
    """Sample healing text from the dense model HF_DIR itself into the text file OUT.

    \b
    Healing teaches only what its text holds. With no large corpus at hand, the teacher's own samples
    (each continuing a short span of the prompt text) give as much text in its distribution as a budget needs:
      d2m synth HF_DIR synth.txt --tokens 600000
      cat ../shared/data/calibration-mixed.txt synth.txt > heal.txt
      python convert.py HF_DIR out.gguf --text heal.txt
    Never prompt from the evaluation text.
    """
    from .synth import sample_text

    rep = sample_text(hf_dir, out, tokens, seq_len=seq_len, batch=batch, prompt=prompt, prompt_len=prompt_len,
                      temperature=temperature, seed=seed, progress=not quiet)
    click.echo(f"wrote {out}: {rep.samples} samples, {rep.tokens} sampled tokens in {rep.seconds / 60:.1f} min "
               f"({rep.tokens_per_second:.0f} tokens/s)")


@main.group("bench")
def bench() -> None:
    """Benchmarks with the patched llama.cpp (quality with llama-perplexity, speed with llama-bench)."""


# shared by the commands that build and compare method variants (bench lfuc, bench curve)
variant_bench_options = [
    click.option("--methods", default="lfuc,prune", show_default=True,
                 help="Methods to compare (plus dense); a -da suffix (lfuc-da, prune-da) plans depth-aware at the "
                      "timed depth."),
    click.option("--outtype", type=click.Choice(OUTTYPES), default="q8_0", show_default=True),
    click.option("--scores", type=click.Path(path_type=Path), default=None, help="Reuse scores from `d2m analyze`."),
    click.option("--results", type=click.Path(path_type=Path), default=Path("bench/results"), show_default=True),
    click.option("--quiet", is_flag=True, help="No progress bars."),
]


@bench.command("lfuc")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("--sizes", default="4,6,8", show_default=True, help="Fused groups / removed layers per variant.")
@with_options(variant_bench_options)
@with_options(heal_options)
@click.option("--ctx", type=int, default=512, show_default=True, help="llama-perplexity context.")
@click.option("--chunks", type=int, default=None, help="WikiText chunks (default: the whole test set).")
@click.option("--depth", type=int, default=0, show_default=True, help="Context depth of the decode timing.")
@verbose_option
@user_errors
def bench_lfuc(hf_dir, sizes, methods, outtype, heal_minutes, heal_tokens, block_local_fraction, no_heal, heal_precision,
               freeze_guests, min_expert_share, host_first, ctx, chunks, depth, scores, results, quiet,
               verbose) -> None:
    """LF-UC against equally healed pruning baselines at each size, and the dense model: ppl and decode speed."""
    from .bench import LfucTableRequest, lfuc_table
    from .ggufout import OutType

    heal = _heal_settings(heal_minutes, heal_tokens, block_local_fraction, no_heal, heal_precision, freeze_guests,
                          min_expert_share, host_first)
    out = lfuc_table(LfucTableRequest(hf_dir=hf_dir, sizes=tuple(int(s) for s in sizes.split(",")),
                                      methods=tuple(methods.split(",")), outtype=OutType(outtype), heal=heal,
                                      ctx=ctx, chunks=chunks, depth=depth, scores=scores, results=results,
                                      progress=not quiet))
    click.echo((out / "lfuc.md").read_text())
    click.echo(f"results in {out}")


@bench.command("curve")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("--fuse", type=int, default=8, show_default=True, help="Fused groups / removed layers.")
@with_options(variant_bench_options)
@click.option("--budgets", default="0,160000,640000,1280000", show_default=True,
              help="Healing-token budgets (each split as --block-local-fraction's default says).")
@click.option("--chunks", type=int, default=40, show_default=True, help="WikiText chunks of 512 tokens.")
@verbose_option
@user_errors
def bench_curve(hf_dir, fuse, methods, budgets, outtype, chunks, scores, results, quiet, verbose) -> None:
    """Perplexity against the healing budget (tokens) for each method: curve.csv, curve.md, curve.png."""
    from .bench import CurveRequest, healing_curve
    from .ggufout import OutType

    try:
        budget_list = tuple(int(b) for b in budgets.split(","))
    except ValueError:
        raise D2MError(f"--budgets {budgets!r}: give comma-separated token counts, e.g. 0,160000,640000") from None
    out = healing_curve(CurveRequest(hf_dir=hf_dir, fuse=fuse, methods=tuple(methods.split(",")), budgets=budget_list,
                                     outtype=OutType(outtype), chunks=chunks, scores=scores, results=results,
                                     progress=not quiet))
    click.echo((out / "curve.md").read_text())
    click.echo(f"results in {out}")


@bench.command("matrix")
@click.argument("hf_dir", type=click.Path(path_type=Path), default=Path("models/smollm2-135m-instruct"))
@click.option("--quick", is_flag=True, help="The QUICK subset (dense + a hand-written LF-UC plan, 3 quant types).")
@click.option("--quants", default=None, help="Comma-separated quant types / recipes (default: all; see quant/).")
@click.option("--chunks", type=int, default=None, help="WikiText-2 test chunks per row [default: 8, QUICK 3].")
@click.option("--heal-tokens", type=int, default=None,
              help="Healing budget of the variants in tokens [default: 320000, 2-4 min each; QUICK 0].")
@click.option("--with-upcycle", is_flag=True, help="Add plain sparse upcycling rows (full matrix).")
@click.option("--results", type=click.Path(path_type=Path), default=Path("bench/results"), show_default=True)
@verbose_option
@user_errors
def bench_matrix(hf_dir, quick, quants, chunks, heal_tokens, with_upcycle, results, verbose) -> None:
    """Variants x quant types: size, active bytes, ppl, KLD, top-1, host tok/s, predicted phone tok/s, arm64 check.

    Writes matrix.csv, matrix.md, pareto.png and the tool logs under RESULTS/<timestamp>/."""
    from .matrix import MatrixVariant, full_request, quick_request
    from .pipeline import HealSettings

    if not (Path(hf_dir) / "config.json").is_file():
        raise D2MError(f"{hf_dir}: not a Hugging Face checkpoint directory (make smollm2)")
    kw: dict = {"results": results}
    if quants:
        kw["quants"] = tuple(q.strip() for q in quants.split(",") if q.strip())
    if chunks:
        kw["chunks"] = chunks
    if heal_tokens is not None:
        kw["heal"] = HealSettings(tokens=heal_tokens)
    req = quick_request(hf_dir, **kw) if quick else full_request(hf_dir, **kw)
    if with_upcycle:
        req.variants = (*req.variants, MatrixVariant("upcycle", 4))
    from .matrix import run_matrix
    out = run_matrix(req)
    click.echo((out / "matrix.md").read_text())
    click.echo(f"results in {out}")


@bench.command("adb")
@click.option("--results", type=click.Path(path_type=Path), default=Path("bench/results"), show_default=True)
@click.option("--matrix-dir", type=click.Path(path_type=Path), default=None,
              help="The matrix to append to [default: the newest under RESULTS].")
@click.option("--quants", default="Q4_0,phone-i8mm,phone-dotprod", show_default=True,
              help="Rows (quant types / recipes) to time on the phone.")
@click.option("--threads", type=int, default=4, show_default=True)
@verbose_option
@user_errors
def bench_adb(results, matrix_dir, quants, threads, verbose) -> None:
    """Time matrix rows on an attached Android phone (llama-bench over adb) and append them to the matrix.

    With no device attached (or no adb) it says so and does nothing else."""
    from .matrix import adb_bench

    adb_bench(results=results, matrix_dir=matrix_dir, quants=tuple(quants.split(",")), threads=threads,
              echo=click.echo)


@main.command("quantize")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--device", default=None, help="Device recipe: host, phone-i8mm, phone-i8mm-g2, phone-dotprod, rpi5 "
              "(quant/<recipe>.json), or a recipe .json path.")
@click.option("--type", "qtype", default=None, help="A plain llama-quantize type instead of a recipe (Q4_0, Q4_K_M...).")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="Calibration text for the importance matrix [default: ../shared/data/calibration-mixed.txt].")
@click.option("--chunks", type=int, default=64, show_default=True, help="Calibration chunks for llama-imatrix.")
@click.option("--ctx", type=int, default=256, show_default=True, help="Tokens per imatrix chunk.")
@click.option("--min-expert-tokens", type=int, default=None,
              help="Experts that saw fewer tokens are filled from the layer's pooled statistics "
                   "[default: max(32, 10% of the layer's mean)].")
@click.option("--imatrix", "imatrix_file", type=click.Path(path_type=Path), default=None,
              help="Reuse an importance matrix (GGUF) instead of computing one.")
@click.option("--no-imatrix", is_flag=True, help="Quantize without an importance matrix.")
@verbose_option
@user_errors
def quantize_cmd(src, out, device, qtype, text, chunks, ctx, min_expert_tokens, imatrix_file, no_imatrix,
                 verbose) -> None:
    """Quantize SRC (an f16/f32 GGUF) to OUT for a device: its recipe, an importance matrix from the patched
    llama-imatrix (tokens per expert reported, rare experts pooled) and the patched llama-quantize."""
    from .quantize import load_recipe, quantize_file

    if bool(device) == bool(qtype):
        raise D2MError("give exactly one of --device NAME or --type QTYPE")
    if device:
        device = str(load_recipe(device).path)   # an unknown device fails here, before any work
    rep = quantize_file(src, out, device or qtype, text=text, ctx=ctx, chunks=chunks,
                        min_expert_tokens=min_expert_tokens, use_imatrix=not no_imatrix, imatrix=imatrix_file)
    for line in rep.lines():
        click.echo(line)


def convert_main() -> None:
    """`python convert.py HF_DIR OUT.gguf ...`: the same as `d2m convert`."""
    convert(prog_name="convert.py")
