"""The fusion plan: a declarative document that drives the whole transformation.

A plan lists the output blocks in order. Each block names the source layer of
its attention (or none: an attention-free block, with no KV cache) and the
source layers of its MLPs: one source is a dense FFN; several are the experts of
a routed mixture (`"ffn": "moe"`, with `top_k` experts per token) or, with
`"ffn": "dense"`, one wide dense FFN that sums them. Everything else (embeddings,
final norm, LM head) comes from the source model unchanged.

    {
      "format": "d2m-plan/1",
      "source_layers": 30,
      "normalize_topk": true,
      "blocks": [
        {"attention": 0, "mlp": [0]},
        {"attention": 1, "mlp": [1, 2], "top_k": 1},
        {"attention": null, "mlp": [3, 4]},
        {"attention": null, "mlp": [5]}
      ]
    }

See docs/plan-format.md for every field.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import D2MError

PLAN_FORMAT = "d2m-plan/1"
ROUTER_INITS = ("random", "host", "fit")


@dataclass(frozen=True)
class BlockPlan:
    """One output block: where its attention and its MLP experts come from."""

    attention: int | None
    mlp: tuple[int, ...]
    moe: bool
    top_k: int = 0  # experts per token; 0 for a dense FFN
    split: int = 1  # experts cut from each source MLP (fine-grained experts of n_ff / split neurons)

    @property
    def n_expert(self) -> int:
        return len(self.mlp) * self.split if self.moe else 0

    @property
    def kind(self) -> str:
        return f"{'attn' if self.attention is not None else 'no-attn'}+{'moe' if self.moe else 'dense'}"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"attention": self.attention, "mlp": list(self.mlp)}
        if self.moe:
            d["top_k"] = self.top_k
            if self.split > 1:
                d["split"] = self.split
            if len(self.mlp) == 1 and self.split == 1:
                d["ffn"] = "moe"
        elif len(self.mlp) > 1:
            d["ffn"] = "dense"
        return d


@dataclass(frozen=True)
class FusionPlan:
    """The ordered output blocks plus the settings shared by all routed blocks."""

    blocks: tuple[BlockPlan, ...]
    source_layers: int
    normalize_topk: bool = True
    router_init: str = "random"
    shared: tuple[int, ...] = ()     # MLP sources that may be used by more than one block
    method: str = "manual"
    notes: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    def dropped_layers(self) -> list[int]:
        """Source layers whose MLP is used by no block."""
        used = {s for b in self.blocks for s in b.mlp}
        return [i for i in range(self.source_layers) if i not in used]

    def changes_nothing(self) -> bool:
        """True for the identity plan: the model it builds is the dense one, so there is nothing to heal."""
        return self.blocks == identity_plan(self.source_layers).blocks

    def with_router_init(self, router_init: str) -> "FusionPlan":
        return replace(self, router_init=router_init)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": PLAN_FORMAT,
            "method": self.method,
            "source_layers": self.source_layers,
            "normalize_topk": self.normalize_topk,
            "router_init": self.router_init,
        }
        if self.shared:
            d["shared"] = list(self.shared)
        if self.notes:
            d["notes"] = self.notes
        d["blocks"] = [b.to_json() for b in self.blocks]
        return d

    def dumps(self) -> str:
        """Canonical JSON (one block per line): what goes into the GGUF and into plan files."""
        head = {k: v for k, v in self.to_json().items() if k != "blocks"}
        lines = [json.dumps(b.to_json()) for b in self.blocks]
        body = json.dumps(head, indent=2)[:-2]
        return body + ',\n  "blocks": [\n    ' + ",\n    ".join(lines) + "\n  ]\n}\n"

    def save(self, path: Path) -> None:
        from .atomic import atomic_path, check_output_path

        check_output_path(Path(path))
        with atomic_path(Path(path)) as tmp:
            tmp.write_text(self.dumps(), encoding="utf-8")


def identity_plan(n_layer: int) -> FusionPlan:
    """The plan that changes nothing: block i = layer i's attention and MLP."""
    return FusionPlan(tuple(BlockPlan(i, (i,), False) for i in range(n_layer)), source_layers=n_layer)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise D2MError(f"{what} must be an integer, got {value!r}")
    return value


