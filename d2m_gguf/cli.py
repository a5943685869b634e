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

from .analysis import ANALYSIS_SEQUENCES
from .bench.at_scale import AtScaleRequest
from .bench.lfuc import CurveRequest, LfucTableRequest
from .bench.matrix import MATRIX_HEAL_TOKENS, MatrixRequest
from .bench.scale import ScaleRequest
from .distill import PRECISIONS, E2EConfig, resolve_precision
from .errors import D2MError
from .heal import HealSettings
from .options import from_options, options
from .pipeline import ConvertRequest, DistillRequest
from .planner import PlanRequest

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
    convert runs the job: analyse -> plan -> upcycle -> heal -> write the GGUF.
    analyze and plan run their stages alone (reuse them with convert --scores / --plan),
    distill continues healing a saved checkpoint end to end (torchrun on GPUs),
    synth samples more healing text (--text) from the dense model itself,
    quantize and bench take the GGUF on; inspect and validate read one.
    """


class GroupedCommand(click.Command):
    """A command whose --help lists its options in titled groups (`groups`: title -> option names), so each
    group fits a screen."""

    def __init__(self, *args, groups: dict[str, tuple[str, ...]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups = groups or {}

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx) if isinstance(p, click.Option)}
        placed: set[str] = set()
        for title, names in self.groups.items():
            rows = [records[n] for n in names if records.get(n)]
            placed.update(names)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        rest = [r for n, r in records.items() if r and n not in placed]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)


text_option = click.option("--text", type=click.Path(path_type=Path), default=None,
                           help="Calibration text file or HF dataset directory [default: the calibration text "
                                "shipped in d2m_gguf/data/].")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")

PLAN_FIELDS = ("method", "fuse", "target_speedup", "max_bytes_per_token", "depth", "split", "top_k", "depth_aware",
               "attach")
HEAL_FIELDS = ("tokens", "minutes", "block_local_fraction", "freeze_guests", "min_expert_share", "host_first")


def plan_options(fn):
    return options(PlanRequest, PLAN_FIELDS)(options(ConvertRequest, ("device",))(fn))


def heal_options(fn):
    """The healing settings (HealSettings), plus --no-heal and the training precision."""
    fn = click.option("--heal-precision", type=click.Choice(PRECISIONS), default="auto",
                      show_default=True, help="Matmul precision of healing (weights stay fp32); auto: bf16 where "
                                              "the hardware multiplies it natively.")(fn)
    fn = click.option("--no-heal", is_flag=True, help="Skip healing (routers keep their initialisation).")(fn)
    return options(HealSettings, HEAL_FIELDS)(fn)


def healing_from(values: dict, with_ctx: bool = False):
    """HealSettings from the heal options (an option left out keeps the HealSettings default), and from --ctx
    where that option is the calibration sequence length."""
    settings = from_options(HealSettings, {k: values[k] for k in HEAL_FIELDS + (("ctx",) if with_ctx else ())})
    if values["no_heal"]:
        settings = settings.disabled()
    return settings.with_precision(resolve_precision(values["heal_precision"]))


def plan_request_from(values: dict) -> PlanRequest:
    return from_options(PlanRequest, {k: values[k] for k in PLAN_FIELDS})


def _dense_reference(hf_dir: Path):
    """The dense model's spec, checkpoint and weights (read from the checkpoint a layer at a time)."""
    from .checkpoint import Checkpoint
    from .plan import identity_plan
    from .spec import load_dense_spec
    from .upcycle import plan_weights

    spec = load_dense_spec(hf_dir)
    ckpt = Checkpoint(hf_dir)
    ckpt.check(spec)
    return spec, ckpt, plan_weights(spec, ckpt, identity_plan(spec.n_layer))


def router_init_option(fn):
    return options(ConvertRequest, ("router_init",))(fn)


def _calibration_ctx(fn):
    return options(HealSettings, ("ctx",))(fn)


