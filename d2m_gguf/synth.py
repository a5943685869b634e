"""Healing text sampled from the dense teacher itself (data-free distillation, as in LLM-QAT).

Why: healing can only teach what its text holds, and a user rarely has a large corpus at hand (the
calibration file here is 114k tokens; the default budget reads 641k). The teacher's own samples are text in
exactly the distribution the student must match, as much as the budget needs, and never the evaluation
text. Each sample starts from a short span of a prompt text (by default the calibration file, so the
samples cover its mix of prose, code and markup) and continues it at temperature 1: the teacher's
distribution, not its mode (end-of-text suppressed, so every sample is `seq_len` tokens long). The spans
are kept in the output, one sample per paragraph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_path, check_output_path
from .data import DEFAULT_CALIBRATION, DEFAULT_EVAL, Tokenizer, read_text
from .errors import D2MError


@dataclass(frozen=True)
class SynthReport:
    """What `sample_text` wrote, for the log and for the bench notes."""

    samples: int
    tokens: int              # tokens sampled (prompt spans not counted)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def prompt_spans(tokens: list[int], n: int, length: int, rng: np.random.Generator) -> list[list[int]]:
    """`n` spans of `length` tokens drawn uniformly from `tokens`."""
    if length <= 0:
        return [[] for _ in range(n)]
    if len(tokens) < length:
        raise D2MError(f"prompt text too short: {len(tokens)} tokens, need at least {length} for a prompt span")
    starts = rng.integers(0, len(tokens) - length + 1, size=n)
    return [tokens[s:s + length] for s in starts]


class _StepProgress:
    """A logits processor that only moves the progress bar: one update per sampled token of the batch."""

    def __init__(self, bar: tqdm, batch: int):
        self.bar, self.batch = bar, batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.bar.update(self.batch)
        return scores


def sample_text(hf_dir: Path, out: Path, tokens: int, seq_len: int = 512, batch: int = 32,
                prompt: Path | None = None, prompt_len: int = 8, temperature: float = 1.0, seed: int = 0,
                progress: bool = True) -> SynthReport:
    """Write about `tokens` sampled tokens of the model in `hf_dir` to the text file `out`."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    if tokens <= 0 or seq_len <= 0 or batch <= 0:
        raise D2MError(f"--tokens, --seq-len and --batch must be positive (got {tokens}, {seq_len}, {batch})")
    if temperature <= 0:
        raise D2MError(f"--temperature must be positive, got {temperature}")
    source = Path(prompt or DEFAULT_CALIBRATION)
    if source.resolve() == DEFAULT_EVAL.resolve():
        raise D2MError(f"{source} is the evaluation text: healing text must never start from it")
    check_output_path(Path(out))
    tok = Tokenizer(hf_dir)
    prompt_tokens = tok.encode(read_text(source)) if prompt_len > 0 else []
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    pad = tok.tok.pad_token_id if tok.tok.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_rounds = -(-tokens // (batch * seq_len))
    samples, sampled, start = [], 0, time.monotonic()
    bar = tqdm(total=n_rounds * batch * seq_len, unit="tok", desc="sampling the teacher", disable=not progress)
    # start tokens, left out of the text (the prompt spans are calibration text, kept); with no prompt and no
    # BOS, sampling starts from the end-of-text token
    head = [tok.bos] if tok.bos is not None else ([] if prompt_len > 0 else [pad])
    with torch.inference_mode():
        for _ in range(n_rounds):
            spans = prompt_spans(prompt_tokens, batch, prompt_len, rng)
            ids = torch.tensor([head + s for s in spans], dtype=torch.long)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=seq_len, min_new_tokens=seq_len,
                                 pad_token_id=pad, logits_processor=LogitsProcessorList([_StepProgress(bar, batch)]))
            for row in gen:
                samples.append(tok.decode(row[len(head):].tolist()))
            sampled += (gen.shape[1] - ids.shape[1]) * batch
    bar.close()
    with atomic_path(Path(out)) as tmp:
        tmp.write_text("\n\n".join(s.strip() for s in samples) + "\n", encoding="utf-8")
    return SynthReport(samples=len(samples), tokens=sampled, seconds=time.monotonic() - start)
