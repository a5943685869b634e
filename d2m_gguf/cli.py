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


@main.command("convert")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dense", is_flag=True, help="Write the dense model as a standard llama.cpp GGUF (llama/qwen2/qwen3).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path),
              help="Upcycle with this fusion plan (JSON or YAML, see docs/plan-format.md).")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f16", show_default=True,
              help="Tensor type of the GGUF (norms and routers stay f32).")
@click.option("--router-init", type=click.Choice(["random", "host"]), default=None,
              help="Override the plan's router initialisation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for router initialisation.")
@click.option("--pre-tokenizer", default=None, help="llama.cpp BPE pre-tokenizer name, when it is not recognised.")
@click.option("--save-hf", type=click.Path(path_type=Path), default=None,
              help="Also save the upcycled model as an HF-style checkpoint (safetensors + config) here.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@verbose_option
@user_errors
def convert(hf_dir: Path, out: Path, dense: bool, plan_path: Path | None, outtype: str, router_init: str | None,
            seed: int, pre_tokenizer: str | None, save_hf: Path | None, quiet: bool, verbose: bool) -> None:
    """Convert HF_DIR (a Hugging Face checkpoint) to OUT (a GGUF).

    \b
    --dense         the dense model, as llama.cpp's convert_hf_to_gguf.py writes it
    --plan PLAN     the dense2moe model of a fusion plan
    """
    from .ggufout import OutType
    from .spec import load_dense_spec

    if dense and plan_path:
        raise D2MError("--dense and --plan exclude each other")
    spec = load_dense_spec(hf_dir)  # fails early, before any work, on a bad checkpoint
    if dense:
        from .dense_export import export_dense

        export_dense(hf_dir, out, OutType(outtype), pre_tokenizer=pre_tokenizer, progress=not quiet)
        log.info("wrote %s (dense %s, %s)", out, spec.dense_gguf_arch, outtype)
        return
    if plan_path is None:
        raise D2MError("automatic planning is not available yet: pass --dense or --plan PLAN")

    from .checkpoint import Checkpoint
    from .hybrid_export import export_hybrid
    from .plan import load_plan, plan_summary
    from .upcycle import upcycle

    plan = load_plan(plan_path, spec.n_layer)
    if router_init:
        plan = plan.with_router_init(router_init)
    ckpt = Checkpoint(hf_dir)
    ckpt.check(spec)
    model = upcycle(spec, ckpt, plan, seed=seed)
    if save_hf:
        from .hf_export import save_hf_checkpoint

        save_hf_checkpoint(model, plan, spec, hf_dir, save_hf)
    export_hybrid(model, plan, spec, hf_dir, out, OutType(outtype), pre_tokenizer=pre_tokenizer, progress=not quiet)
    log.info("wrote %s (dense2moe, %s): %s", out, outtype, json.dumps(plan_summary(plan)))


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


def convert_main() -> None:
    """`python convert.py HF_DIR OUT.gguf ...`: the same as `d2m convert`."""
    convert(prog_name="convert.py")