CONVERT_GROUPS = {
    "What to write": ("dense", "plan_path", "from_checkpoint", "scores", "outtype", "gguf_arch", "save_hf",
                      "work_dir"),
    "Plan (d2m plan)": (*PLAN_FIELDS, "device", "router_init"),
    "Healing": (*HEAL_FIELDS, "no_heal", "heal_precision", "text", "ctx", "seed"),
}


@main.command("convert", cls=GroupedCommand, groups=CONVERT_GROUPS)
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dense", is_flag=True, help="Write the dense model as a standard llama.cpp GGUF (llama/qwen2/qwen3).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path),
              help="Use this fusion plan (JSON or YAML, docs/plan-format.md) instead of planning automatically.")
@click.option("--from-checkpoint", "from_checkpoint", type=click.Path(path_type=Path), default=None,
              help="Write this upcycled HF-style checkpoint (from --save-hf or `d2m distill`) instead of planning, "
                   "upcycling and healing.")
@click.option("--scores", type=click.Path(path_type=Path), default=None, help="Reuse scores from `d2m analyze`.")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f16", show_default=True,
              help="Tensor type of the GGUF (norms and routers stay f32).")
@options(ConvertRequest, ("gguf_arch",))
@click.option("--save-hf", type=click.Path(path_type=Path), default=None,
              help="Also save the upcycled model as a Hugging Face checkpoint here: the source's transformers "
                   "class where it computes the model (no remote code), else Dense2MoEForCausalLM with its code beside "
                   "the weights (trust_remote_code=True).")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Where scores, plan, healing curves and summary go [default: OUT.d2m/].")
@plan_options
@router_init_option
@heal_options
@text_option
@_calibration_ctx
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for router initialisation and healing.")
@click.option("--pre-tokenizer", default=None, help="llama.cpp BPE pre-tokenizer name, when it is not recognised.")
@quiet_option
@verbose_option
@user_errors
def convert(hf_dir: Path, out: Path, dense: bool, plan_path: Path | None, from_checkpoint: Path | None,
            scores: Path | None, outtype: str, save_hf: Path | None, work_dir: Path | None, text: Path | None,
            seed: int, pre_tokenizer: str | None, quiet: bool, verbose: bool, **settings) -> None:
    """Convert HF_DIR (a Hugging Face checkpoint) to OUT (a GGUF).

    \b
    By default the whole LF-UC job: analyse the layers on calibration text, plan
    which to fuse (--fuse N, --target-speedup X or --max-bytes-per-token B; default
    --fuse 8), upcycle, heal within the budget, write the GGUF: in the source's
    own architecture (or llama.cpp's deci) wherever that is exact, so stock
    llama.cpp runs it; as dense2moe, for the patched llama.cpp, where a block
    routes between experts (--gguf-arch).
    --dense         the dense model, as llama.cpp's convert_hf_to_gguf.py writes it
    --plan PLAN     a hand-written (or earlier) fusion plan instead of planning
    --from-checkpoint DIR   an upcycled checkpoint distilled elsewhere (`d2m distill`)
    """
    from .atomic import check_output_path
    from .ggufout import OutType
    from .spec import load_dense_spec

    if sum(map(bool, (dense, plan_path, from_checkpoint))) > 1:
        raise D2MError("--dense, --plan and --from-checkpoint exclude each other")
    spec = load_dense_spec(hf_dir)  # fails early, before any work, on a bad checkpoint
    check_output_path(out)
    if dense:
        from .dense_export import export_dense

        export_dense(hf_dir, out, OutType(outtype), pre_tokenizer=pre_tokenizer, progress=not quiet)
        log.info("wrote %s (dense %s, %s)", out, spec.dense_gguf_arch, outtype)
        return

    from .pipeline import run

    request = plan_request_from(settings)
    if plan_path is None:
        request = request.with_default_target()
    job = ConvertRequest(hf_dir=hf_dir, out=out, outtype=OutType(outtype), plan=plan_path, scores=scores,
                         request=request, text=text, healing=healing_from(settings, with_ctx=True), work_dir=work_dir,
                         save_hf=save_hf, pre_tokenizer=pre_tokenizer, seed=seed, progress=not quiet,
                         student=from_checkpoint)
    summary = run(from_options(ConvertRequest, settings, base=job))   # --device, --router-init, --gguf-arch
    gguf = summary["gguf"]
    log.info("wrote %s (%s, %s; runs on %s): %s", out, gguf["architecture"], outtype, gguf["runtime"],
             json.dumps(summary["plan"]))


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
    click.echo(f"runs on {info['runtime']}")
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
    """Check a GGUF d2m wrote: a dense2moe one against the contract (docs/gguf-format.md), a llama, qwen2, qwen3
    or deci one against its architecture's layout; list every problem and say which llama.cpp runs it."""
    from .constants import runtime_of
    from .reader import field, open_gguf, validate_gguf

    problems = validate_gguf(gguf_file)
    for p in problems:
        click.echo(f"{gguf_file}: {p}", err=True)
    if problems:
        raise D2MError(f"{gguf_file}: {len(problems)} problem(s)")
    arch = field(open_gguf(gguf_file), "general.architecture")
    click.echo(f"{gguf_file}: valid {arch} GGUF; runs on {runtime_of(arch)}")


