"""`d2m distill` under torchrun: data-parallel healing on two CPU ranks (gloo), as it runs on GPUs (nccl)."""

from __future__ import annotations

import json
import multiprocessing
import time
import types
from pathlib import Path

import torch

from d2m_gguf.checkpoint import Checkpoint
from d2m_gguf.hf_export import load_hf_checkpoint, load_hf_plan
from d2m_gguf.pipeline import calibration
from d2m_gguf.plan import identity_plan
from d2m_gguf.spec import load_dense_spec
from d2m_gguf.upcycle import upcycle

from .conftest import run_cli
from .helpers import last_progress, upcycled_unhealed


def test_heal_under_torchrun_counts_every_rank_and_rank0_writes(tiny_dirs, calibration_text, tmp_path):
    """Two ranks share the token budget (half the steps of one process), rank 0 alone writes and reports,
    the guests stay frozen across the replicas, and a second run resumes from the checkpoint."""
    hf = tiny_dirs["llama"]
    up, healed = upcycled_unhealed(hf, calibration_text, tmp_path), tmp_path / "healed"
    heal = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "d2m_gguf", "distill", up, healed,
            "--teacher", hf, "--text", calibration_text, "--ctx", "64", "--batch", "4", "--lr", "1e-3",
            "--lm-weight", "0", "--minutes", "0", "--quiet")
    for tokens, steps in ((4096, 8), (8192, 16)):  # 2 ranks x 4 sequences x 64 tokens a step
        proc = run_cli(*heal, "--tokens", str(tokens))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("distilled ") == 1 and f"distilled {tokens} tokens" in proc.stdout
        state = last_progress(healed)
        assert (state["tokens"], state["step"]) == (tokens, steps)
    # the loss falls: KL to the teacher on fixed calibration sequences (one step's batch is too noisy a measure)
    chunks = calibration(hf, calibration_text, 64, 32)
    teacher = upcycle(load_dense_spec(hf), Checkpoint(hf), identity_plan(6))
    assert mean_kl(load_hf_checkpoint(healed), teacher, chunks) < 0.8 * mean_kl(load_hf_checkpoint(up), teacher, chunks)
    before, after = load_hf_checkpoint(up).state_dict(), load_hf_checkpoint(healed).state_dict()
    moe = [(j, b.split) for j, b in enumerate(load_hf_plan(up, 6).blocks) if b.moe and len(b.mlp) > 1]
    assert moe
    for j, host in moe:
        key = f"model.layers.{j}.mlp.experts.up_proj"
        assert torch.equal(after[key][host:], before[key][host:]) and not torch.equal(after[key], before[key])


def mean_kl(student, teacher, chunks: torch.Tensor) -> float:
    with torch.no_grad():
        s, t = torch.log_softmax(student(chunks), -1), torch.log_softmax(teacher(chunks), -1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean().item()


def _heal_on_a_skewed_clock(rank: int, port: int, model_file: str, out_dir: str) -> None:
    """One rank of a 2-rank gloo job (set up as torchrun sets it up) whose clock runs 50x fast on rank 0 (a
    rank that read its own clock would stop steps before the other, which then waits in all-reduce)."""
    import os

    import torch.distributed as dist

    from d2m_gguf import distill, trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo")
    t0, rate = time.monotonic(), 50.0 if rank == 0 else 1.0
    trainer.time = types.SimpleNamespace(monotonic=lambda: t0 + rate * (time.monotonic() - t0))
    student, teacher = torch.load(model_file, weights_only=False)
    chunks = torch.randint(0, student.cfg.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    log = trainer.distill_e2e(student, teacher, chunks, distill.Budget(minutes=0.05),
                              distill.E2EConfig(batch=2, precision="fp32"), progress=False)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"tokens": log.tokens}))
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_stop_on_the_same_step_when_their_clocks_disagree(tiny_dirs, tmp_path):
    """A time budget under torchrun: every rank goes by the longest time any rank has measured, so all stop
    on the same step."""
    hf = tiny_dirs["llama"]
    spec = load_dense_spec(hf)
    model = upcycle(spec, Checkpoint(hf), identity_plan(spec.n_layer))
    torch.save((model, model), tmp_path / "models.pt")
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    ranks = [ctx.Process(target=_heal_on_a_skewed_clock,
                         args=(r, port, str(tmp_path / "models.pt"), str(tmp_path)))
             for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    for p in ranks:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    tokens = [json.loads((tmp_path / f"rank{r}.json").read_text())["tokens"] for r in range(2)]
    # 3 s on rank 0's fast clock: a few steps of 2 ranks x 2 sequences x 32 tokens, the same on both ranks
    assert tokens[0] == tokens[1] and 0 < tokens[0] < 200 * 128, tokens
