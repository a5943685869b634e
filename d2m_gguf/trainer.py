"""End-to-end healing on transformers' Trainer: the one training loop of `convert`'s end-to-end stage and of
`d2m distill`, so healing at scale runs where people train (torchrun or `accelerate launch`, DDP, FSDP or
DeepSpeed as TrainingArguments configure them; PEFT LoRA).

The loss is healing's: kd_weight * KL(teacher || student) per token on the logits + lm_weight * next-token
loss + balance_weight * the routers' load balance (`heal_loss`). The budget (tokens, steps or minutes, whichever
ends first; `distill.Budget`) drives a cosine learning rate as in block-local healing, and stops the run; a time
budget stops every rank at the same step (the longest clock of any rank counts).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from .configuration_dense2moe import Dense2MoEConfig
from .distill import Budget, E2EConfig, StageLog
from .errors import D2MError
from .model import HybridModel, hf_config_dict
from .modeling_dense2moe import Dense2MoEForCausalLM

PROGRESS_FILE = "d2m_progress.json"   # tokens and seconds spent, in each Trainer checkpoint
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def heal_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
              balance: torch.Tensor | None, cfg: E2EConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, its parts) of healing for logits [B, T, V] of the student and the teacher on `tokens` [B, T]."""
    s_logp = torch.log_softmax(student_logits[:, :-1].float(), dim=-1)
    t_logp = torch.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    kd = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).mean()
    lm = F.nll_loss(s_logp.reshape(-1, s_logp.shape[-1]), tokens[:, 1:].reshape(-1))
    balance = balance if balance is not None else torch.zeros((), device=kd.device)
    loss = cfg.kd_weight * kd + cfg.lm_weight * lm + cfg.balance_weight * balance
    return loss, {"kd": kd.detach(), "lm": lm.detach(), "balance": balance.detach(), "loss": loss.detach()}


def as_transformers(model: HybridModel) -> Dense2MoEForCausalLM:
    """The transformers class around `model`'s own modules (no copy: training one trains the other)."""
    config = Dense2MoEConfig(**hf_config_dict(model.cfg))
    with torch.device("meta"):
        wrapper = Dense2MoEForCausalLM(config)
    wrapper._auto_class, config._auto_class = "AutoModelForCausalLM", "AutoConfig"   # checkpoints carry the code
    wrapper.model = model.model
    if model.cfg.tie_word_embeddings:
        wrapper.lm_head = nn.Linear(model.cfg.n_embd, model.cfg.vocab_size, bias=False, device="meta")
        wrapper.lm_head.weight = model.model.embed_tokens.weight
    else:
        wrapper.lm_head = model.lm_head
    return wrapper


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, chunks: torch.Tensor):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[i]}


@dataclass
class _Clock:
    """Tokens and seconds spent (this run's plus those of the run it resumed)."""

    tokens_per_step: int
    earlier_seconds: float = 0.0
    started: float = 0.0
    seconds: float = 0.0    # agreed across ranks at the last step's end

    def now(self, distributed: bool, device: torch.device) -> float:
        return agreed_seconds(self.earlier_seconds + time.monotonic() - self.started, distributed, device)