@main.command("analyze")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@text_option
@_calibration_ctx
@click.option("--chunks", type=int, default=ANALYSIS_SEQUENCES, show_default=True,
              help="Calibration sequences to run.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("scores.json"), show_default=True,
              help="Per-layer scores (JSON).")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Also draw the scores as a PNG [default: OUTPUT with .png].")
@quiet_option
@verbose_option
@user_errors
def analyze_cmd(hf_dir: Path, text: Path | None, ctx: int | None, chunks: int, output: Path, plot: Path | None,
                quiet: bool, verbose: bool) -> None:
    """Score every layer of HF_DIR on calibration text: block, attention and MLP influence, MLP similarity."""
    from .analysis import analyze, plot_scores
    from .pipeline import calibration

    spec, _, dense = _dense_reference(hf_dir)
    scores = analyze(dense, calibration(hf_dir, text, ctx or HealSettings.ctx, chunks), progress=not quiet,
                     source=hf_dir.name)
    scores.save(output)
    plot_scores(scores, plot or output.with_suffix(".png"))
    order = sorted(range(1, spec.n_layer - 1), key=lambda i: scores.influence[i])
    click.echo(f"wrote {output} and {plot or output.with_suffix('.png')}; most redundant layers: {order[:8]}")


@main.command("plan")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("--scores", type=click.Path(path_type=Path), default=None,
              help="Scores from `d2m analyze` (computed now if not given).")
@plan_options
@text_option
@_calibration_ctx
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("plan.json"), show_default=True)
@verbose_option
@user_errors
def plan_cmd(hf_dir: Path, scores: Path | None, text: Path | None, ctx: int | None, output: Path, verbose: bool,
             **settings) -> None:
    """Make a fusion plan for HF_DIR that meets a speed target, and print its predicted speedup."""
    from .analysis import LayerScores, analyze
    from .costmodel import get_device
    from .pipeline import calibration
    from .plan import plan_summary
    from .planner import choose_plan
    from .spec import load_dense_spec

    spec = load_dense_spec(hf_dir)
    if scores is not None:
        layer_scores = LayerScores.load(scores)
    else:
        _, _, dense = _dense_reference(hf_dir)
        layer_scores = analyze(dense, calibration(hf_dir, text, ctx or HealSettings.ctx, ANALYSIS_SEQUENCES),
                               source=hf_dir.name)
    req = plan_request_from(settings)
    dev = get_device(settings["device"] or ConvertRequest.device)
    choice = choose_plan(spec, layer_scores, req, dev)
    choice.plan.save(output)
    click.echo(f"wrote {output}: {req.method} fuse={choice.fuse} {json.dumps(plan_summary(choice.plan))}")
    click.echo(f"predicted on {dev.name} at depth {req.depth}: {choice.dense_bytes / 1e6:.1f} -> "
               f"{choice.plan_bytes / 1e6:.1f} MB/token, speedup x{choice.predicted_speedup:.2f}")
    click.echo(f"bound: {choice.bound()}")


