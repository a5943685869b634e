"""Layer redundancy on calibration text: which layers, attentions and MLPs the model can do without.

Per layer i, averaged over calibration tokens (x: residual stream into the layer,
a: its attention output, h = x + a, f: its MLP output, y = h + f):

- influence            1 - cos(x, y)       the whole block (ShortGPT's block influence; low = redundant)
- angular_distance     arccos(cos(x, y))/pi
- attention_influence  1 - cos(x, x + a)
- mlp_influence        1 - cos(h, h + f)
- mlp_neighbor_cos     cos(f_i, f_{i+1})   how alike two neighbouring MLPs' outputs are
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .model import HybridModel
from .weights import LayerStream, Weights


@dataclass
class LayerScores:
    influence: list[float]
    angular_distance: list[float]
    attention_influence: list[float]
    mlp_influence: list[float]
    mlp_neighbor_cos: list[float]
    n_tokens: int
    source: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def n_layer(self) -> int:
        return len(self.influence)

    def save(self, path: Path) -> None:
        from .atomic import atomic_path
        with atomic_path(Path(path)) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "LayerScores":
        from .errors import D2MError
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise D2MError(f"{path}: not a layer-scores file ({e})") from e


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


ANALYSIS_SEQUENCES = 32   # calibration sequences the layer scores are taken on (`d2m analyze --chunks`)


@torch.no_grad()
def analyze(model: HybridModel | Weights, chunks: torch.Tensor, batch: int = 4, progress: bool = True,
            source: str = "") -> LayerScores:
    """Score every layer of a dense model (an identity-plan HybridModel, or its `Weights` read from the
    checkpoint) on token chunks [N, T]. Layer by layer: the whole calibration batch passes one block before
    the next is loaded (weights.LayerStream), so memory holds one layer's weights and the batch's residual
    stream, whatever the model's size."""
    stream = LayerStream(model)
    n = stream.cfg.n_layer
    sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("influence", "angle", "attn", "mlp")}
    neighbor = torch.zeros(max(n - 1, 0), dtype=torch.float64)
    pos = stream.positions(chunks.shape[1])
    xs = stream.embed_batches(chunks, batch)
    prev_fs: list[torch.Tensor | None] = [None] * len(xs)
    for layer, block in tqdm(stream.blocks(), total=n, desc="analyze (layers)", disable=not progress, leave=False):
        for k, x in enumerate(xs):
            a, f = block.contributions(x, pos)
            h = x if a is None else x + a
            y = h + f
            c = 1.0 - _one_minus_cos(x, y)
            sums["influence"][layer] += (1.0 - c).sum()
            sums["angle"][layer] += (torch.arccos(c.clamp(-1, 1)) / math.pi).sum()
            sums["attn"][layer] += _one_minus_cos(x, h).sum() if a is not None else 0.0
            sums["mlp"][layer] += _one_minus_cos(h, y).sum()
            if prev_fs[k] is not None:
                neighbor[layer - 1] += (1.0 - _one_minus_cos(prev_fs[k], f)).sum()
            prev_fs[k], xs[k] = f, y
    count = sum(x.shape[0] * x.shape[1] for x in xs)
    mean = {k: (v / count).tolist() for k, v in sums.items()}
    return LayerScores(influence=mean["influence"], angular_distance=mean["angle"],
                       attention_influence=mean["attn"], mlp_influence=mean["mlp"],
                       mlp_neighbor_cos=(neighbor / count).tolist(), n_tokens=count, source=source)


def plot_scores(scores: LayerScores, path: Path) -> None:
    """Line plot of the per-layer scores (log scale) plus the neighbour-MLP similarity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(scores.n_layer))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax1.plot(layers, scores.influence, "o-", label="block influence 1-cos(in, out)")
    ax1.plot(layers, scores.attention_influence, "s-", label="attention influence")
    ax1.plot(layers, scores.mlp_influence, "^-", label="MLP influence")
    ax1.set_yscale("log")
    ax1.set_ylabel("1 - cos (log)")
    ax1.set_title(f"Layer redundancy of {scores.source or 'model'} ({scores.n_tokens} calibration tokens); low = redundant")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.bar([i + 0.5 for i in layers[:-1]], scores.mlp_neighbor_cos, color="tab:purple")
    ax2.set_ylabel("cos(MLP i, MLP i+1)")
    ax2.set_xlabel("layer")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    from .atomic import atomic_path
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