def parse_plan(doc: Any, where: str = "plan") -> FusionPlan:
    """Build and validate a FusionPlan from its JSON/YAML document."""
    if not isinstance(doc, dict):
        raise D2MError(f"{where}: expected an object with a 'blocks' list")
    fmt = doc.get("format", PLAN_FORMAT)
    if fmt != PLAN_FORMAT:
        raise D2MError(f"{where}: unknown format {fmt!r} (expected {PLAN_FORMAT!r})")
    known = {"format", "method", "source_layers", "normalize_topk", "router_init", "shared", "notes", "blocks"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise D2MError(f"{where}: unknown field {unknown[0]!r}")
    raw_blocks = doc.get("blocks")
    if not isinstance(raw_blocks, list) or not raw_blocks:
        raise D2MError(f"{where}: 'blocks' must be a non-empty list")
    source_layers = _int(doc.get("source_layers"), f"{where}: 'source_layers'")
    if source_layers <= 0:
        raise D2MError(f"{where}: 'source_layers' must be positive")

    blocks = []
    for i, raw in enumerate(raw_blocks):
        at = f"{where}: block {i}"
        if not isinstance(raw, dict):
            raise D2MError(f"{at}: expected an object")
        extra = sorted(set(raw) - {"attention", "mlp", "ffn", "top_k", "split"})
        if extra:
            raise D2MError(f"{at}: unknown field {extra[0]!r}")
        attention = raw.get("attention")
        if attention is not None:
            attention = _int(attention, f"{at}: 'attention'")
        mlp = raw.get("mlp")
        if isinstance(mlp, int) and not isinstance(mlp, bool):
            mlp = [mlp]
        if not isinstance(mlp, list) or not mlp:
            raise D2MError(f"{at}: 'mlp' must be a non-empty list of source layers")
        mlp = tuple(_int(s, f"{at}: 'mlp' entry") for s in mlp)
        split = _int(raw.get("split", 1), f"{at}: 'split'")
        ffn = raw.get("ffn", "moe" if len(mlp) > 1 or split > 1 else "dense")
        if ffn not in ("dense", "moe"):
            raise D2MError(f"{at}: 'ffn' must be 'dense' or 'moe', got {ffn!r}")
        moe = ffn == "moe"
        top_k = raw.get("top_k", 1 if moe else 0)
        top_k = _int(top_k, f"{at}: 'top_k'")
        if not moe and "top_k" in raw:
            raise D2MError(f"{at}: 'top_k' is only for 'ffn': 'moe' blocks")
        if split < 1 or (not moe and split != 1):
            raise D2MError(f"{at}: 'split' must be a positive integer, for 'ffn': 'moe' blocks only")
        blocks.append(BlockPlan(attention, mlp, moe, top_k, split))

    router_init = doc.get("router_init", "random")
    if router_init not in ROUTER_INITS:
        raise D2MError(f"{where}: 'router_init' must be one of {', '.join(ROUTER_INITS)}, got {router_init!r}")
    normalize = doc.get("normalize_topk", True)
    if not isinstance(normalize, bool):
        raise D2MError(f"{where}: 'normalize_topk' must be true or false")
    shared = tuple(_int(s, f"{where}: 'shared' entry") for s in doc.get("shared", []))
    plan = FusionPlan(tuple(blocks), source_layers, normalize, router_init, shared,
                      str(doc.get("method", "manual")), dict(doc.get("notes", {})))
    validate_plan(plan, where)
    return plan


def block_spans(plan: FusionPlan) -> list[tuple[int, int]]:
    """[start, end) source-layer span of each block: from its lowest source to the next block's.

    Layers that no block uses (pruned) go to the nearer of the blocks on either side (ties to the one
    before), as LF-UC's nearest attach places a removed layer's MLP: a pruned run is then healed by both
    its neighbours, each standing for half of it, instead of by the block before it alone, which heals
    worse (docs/results.md)."""
    sources = [[*b.mlp, *([b.attention] if b.attention is not None else [])] for b in plan.blocks]
    used = {s for block in sources for s in block}
    starts = [0]
    for before, block in zip(sources, sources[1:]):
        last, first = max(before), min(block)
        nearer = [r for r in range(last + 1, first) if r not in used and first - r < r - last]
        starts.append(min(nearer, default=first))
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise D2MError("block-local healing needs blocks whose sources increase monotonically")
    return list(zip(starts, starts[1:] + [plan.source_layers]))


def trained_blocks(plan: FusionPlan) -> list[int]:
    """Blocks that stand for more (or other) than their own source layer: the ones healing trains. The rest
    are exact copies of one layer; upcycle copies them as they are and healing leaves them frozen."""
    spans = block_spans(plan)
    return [j for j, (b, (s, e)) in enumerate(zip(plan.blocks, spans))
            if not (b.attention == s and b.mlp == (s,) and not b.moe and e == s + 1)]


def validate_plan(plan: FusionPlan, where: str = "plan", n_layer: int | None = None, n_ff: int | None = None) -> None:
    """Raise a D2MError naming the first problem: indices, reuse, top-k, expert splits."""
    n = plan.source_layers
    if n_layer is not None and n != n_layer:
        raise D2MError(f"{where}: written for a {n}-layer model, the source has {n_layer} layers")
    for s in plan.shared:
        if not 0 <= s < n:
            raise D2MError(f"{where}: shared layer {s} is out of range 0..{n - 1}")
    attn_used: Counter[int] = Counter()
    mlp_used: Counter[int] = Counter()
    for i, b in enumerate(plan.blocks):
        at = f"{where}: block {i}"
        if b.attention is not None:
            if not 0 <= b.attention < n:
                raise D2MError(f"{at}: attention source {b.attention} is out of range 0..{n - 1}")
            attn_used[b.attention] += 1
        for s in b.mlp:
            if not 0 <= s < n:
                raise D2MError(f"{at}: mlp source {s} is out of range 0..{n - 1}")
            mlp_used[s] += 1
        if b.moe:
            if not 1 <= b.top_k <= b.n_expert:
                raise D2MError(f"{at}: top_k {b.top_k} must be between 1 and the {b.n_expert} experts")
        elif b.top_k:
            raise D2MError(f"{at}: a dense FFN has no top_k")
        if n_ff is not None and n_ff % b.split:
            raise D2MError(f"{at}: split {b.split} does not divide the MLP width {n_ff}")
    for s, count in sorted(attn_used.items()):
        if count > 1 and s not in plan.shared:
            raise D2MError(f"{where}: attention of layer {s} is used {count} times (declare it in 'shared')")
    for s, count in sorted(mlp_used.items()):
        if count > 1 and s not in plan.shared:
            raise D2MError(f"{where}: mlp of layer {s} is used {count} times (declare it in 'shared')")


def load_plan(path: Path, n_layer: int | None = None, n_ff: int | None = None) -> FusionPlan:
    """Read a plan file (JSON, or YAML by extension) and validate it, against the model's `n_layer` and
    FFN width `n_ff` (which every split must divide) when given."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise D2MError(f"{path}: cannot read plan: {e}") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise D2MError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from e
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise D2MError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    plan = parse_plan(doc, str(path))
    validate_plan(plan, str(path), n_layer, n_ff)
    return plan


def plan_summary(plan: FusionPlan) -> dict[str, Any]:
    kinds = Counter(b.kind for b in plan.blocks)
    return {"blocks": plan.n_layer, "source_layers": plan.source_layers, "kinds": dict(kinds),
            "attention_layers": sum(b.attention is not None for b in plan.blocks),
            "experts": sum(b.n_expert for b in plan.blocks)}

