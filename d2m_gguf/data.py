"""Text -> token sequences for calibration, healing and evaluation.

Calibration text is any UTF-8 file (default: the calibration text shipped in d2m_gguf/data/)
or an HF dataset saved with `save_to_disk` (its `text` column). Evaluation
follows llama-perplexity exactly (chunks of n_ctx, the second half of each chunk
scored) so the reference and llama.cpp measure the same thing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import D2MError

# shipped with the package (d2m_gguf/data/README.md: sources, licences, sha256), so a clone or an install has them
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CALIBRATION = DATA_DIR / "calibration-mixed.txt"
DEFAULT_EVAL = DATA_DIR / "wikitext-2-raw-test.txt"


def read_text(source: Path) -> str:
    """A text file, or the `text` column of an HF dataset directory saved with save_to_disk."""
    source = Path(source)
    if source.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as e:
            raise D2MError(f"{source}: reading an HF dataset needs the `datasets` package") from e
        ds = load_from_disk(str(source))
        if hasattr(ds, "keys"):  # a DatasetDict: take its first split
            ds = ds[next(iter(ds.keys()))]
        if "text" not in ds.column_names:
            raise D2MError(f"{source}: dataset has no 'text' column (columns: {ds.column_names})")
        return "\n\n".join(t for t in ds["text"] if t)
    if not source.is_file():
        raise D2MError(f"{source}: no such calibration text file or dataset directory")
    try:
        return source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise D2MError(f"{source}: cannot read text: {e}") from e


class Tokenizer:
    """The source model's tokenizer, used the way llama.cpp uses it (BOS only if the model adds one)."""

    def __init__(self, hf_dir: Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(hf_dir))
        self.tok.model_max_length = 1 << 40  # whole texts are tokenized, then chunked: no length warning
        probe = self.tok("a").input_ids
        self.bos = self.tok.bos_token_id if probe and probe[0] == self.tok.bos_token_id else None

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def token_chunks(tokens: list[int], n_ctx: int, n_chunks: int | None = None, bos: int | None = None,
                 where: str = "text") -> torch.Tensor:
    """[n_chunks, n_ctx] consecutive chunks (llama-perplexity: first token replaced by BOS when the model adds one)."""
    if n_ctx <= 0:
        raise D2MError(f"{where}: the sequence length must be positive, got {n_ctx}")
    n = len(tokens) // n_ctx
    if n_chunks is not None:
        n = min(n, n_chunks)
    if n == 0:
        raise D2MError(f"{where}: text too short: {len(tokens)} tokens, need at least {n_ctx} for one sequence")
    chunks = torch.tensor(tokens[: n * n_ctx], dtype=torch.long).view(n, n_ctx)
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


@torch.no_grad()
def perplexity(model, chunks: torch.Tensor, batch: int = 4) -> float:
    """llama-perplexity's number: mean NLL of the second half of each chunk, exponentiated."""
    n_ctx = chunks.shape[1]
    first = n_ctx // 2
    nll, count = 0.0, 0
    for i in range(0, len(chunks), batch):
        x = chunks[i:i + batch]
        logits = model(x)[:, first:n_ctx - 1].float()
        target = x[:, first + 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)