def _distill_options(fn):
    fn = options(E2EConfig, ("lr", "batch", "kd_weight", "lm_weight"))(fn)
    return options(DistillRequest, ("minutes", "tokens", "freeze_guests", "lora"))(fn)


def _trainer_arg(ctx, param, values: tuple[str, ...]) -> dict:
    """`--trainer-arg KEY=VALUE` (repeatable) -> TrainingArguments keywords; VALUE is read as JSON where it parses
    (numbers, true/false, objects), as a string otherwise."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param=param)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@main.command("distill")
@click.argument("student", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(path_type=Path), required=True,
              help="The dense HF checkpoint the student was upcycled from.")
@_distill_options
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Matmul precision (weights stay fp32); auto: bf16 on GPUs and CPUs with native bf16.")
@click.option("--trainer-arg", "trainer_args", multiple=True, callback=_trainer_arg, metavar="KEY=VALUE",
              help="A further transformers TrainingArguments setting (repeatable), e.g. gradient_checkpointing=true, "
                   "fsdp='full_shard auto_wrap', deepspeed=ds_config.json.")
@text_option
@_calibration_ctx
@quiet_option
@verbose_option
@user_errors
def distill_cmd(student: Path, out: Path, teacher: Path, precision: str, trainer_args: dict, text: Path | None,
                quiet: bool, verbose: bool, **settings) -> None:
    """End-to-end distillation of STUDENT (an upcycled checkpoint from `convert --save-hf`) into OUT.

    \b
    The continued healing of a saved model, on transformers' Trainer: on CPU for small budgets; for real
    budgets on GPUs under torchrun or accelerate (DDP, or FSDP / DeepSpeed through --trainer-arg):
      torchrun --nproc-per-node 8 -m d2m_gguf distill STUDENT OUT --teacher HF_DIR --tokens 200000000
      accelerate launch -m d2m_gguf distill STUDENT OUT --teacher HF_DIR --tokens 200000000
    It checkpoints to OUT/checkpoints and resumes from the last one; write the result with
    `convert.py OUT OUT.gguf` (or `convert.py HF_DIR OUT.gguf --from-checkpoint OUT`).
    """
    from .pipeline import distill_checkpoint

    req = from_options(DistillRequest, settings, base=DistillRequest(
        student=student, teacher=teacher, out=out, text=text, trainer_args=trainer_args,
        e2e=from_options(E2EConfig, settings, precision=resolve_precision(precision)), progress=not quiet))
    if settings["ctx"] is not None:
        req.ctx = settings["ctx"]
    if not req.minutes and not req.tokens:
        raise D2MError("give a budget: --minutes and/or --tokens")
    stage = distill_checkpoint(req)
    if stage is None:
        return  # another rank of a torchrun job; rank 0 reports
    last = stage.rows[-1] if stage.rows else {}
    click.echo(f"distilled {stage.tokens} tokens in {stage.seconds / 60:.1f} min "
               f"(kd {last.get('kd', float('nan')):.4f}); wrote {out}")


# the name it had: `d2m heal` continued healing end to end; kept so that scripts and torchrun lines still work
main.add_command(click.Command("heal", params=distill_cmd.params, callback=distill_cmd.callback, hidden=True,
                               help="The former name of `d2m distill`."))


@main.command("synth")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tokens", type=int, default=300_000, show_default=True, help="Tokens to sample.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens sampled per sample.")
@click.option("--batch", type=int, default=32, show_default=True, help="Samples drawn at once.")
@click.option("--prompt", type=click.Path(path_type=Path), default=None,
              help="Text the samples start from [default: the calibration text shipped in d2m_gguf/data/].")
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
      cat "$(python -c 'import d2m_gguf.data as d; print(d.DEFAULT_CALIBRATION)')" synth.txt > heal.txt
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


@bench.command("lfuc")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@options(LfucTableRequest, ("sizes", "methods", "outtype", "ctx", "chunks", "depth", "scores", "results"))
@heal_options
@quiet_option
@verbose_option
@user_errors
def bench_lfuc(hf_dir, quiet, verbose, **settings) -> None:
    """LF-UC against equally healed pruning baselines at each size, and the dense model: ppl and decode speed."""
    from .bench.lfuc import lfuc_table

    base = LfucTableRequest(hf_dir=hf_dir, heal=healing_from(settings), progress=not quiet)
    out = lfuc_table(from_options(LfucTableRequest, settings, base=base))
    click.echo((out / "lfuc.md").read_text())
    click.echo(f"results in {out}")


@bench.command("at-scale")
@click.argument("hf_dir", type=click.Path(path_type=Path), default=Path("models/smollm2-135m-instruct"))
@options(AtScaleRequest, ("fuse", "tokens", "local_tokens", "nproc", "batch", "precision", "heal_ctx", "outtype",
                          "ctx", "chunks", "results"))
@text_option
@quiet_option
@verbose_option
@user_errors
def bench_at_scale(hf_dir, text, quiet, verbose, **settings) -> None:
    """Pruning vs LF-UC (route first, trained guests) healed with the same tokens on transformers' Trainer: the
    GPU comparison (`make gpu-compare`). Each method: convert's healing, then `d2m distill --tokens TOKENS`
    under torchrun over the GPUs, then WikiText-2 ppl through llama-perplexity, paired chunk by chunk."""
    from .bench.at_scale import compare_at_scale

    out = compare_at_scale(from_options(AtScaleRequest, settings, base=AtScaleRequest(
        hf_dir=hf_dir, text=text, progress=not quiet)))
    click.echo((out / "at_scale.md").read_text())
    click.echo(f"results in {out}")


@bench.command("curve")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@options(CurveRequest, ("fuse", "methods", "budgets", "outtype", "chunks", "scores", "results"))
@quiet_option
@verbose_option
@user_errors
def bench_curve(hf_dir, quiet, verbose, **settings) -> None:
    """Perplexity against the healing budget (tokens) for each method: curve.csv, curve.md, curve.png."""
    from .bench.lfuc import healing_curve

    out = healing_curve(from_options(CurveRequest, settings, base=CurveRequest(hf_dir=hf_dir, progress=not quiet)))
    click.echo((out / "curve.md").read_text())
    click.echo(f"results in {out}")


@bench.command("matrix")
@click.argument("hf_dir", type=click.Path(path_type=Path), default=Path("models/smollm2-135m-instruct"))
@click.option("--quick", is_flag=True, help="The QUICK subset (dense + a hand-written LF-UC plan, 3 quant types).")
@options(MatrixRequest, ("quants", "kv_types", "kv_quants", "deep_quants", "depths", "chunks", "long_chunks",
                         "results", "publish"))
@click.option("--heal-tokens", type=int, default=None,
              help=f"Healing budget of the variants in tokens [default: {MATRIX_HEAL_TOKENS}; QUICK 0].")
@click.option("--with-upcycle", is_flag=True, help="Add plain sparse upcycling rows (full matrix).")
@verbose_option
@user_errors
def bench_matrix(hf_dir, quick, heal_tokens, with_upcycle, verbose, **settings) -> None:
    """Variants x quant types x KV-cache types at three context depths: size, bytes per token, ppl / KLD / top-1 at
    ctx 512 and 4096, decode tok/s per depth, predicted vs measured speedup, runtime efficiency, the Pareto front
    per depth, predicted phone tok/s, arm64 check.

    Writes matrix.csv, matrix.md (headline first), pareto-d<depth>.png and the tool logs under
    RESULTS/<timestamp>/."""
    from .bench.matrix import MatrixVariant, full_request, quick_request, run_matrix

    if not (Path(hf_dir) / "config.json").is_file():
        raise D2MError(f"{hf_dir}: not a Hugging Face checkpoint directory (make smollm2)")
    kw = {k: v for k, v in settings.items() if v is not None}
    if heal_tokens is not None:
        kw["heal"] = HealSettings(tokens=heal_tokens)
    req = quick_request(hf_dir, **kw) if quick else full_request(hf_dir, **kw)
    if with_upcycle:
        req.variants = (*req.variants, MatrixVariant("upcycle", 4))
    out = run_matrix(req)
    click.echo((out / "matrix.md").read_text())
    click.echo(f"results in {out}")


@bench.command("scale")
@options(ScaleRequest, ("sizes", "chunks", "ctx", "heal_tokens", "fuse", "tokenizer", "llama_src", "tmp", "results",
                        "publish"))
@quiet_option
@verbose_option
@user_errors
def bench_scale(quiet, verbose, **settings) -> None:
    """Wall time and peak RSS of each conversion stage on random checkpoints of real shapes (Qwen2.5-0.5B/1.5B,
    Llama-3.2-3B, Llama-3.1-8B): llama.cpp's convert_hf_to_gguf.py, convert --dense, analyze, plan application +
    write, block-local healing, each a process of its own; whether plan + write stays within 1.2x of upstream's
    dense conversion.

    Writes scale.csv, scale.md, scale.png and settings.json under RESULTS/scale-<timestamp>/; the checkpoints
    (up to 16 GB) live in a temporary folder (--tmp) only while their size is measured."""
    from .bench.scale import run_scale

    out = run_scale(from_options(ScaleRequest, settings, base=ScaleRequest(progress=not quiet)))
    click.echo((out / "scale.md").read_text())
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
    from .bench.matrix import adb_bench

    adb_bench(results=results, matrix_dir=matrix_dir, quants=tuple(quants.split(",")), threads=threads,
              echo=click.echo)


@main.command("quantize")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--device", default=None, help="Device recipe: host, phone-i8mm, phone-i8mm-g2, phone-dotprod, rpi5 "
              "(quant/<recipe>.json), or a recipe .json path.")
@click.option("--type", "qtype", default=None, help="A plain llama-quantize type instead of a recipe (Q4_0, Q4_K_M...).")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="Calibration text for the importance matrix [default: the calibration text shipped in "
                   "d2m_gguf/data/].")
@click.option("--chunks", type=int, default=64, show_default=True, help="Calibration chunks for llama-imatrix.")
@click.option("--ctx", type=int, default=256, show_default=True, help="Tokens per imatrix chunk.")
@click.option("--min-expert-tokens", type=int, default=None,
              help="Experts that saw fewer tokens are filled from the layer's pooled statistics "
                   "[default: max(32, 10% of the layer's mean)].")
@click.option("--imatrix", "imatrix_file", type=click.Path(path_type=Path), default=None,
              help="Reuse an importance matrix (GGUF) instead of computing one.")
@click.option("--no-imatrix", is_flag=True, help="Quantize without an importance matrix.")
@click.option("--head-type", default=None, help="The LM head's type (and a tied embedding's) instead of the "
              "recipe's, e.g. Q5_0 where a large vocabulary makes the head most of the bytes (docs/results.md: "
              "Gemma 3's 262k-token head).")
@verbose_option
@user_errors
def quantize_cmd(src, out, device, qtype, text, chunks, ctx, min_expert_tokens, imatrix_file, no_imatrix,
                 head_type, verbose) -> None:
    """Quantize SRC (an f16/f32 GGUF) to OUT for a device: its recipe, an importance matrix from the patched
    llama-imatrix (tokens per expert reported, rare experts pooled) and the patched llama-quantize."""
    from .quantize import load_recipe, quantize_file

    if bool(device) == bool(qtype):
        raise D2MError("give exactly one of --device NAME or --type QTYPE")
    if device:
        device = str(load_recipe(device).path)   # an unknown device fails here, before any work
    rep = quantize_file(src, out, device or qtype, text=text, ctx=ctx, chunks=chunks,
                        min_expert_tokens=min_expert_tokens, use_imatrix=not no_imatrix, imatrix=imatrix_file,
                        head_type=head_type)
    for line in rep.lines():
        click.echo(line)


def convert_main() -> None:
    """`python convert.py HF_DIR OUT.gguf ...`: the same as `d2m convert`."""
    convert(prog_name="convert.py")