class DistillationTrainer(Trainer):
    """Trainer whose loss is `heal_loss` against `teacher`'s logits and whose learning rate follows the budget."""

    def __init__(self, *args, teacher: nn.Module, heal: E2EConfig, budget: Budget, clock: _Clock, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        self.heal, self.budget, self.clock = heal, budget, clock
        self.last_parts: dict[str, torch.Tensor] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = inputs["input_ids"]
        out = model(input_ids=tokens, use_cache=False)
        with torch.no_grad(), self.accelerator.autocast():
            teacher_logits = self.teacher(tokens)
        teacher_logits = getattr(teacher_logits, "logits", teacher_logits)
        loss, self.last_parts = heal_loss(out.logits, teacher_logits, tokens, out.aux_loss, self.heal)
        return (loss, out) if return_outputs else loss

    def _load_optimizer_and_scheduler(self, checkpoint):
        """transformers maps the optimizer state of a multi-process CPU job to `cpu:<rank>`, a location torch.load
        cannot restore; on CPU it is read to the CPU."""
        if checkpoint is None or self.args.device.type != "cpu" or self.args.world_size == 1:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        self.optimizer.load_state_dict(torch.load(Path(checkpoint, OPTIMIZER_NAME), map_location="cpu",
                                                  weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint, SCHEDULER_NAME), weights_only=True))

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Cosine from the peak to zero over the budget spent (tokens, steps, or minutes when it is the only one)."""
        if self.lr_scheduler is None:
            def factor(step: int) -> float:
                spent = self.budget.fraction_spent(step * self.clock.tokens_per_step, self.clock.seconds, step)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, spent)))
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler


class _BudgetCallback(TrainerCallback):
    """Stops at the budget, logs the loss's parts into `log`, shows a token progress bar, and saves the tokens
    and seconds spent with each checkpoint."""

    def __init__(self, trainer: DistillationTrainer, log: StageLog, progress: bool, distributed: bool):
        self.trainer, self.log, self.distributed = trainer, log, distributed
        self.bar = tqdm(total=trainer.budget.tokens, unit="tok", desc="end-to-end distillation", leave=False,
                        disable=not progress or not trainer.is_world_process_zero())

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.clock.started = time.monotonic()
        self.bar.update(state.global_step * self.trainer.clock.tokens_per_step)

    def on_step_end(self, args, state, control, **kwargs):
        clock, step = self.trainer.clock, state.global_step
        clock.seconds = clock.now(self.distributed, args.device)
        tokens = step * clock.tokens_per_step
        self.bar.update(clock.tokens_per_step)
        done = self.trainer.budget.done(tokens, clock.seconds, step) or step >= state.max_steps
        if step == 1 or step % self.trainer.heal.log_every == 0 or done:
            self.log.add(step=step, tokens=tokens, seconds=round(clock.seconds, 2),
                         **{k: v.item() for k, v in self.trainer.last_parts.items()})
        if done:
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"
        self.log.tokens, self.log.seconds = tokens, clock.seconds

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.is_world_process_zero():
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PROGRESS_FILE
            path.write_text(json.dumps({"tokens": state.global_step * self.trainer.clock.tokens_per_step,
                                        "seconds": self.trainer.clock.seconds, "step": state.global_step}))

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def distill_e2e(student: HybridModel, teacher: HybridModel, chunks: torch.Tensor, budget: Budget,
                cfg: E2EConfig = E2EConfig(), checkpoint_dir: Path | None = None, progress: bool = True,
                lora_rank: int = 0, trainer_args: dict | None = None) -> StageLog:
    """Knowledge distillation of the whole student on the teacher's logits (plus LM loss), on transformers'
    Trainer. Under torchrun or `accelerate launch` every rank trains its share of each step's sequences.

    `checkpoint_dir`: Trainer checkpoints are written there every `cfg.checkpoint_every` steps and at the end,
    and the last one is resumed from (an interrupted or extended run); None: no checkpoints. `lora_rank` > 0
    trains LoRA adapters on the attention and dense MLP projections (LORA_TARGETS) and merges them into the
    student at the end. `trainer_args`: further TrainingArguments (fsdp, deepspeed, gradient_checkpointing, ...)."""
    if cfg.freeze_embeddings:
        student.embed_tokens.weight.requires_grad_(False)
    trainable = {p: p.requires_grad for p in student.parameters()}
    devices = next(student.parameters()).device, next(teacher.parameters()).device   # the Trainer moves them
    model = as_transformers(student)
    if lora_rank:
        model = _with_lora(model, lora_rank)
    n, t = chunks.shape
    batch = min(cfg.batch, n)
    with tempfile.TemporaryDirectory(prefix="d2m-trainer-") as scratch:
        out_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(scratch)
        args = TrainingArguments(
            output_dir=str(out_dir), per_device_train_batch_size=batch, learning_rate=cfg.lr,
            weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0, seed=cfg.seed, data_seed=cfg.seed,
            bf16=cfg.precision == "bf16", use_cpu=not torch.cuda.is_available(), report_to=[],
            logging_strategy="no", disable_tqdm=True, log_level="warning", dataloader_pin_memory=False,
            save_strategy="steps" if checkpoint_dir is not None else "no", save_steps=cfg.checkpoint_every,
            save_total_limit=1, remove_unused_columns=False, ddp_find_unused_parameters=False,
            **(trainer_args or {}))
        # every rank of a torchrun / accelerate job (TrainingArguments set the process group up) counts
        clock = _Clock(tokens_per_step=batch * t * args.world_size)
        args.max_steps = budget.max_steps or (math.ceil(budget.tokens / clock.tokens_per_step) if budget.tokens
                                              else 2**31 - 1)
        resume = get_last_checkpoint(str(out_dir)) if checkpoint_dir is not None and out_dir.is_dir() else None
        if resume and (Path(resume) / PROGRESS_FILE).is_file():
            clock.earlier_seconds = json.loads((Path(resume) / PROGRESS_FILE).read_text())["seconds"]
        log = StageLog("end-to-end")
        trainer = DistillationTrainer(model=model, args=args, train_dataset=_Sequences(chunks), teacher=teacher,
                                      heal=cfg, budget=budget, clock=clock)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_BudgetCallback(trainer, log, progress, args.world_size > 1))
        trainer.train(resume_from_checkpoint=resume)
    if lora_rank:
        model.merge_and_unload()    # the adapters into the student's own linear layers
    for p, was in trainable.items():
        p.requires_grad_(was)
    student.to(devices[0]).eval()
    teacher.to(devices[1])
    if cfg.freeze_embeddings:
        student.embed_tokens.weight.requires_grad_(True)
    return log


def _with_lora(model: Dense2MoEForCausalLM, rank: int):
    """`model` with LoRA adapters (rank `rank`, alpha 2*rank) on LORA_TARGETS; only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise D2MError("LoRA healing needs peft (pip install peft)") from e
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=list(LORA_TARGETS), bias="none"))


def agreed_seconds(seconds: float, distributed: bool, device: torch.device) -> float:
    """The healing time every rank of a torchrun job goes by: the longest any rank has measured. Ranks that
    read their own clocks could stop a step apart (the one that goes on then fails or waits in all-reduce) or
    set different learning rates (replicas drift apart)."""
    if not distributed:
        return seconds
    import torch.distributed as dist

    agreed = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return agreed.item()
