"""A dense2moe model's tensors by reference name, each materialised when asked: what the writers, the analysis
and the teacher activations read, so that no step which trains nothing needs the model in memory.

A `Weights` comes from a plan applied to a dense checkpoint on disk (`upcycle.plan_weights`: each tensor is
computed from the checkpoint's tensors when loaded), from a checkpoint d2m wrote (`hf_export.load_hf_weights`),
or from a model in memory (`Weights.of_model`), whose tensors left on PyTorch's `meta` device (blocks a partial
student never loaded) fall back to another `Weights`. `LayerStream` runs such weights one block at a time:
peak memory is one block's tensors (and the activations), not the model. Upstream's converter streams for
the same reason (its lazy tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .model import Block, HybridConfig, HybridModel, Positions, attention_inputs

LAYER_PREFIX = "model.layers."


def layer_of(key: str) -> int | None:
    """The block a state-dict key belongs to (None: embeddings, final norm, LM head)."""
    if not key.startswith(LAYER_PREFIX):
        return None
    return int(key[len(LAYER_PREFIX):].split(".", 1)[0])


def state_shapes(cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of a HybridModel of `cfg` and its shape, in state-dict order, allocating nothing."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in HybridModel(cfg).state_dict().items()}


@dataclass(frozen=True)
class Weights:
    """The tensors of a model of `cfg`: `shapes` lists them (state-dict order), `loader(key)` makes one."""

    cfg: HybridConfig
    shapes: dict[str, tuple[int, ...]]
    loader: Callable[[str], torch.Tensor]
    model: HybridModel | None = None          # where the tensors live in memory (of_model), for LayerStream

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def load(self, key: str) -> torch.Tensor:
        """One tensor, float32 on the CPU."""
        return self.loader(key).detach().to("cpu", torch.float32)

    def numpy(self, key: str) -> np.ndarray:
        return self.load(key).numpy()

    def n_params(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes.values())

    @classmethod
    def of_model(cls, model: HybridModel, fallback: "Weights | None" = None) -> "Weights":
        """The tensors of `model`; those on the `meta` device (a partial model's unloaded blocks) from
        `fallback`, which must then be given."""
        state = model.state_dict()

        def load(key: str) -> torch.Tensor:
            value = state[key]
            if value.is_meta:
                if fallback is None:
                    raise ValueError(f"{key} was never loaded and there is no fallback to load it from")
                return fallback.load(key)
            return value
        return cls(model.cfg, {k: tuple(v.shape) for k, v in state.items()}, load, model)

    def block(self, j: int) -> Block:
        """Block j with its weights: the model's own module where it is in memory, else built and loaded."""
        if self.model is not None and not _is_meta(self.model.layers[j]):
            return self.model.layers[j]
        cache_index = sum(b.attention for b in self.cfg.blocks[:j])
        with torch.device("meta"):
            block = Block(self.cfg, self.cfg.blocks[j], cache_index)
        prefix = f"{LAYER_PREFIX}{j}."
        block.load_state_dict({k[len(prefix):]: self.load(k) for k in self.shapes if k.startswith(prefix)},
                              assign=True)
        return block.eval()

    def materialize(self, blocks: list[int] | None = None) -> HybridModel:
        """A HybridModel holding these weights: all of them, or (`blocks`) only those blocks' tensors, the
        rest left on the `meta` device (a partial model: `of_model(model, fallback)` reads it whole)."""
        with torch.device("meta"):
            model = HybridModel(self.cfg)
        wanted = [k for k in self.shapes if blocks is None or layer_of(k) in blocks]
        model.load_state_dict({k: self.load(k).clone() for k in wanted}, strict=blocks is None, assign=True)
        return model


def _is_meta(module: torch.nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def as_weights(source: "HybridModel | Weights") -> Weights:
    return source if isinstance(source, Weights) else Weights.of_model(source)


class LayerStream:
    """The residual stream of a model run block after block over a whole batch of sequences, each block
    loaded before it runs and dropped after (`Weights.block`)."""

    def __init__(self, source: "HybridModel | Weights"):
        self.weights = as_weights(source)
        self.cfg = self.weights.cfg

    def embed_batches(self, chunks: torch.Tensor, batch: int) -> list[torch.Tensor]:
        """The embeddings of token chunks [N, T] in batches of `batch` sequences (the embedding dropped after)."""
        table = self.weights.load("model.embed_tokens.weight")
        return [F.embedding(chunks[i:i + batch], table) for i in range(0, len(chunks), batch)]

    def positions(self, n_tokens: int) -> Positions:
        """What the blocks' attention needs for sequences of n_tokens (causal, from position 0)."""
        return attention_inputs(self.cfg, torch.arange(n_tokens))

    def blocks(self, upto: int | None = None) -> Iterator[tuple[int, Block]]:
        """(j, block j) for j < upto, one block in memory at a time."""
        for j in range(self.cfg.n_layer if upto is None else upto):
            yield j, self.weights.block(j)
