"""Device-targeted quantization: recipes in quant/<name>.json, an importance matrix, the patched llama-quantize.

A recipe (data, not code) names a base llama-quantize type and a type per tensor
class: attention, dense FFN, routed experts (ffn_*_exps), the router
(ffn_gate_inp, never quantized), embeddings and the LM head, each with a short
"why". `quantize_for_device` turns it into llama-quantize's `--tensor-type`,
`--token-embedding-type` and `--output-tensor-type` options and adds an
importance matrix computed by the patched `llama-imatrix` on the calibration text.

Rarely routed experts: the GGUF imatrix keeps, per expert, the sum of squared
input activations and the number of tokens that reached it (`<tensor>.counts`).
An expert that saw few tokens has a noisy importance estimate (and llama-quantize
treats an expert with zero tokens as "all columns equally important"). All
experts of a block read the same normalised hidden state, so the layer's
well-covered experts are an unbiased estimate of the input statistics: we shrink
each rare expert towards their pooled mean, topping its count up to the threshold
with pseudo-tokens, (S_j + (T - c_j) * m) / T, where m is the pooled mean of the
well-covered experts' per-token statistics. An expert with no tokens gets exactly m;
one with many tokens is untouched. The per-expert token counts are reported.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_path, check_output_path
from .errors import D2MError
from .llamacpp import REPO, LlamaCpp

log = logging.getLogger("d2m")

QUANT_DIR = REPO / "quant"
RECIPE_FORMAT = "d2m-quant-recipe/1"

# tensor class -> llama-quantize --tensor-type pattern (a regex searched in the tensor name)
CLASS_PATTERNS = {
    "attention": r"attn_(q|k|v|qkv|output)\.weight",
    "experts": r"ffn_(gate|up|down|gate_up)_exps\.weight",
    "ffn": r"ffn_(gate|up|down)\.weight",
}
CLASSES = ("attention", "ffn", "experts", "router", "embeddings", "output")
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Recipe:
    name: str
    device: str
    base: str
    types: dict[str, str]          # class -> GGML type (only the classes the recipe names)
    why: dict[str, str]            # "recipe", "base" and each class -> reason
    summary: str = ""
    path: Path | None = None

    def quantize_args(self, tied_embeddings: bool, n_embd: int | None = None) -> list[str]:
        """llama-quantize options (before the file names) that apply the per-class types.

        llama-quantize applies its shape fallback (a 256-block K-quant on rows that are not a multiple
        of 256) to --tensor-type overrides but not to the explicit output / embedding types, so those
        get the same fallback here when `n_embd` is given."""
        args: list[str] = []
        for cls in ("attention", "experts", "ffn"):
            if cls in self.types:
                args += ["--tensor-type", f"{CLASS_PATTERNS[cls]}={self.types[cls]}"]
        return args + head_args(self.types.get("output"), self.types.get("embeddings"), tied_embeddings, n_embd)

    def describe(self) -> list[str]:
        lines = [f"recipe {self.name} ({self.path}): base {self.base}: {self.why.get('base', '')}"]
        for cls in CLASSES:
            if cls in self.types:
                lines.append(f"  {cls:<10} {self.types[cls]:<7} {self.why.get(cls, '')}")
        return lines


def head_args(output: str | None, embeddings: str | None, tied_embeddings: bool, n_embd: int | None) -> list[str]:
    """llama-quantize's options for the LM head and the token embedding (tied: one tensor, the head's type)."""
    emb = output if tied_embeddings and output else embeddings
    args = ["--output-tensor-type", shape_fallback(output, n_embd)] if output else []
    return args + (["--token-embedding-type", shape_fallback(emb, n_embd)] if emb else [])


_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q5_K", "Q4_1", "Q4_0", "Q4_K", "IQ4_NL",
                 "IQ4_XS")     # the types a head can take (--head-type)

_FALLBACK = {"IQ4_XS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ2_XS": "IQ4_NL",
             "IQ2_XXS": "IQ4_NL", "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
             "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def shape_fallback(qtype: str, ncols: int | None) -> str:
    """llama.cpp's tensor_type_fallback (src/llama-quant.cpp): the type a row of `ncols` can take."""
    import gguf

    if not ncols:
        return qtype
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    if ncols % block == 0:
        return qtype
    alt = _FALLBACK.get(qtype, "F16")
    return alt if ncols % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[alt]][0] == 0 else "F16"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in QUANT_DIR.glob("*.json"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by name (quant/<name>.json), by device profile name (its `recipe`), or by path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = QUANT_DIR / f"{name_or_path}.json"
        if not p.is_file():
            from .costmodel import load_devices
            dev = load_devices().get(str(name_or_path))
            if dev is not None and dev.recipe:
                p = QUANT_DIR / f"{dev.recipe}.json"
    if not p.is_file():
        raise D2MError(f"no quantization recipe {name_or_path!r} (known: {', '.join(recipe_names())}; "
                       f"or a path to a recipe .json)")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise D2MError(f"{p}: not valid JSON ({e})") from e
    if raw.get("format") != RECIPE_FORMAT:
        raise D2MError(f"{p}: format must be {RECIPE_FORMAT!r}")
    try:
        base = str(raw["base"]["type"]).upper()
        classes = raw.get("classes", {})
        unknown = set(classes) - set(CLASSES)
        if unknown:
            raise D2MError(f"{p}: unknown tensor classes {sorted(unknown)} (known: {', '.join(CLASSES)})")
        types = {c: str(v["type"]).upper() for c, v in classes.items()}
        why = {c: str(v.get("why", "")) for c, v in classes.items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise D2MError(f"{p}: malformed recipe ({e!r}); see quant/phone-i8mm.json") from e
    if types.get("router", "F32") not in FLOAT_TYPES:
        raise D2MError(f"{p}: the router (ffn_gate_inp) must stay F32/F16/BF16, not {types['router']}")
    why.update(recipe=str(raw.get("why", "")), base=str(raw["base"].get("why", "")))
    return Recipe(name=p.stem, device=str(raw.get("device", p.stem)), base=base, types=types, why=why,
                  summary=str(raw.get("summary", "")), path=p)


def tensor_class(name: str) -> str:
    if name == "token_embd.weight":
        return "embeddings"
    if name == "output.weight":
        return "output"
    if "ffn_gate_inp" in name:
        return "router"
    if "_norm" in name or name.endswith(".bias"):
        return "norm/bias"
    import re
    for cls in ("experts", "attention", "ffn"):
        if re.search(CLASS_PATTERNS[cls], name):
            return cls
    return "other"


def tensor_types(path: Path) -> dict[str, str]:
    """tensor name -> GGML type name, as written in a GGUF."""
    from .reader import open_gguf
    return {t.name: t.tensor_type.name for t in open_gguf(path).tensors}


def types_by_class(path: Path) -> dict[str, dict[str, int]]:
    """class -> {type: number of tensors} of a GGUF."""
    out: dict[str, Counter] = {}
    for name, t in tensor_types(path).items():
        out.setdefault(tensor_class(name), Counter())[t] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


# ---- importance matrix ---------------------------------------------------------------------------------

def compute_imatrix(llama: LlamaCpp, model: Path, text: Path, out: Path, ctx: int = 256, chunks: int | None = 64,
                    log_file: Path | None = None) -> Path:
    """`llama-imatrix` over the calibration text (GGUF imatrix with per-expert counts)."""
    args = ["-m", model, "-f", text, "-o", out, "-c", ctx, "-b", ctx, "-t", llama.threads, "--no-ppl",
            "--output-format", "gguf"]
    if chunks:
        args += ["--chunks", chunks]
    proc = llama.run("llama-imatrix", args)
    if log_file is not None:
        log_file.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if not out.is_file():
        raise D2MError(f"llama-imatrix wrote no {out}")
    return out


@dataclass
class ExpertCoverage:
    """Tokens that reached each expert of one MoE block (from the imatrix of its ffn_up_exps / gate_exps)."""

    layer: int
    counts: list[int]
    threshold: int = 0
    pooled: list[int] = field(default_factory=list)   # experts whose statistics were shrunk to the pool

    def line(self) -> str:
        c = self.counts
        s = (f"blk.{self.layer}: {len(c)} experts, tokens per expert {' '.join(map(str, c))} "
             f"(min {min(c)}, max {max(c)})")
        if self.pooled:
            s += f"; rare (< {self.threshold}): {self.pooled} filled from the layer's pooled statistics"
        return s


def _imatrix_entries(reader) -> dict[str, tuple]:
    sums = {t.name[: -len(".in_sum2")]: t for t in reader.tensors if t.name.endswith(".in_sum2")}
    counts = {t.name[: -len(".counts")]: t for t in reader.tensors if t.name.endswith(".counts")}
    return {k: (sums[k], counts[k]) for k in sums if k in counts}


def expert_token_counts(imatrix: Path) -> list[ExpertCoverage]:
    """Per MoE block, the tokens that reached each expert (the imatrix `.counts` of its expert tensors)."""
    import gguf

    reader = gguf.GGUFReader(imatrix)
    found: dict[int, list[int]] = {}
    for name, (_, cnt) in sorted(_imatrix_entries(reader).items()):
        if "_exps" not in name or not name.startswith("blk."):
            continue
        layer = int(name.split(".")[1])
        c = [int(round(x)) for x in np.asarray(cnt.data, dtype=np.float64).ravel()]
        # gate/up read the block input; down reads the same routed tokens: any of them gives the counts
        found.setdefault(layer, c)
    return [ExpertCoverage(layer, c) for layer, c in sorted(found.items())]


def default_threshold(counts: np.ndarray, min_tokens: int | None) -> int:
    """Rare = fewer than max(32, 10% of the layer's mean tokens per expert), unless given."""
    if min_tokens is not None:
        return int(min_tokens)
    return int(max(32, 0.1 * float(counts.mean())))


def pool_rare_experts(src: Path, dst: Path, min_tokens: int | None = None) -> list[ExpertCoverage]:
    """Copy the imatrix `src` to `dst` with every rarely routed expert shrunk towards the layer's pooled
    statistics (see the module docstring). Returns the coverage of each MoE block and what was pooled."""
    import gguf

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    coverage: dict[int, ExpertCoverage] = {}
    for name, (s_t, c_t) in sorted(_imatrix_entries(reader).items()):
        counts = np.asarray(c_t.data, dtype=np.float64).ravel()
        if counts.size < 2:
            continue
        sums = np.asarray(s_t.data).reshape(counts.size, -1)
        threshold = default_threshold(counts, min_tokens)
        rare = counts < threshold
        good = ~rare if (~rare).any() else counts > 0
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        cov = coverage.setdefault(layer, ExpertCoverage(layer, [int(round(x)) for x in counts], threshold))
        if not rare.any() or not good.any():
            continue
        pooled_mean = sums[good].sum(0) / counts[good].sum()          # per-token mean of x^2, per column
        new_sums = sums.astype(np.float64).copy()
        new_counts = counts.copy()
        for j in np.flatnonzero(rare):
            new_sums[j] = sums[j] + (threshold - counts[j]) * pooled_mean
            new_counts[j] = threshold
        s_t.data[...] = new_sums.astype(np.float32).reshape(s_t.data.shape)
        c_t.data[...] = new_counts.astype(np.float32).reshape(c_t.data.shape)
        cov.pooled = sorted(set(cov.pooled) | {int(j) for j in np.flatnonzero(rare)})
    reader.data.flush()
    del reader
    return [coverage[k] for k in sorted(coverage)]


# ---- quantize ------------------------------------------------------------------------------------------

@dataclass
class QuantizeReport:
    out: Path
    recipe: Recipe | None
    qtype: str
    args: list[str]
    imatrix: Path | None
    coverage: list[ExpertCoverage]
    types: dict[str, dict[str, int]]
    log: str = ""

    def lines(self) -> list[str]:
        out = [f"wrote {self.out} ({self.out.stat().st_size / 2**20:.1f} MiB), base type {self.qtype}"]
        if self.recipe is not None:
            out += self.recipe.describe()
        if self.imatrix is not None:
            out.append(f"importance matrix: {self.imatrix}")
        if self.coverage:
            out.append("tokens per expert (calibration text, imatrix counts):")
            out += ["  " + c.line() for c in self.coverage]
        out.append("tensor types by class: " + "; ".join(
            f"{k} {', '.join(f'{t} x{n}' for t, n in v.items())}" for k, v in self.types.items()))
        return out


def _is_tied(path: Path) -> bool:
    return "output.weight" not in tensor_types(path)


def _n_embd(path: Path) -> int | None:
    from .reader import field, open_gguf
    r = open_gguf(path)
    return field(r, f"{field(r, 'general.architecture')}.embedding_length")


def _needs_requantize(path: Path) -> bool:
    return any(t not in FLOAT_TYPES for name, t in tensor_types(path).items() if name.endswith(".weight"))


def quantize_file(src: Path, dst: Path, qtype_or_recipe: str, llama: LlamaCpp | None = None,
                  text: Path | None = None, ctx: int = 256, chunks: int | None = 64,
                  min_expert_tokens: int | None = None, use_imatrix: bool = True,
                  imatrix: Path | None = None, work_dir: Path | None = None,
                  head_type: str | None = None) -> QuantizeReport:
    """Quantize `src` to `dst` with a plain llama-quantize type (Q4_0, Q4_K_M, ...) or a device recipe name.

    With `use_imatrix` an importance matrix is computed on `text` (or `imatrix`, an earlier one, is reused),
    rare experts are pooled, and it is passed to llama-quantize (types that do not use one ignore it).
    `head_type` replaces the recipe's (or llama-quantize's) type of the LM head, and of a tied embedding."""
    from .data import DEFAULT_CALIBRATION

    llama = llama or LlamaCpp.default()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise D2MError(f"{src}: no such file")
    check_output_path(dst)
    work = Path(work_dir) if work_dir else dst.with_name(dst.name + ".quant")
    work.mkdir(parents=True, exist_ok=True)
    recipe = None
    upper = qtype_or_recipe.upper()
    if head_type and head_type.upper() not in _TENSOR_TYPES:
        raise D2MError(f"unknown head type {head_type!r} (a GGML tensor type: {', '.join(_TENSOR_TYPES)})")
    if qtype_or_recipe in recipe_names() or qtype_or_recipe.endswith(".json") or _is_device(qtype_or_recipe):
        recipe = load_recipe(qtype_or_recipe)
        if head_type:
            recipe = replace(recipe, types={**recipe.types, "output": head_type.upper()})
        qtype, args = recipe.base, recipe.quantize_args(_is_tied(src), _n_embd(src))
    else:
        qtype, args = upper, head_args(head_type.upper(), None, _is_tied(src), _n_embd(src)) if head_type else []
    if _needs_requantize(src):
        log.warning("%s is already quantized: requantizing (quality suffers; quantize from f16/f32)", src)
        args.append("--allow-requantize")
    coverage: list[ExpertCoverage] = []
    if use_imatrix and qtype not in FLOAT_TYPES:
        if imatrix is None:
            raw = compute_imatrix(llama, src, Path(text or DEFAULT_CALIBRATION), work / "imatrix-raw.gguf", ctx,
                                  chunks, log_file=work / "llama-imatrix.log")
            imatrix = work / "imatrix.gguf"
            coverage = pool_rare_experts(raw, imatrix, min_expert_tokens)
        else:
            coverage = expert_token_counts(imatrix)
        args += ["--imatrix", str(imatrix)]
    with atomic_path(dst) as tmp:
        text_log = llama.quantize(src, tmp, qtype, extra=args)
    (work / "llama-quantize.log").write_text(text_log, encoding="utf-8")
    types = types_by_class(dst)
    bad = {t for t in types.get("router", {}) if t not in FLOAT_TYPES}
    if bad:
        raise D2MError(f"{dst}: the router (ffn_gate_inp) was quantized to {sorted(bad)}")
    return QuantizeReport(dst, recipe, qtype, args, imatrix if use_imatrix and qtype not in FLOAT_TYPES else None,
                          coverage, types, text_log)


def _is_device(name: str) -> bool:
    from .costmodel import load_devices
    return name in load_devices() or name == "host"


def quantize_for_device(src: Path, dst: Path, device: str, **kw) -> QuantizeReport:
    """`d2m quantize IN OUT --device NAME`: the device's recipe (quant/<recipe>.json) with an imatrix."""
    return quantize_file(src, dst, device, **kw)


__all__ = ["Recipe", "load_recipe", "recipe_names", "compute_imatrix", "expert_token_counts", "pool_rare_experts",
           "quantize_file", "quantize_for_device", "QuantizeReport", "ExpertCoverage", "types_by_class",
           "tensor_class"]
