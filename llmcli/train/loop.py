"""The training loop that pretraining and fine-tuning share: the learning rate, one optimizer step over micro-batches,
validation, the processes of a torchrun group, and the Trainer that runs them with checkpoints and Ctrl-C safety.

AdamW with weight decay on matrices only (or Muon for the blocks' matrices and AdamW for the rest), warmup then
cosine, linear or warmup-stable-decay, gradient clipping, gradient accumulation over micro-batches, bfloat16
autocast where it pays (precision auto), optional torch.compile, and data parallelism across processes started by
torchrun: DistributedDataParallel, or FSDP (fully_shard) to shard parameters, gradients and optimizer state; gloo on
CPU, NCCL on GPU.

A run needs no saved random state: the batch of step s is drawn from (seed, s) and dropout is seeded from
(seed, s, rank), so a resumed run repeats an uninterrupted one bit for bit. Ctrl-C (or SIGTERM) finishes the step,
saves and exits 130; a non-finite loss stops before the update is applied.
"""

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmcli.config import TrainConfig
from llmcli.errors import LLMError
from llmcli.files import os_error_reason
from llmcli.formats import ours as checkpoint
from llmcli.model.transformer import Transformer
from llmcli.progress import log, progress_bar
from llmcli.runtime import BF16_MIN_WIDTH, FP32_ATTENTION_MAX
from llmcli.train.checkpoints import (
    CHECKPOINTS_DIR,
    checkpoint_dirs,
    checkpoint_tensors,
    clear_leftovers,
    first_val_loss,
    kept_note,
    load_optimizer_state,
    load_train_weights,
    save_checkpoint,
    truncate_metrics,
    whole_tensor,
)
from llmcli.train.optim import learning_rate, make_optimizer


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bfloat16 matrices in hardware: a GPU that supports it, or a CPU with AVX-512
    BF16 or AMX instructions (Linux's /proc/cpuinfo flags). Without them the CPU converts bfloat16 to float32 in
    software and bf16 matmuls run no faster than fp32 ones."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, width: int, device: torch.device) -> str:
    """The precision a run trains in: `auto` is bf16-mixed where the device multiplies bfloat16 natively and the
    model is at least BF16_MIN_WIDTH wide; fp32 elsewhere. Measured on a 2-core Xeon with AMX (benchmarks/train.py):
    bf16-mixed 1.8x fp32 at 6 layers, 384 wide; 0.7x at 4 layers, 128 wide, where casts outweigh faster matmuls."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if width >= BF16_MIN_WIDTH and native_bf16(device) else "fp32"


IGNORE = -100  # a target that carries no loss (a prompt token or padding in fine-tuning)


def next_token_loss(model, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the model's logits against targets of the same leading shape: next tokens (B, T) for a
    language model, labels (B,) for a classifier. Targets equal to IGNORE carry no loss."""
    logits = model(inputs)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction,
                           ignore_index=IGNORE)


def n_targets(targets: torch.Tensor) -> int:
    return int((targets != IGNORE).sum())


# --- processes -------------------------------------------------------------------------------------------------

@dataclass
class World:
    """This process's place among the training processes (one, unless started by torchrun)."""
    rank: int = 0
    size: int = 1
    local_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.size > 1:
            torch.distributed.barrier()


def lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the group went away (gloo: "Connection closed by
    peer"; NCCL, or a timeout: a torch.distributed.DistError)."""
    return isinstance(e, torch.distributed.DistError) or any(
        s in str(e) for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def join_world() -> World:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...), if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", size)), device)


def seed_for(*numbers: int) -> int:
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


class StopSignal:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step; a second one interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class NonFiniteLoss(Exception):
    pass


def train_step(model, optimizer, micro_batches: list, lr: float, grad_clip: float, autocast, world: World,
               stop_requested: bool = False) -> tuple[float, float, bool]:
    """One optimizer update from a list of (inputs, targets) micro-batches: gradients are summed over them with
    the loss normalised by all the tokens of the global batch, so k micro-batches of b give the update of one batch
    of k*b. Returns (mean loss, gradient norm, whether any process asked to stop). Raises NonFiniteLoss before
    touching the weights."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    local_tokens = max(1, sum(n_targets(targets) for _, targets in micro_batches))
    loss_sum = torch.zeros((), device=world.device)
    for i, (inputs, targets) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with _gradient_sync(model, last or world.size == 1):
            with autocast:
                loss = next_token_loss(model, inputs.to(world.device), targets.to(world.device), reduction="sum")
            # each process divides by its own tokens and DDP averages over processes: the mean over all tokens
            (loss / local_tokens).backward()
        loss_sum += loss.detach()
    totals = torch.stack([loss_sum, torch.tensor(float(local_tokens), device=world.device),
                          torch.tensor(float(stop_requested), device=world.device)])
    if world.size > 1:
        torch.distributed.all_reduce(totals)
    mean_loss = (totals[0] / totals[1]).item()
    if not math.isfinite(mean_loss):
        raise NonFiniteLoss(f"the loss became {mean_loss}")
    grad_norm = whole_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)).item()
    if not math.isfinite(grad_norm):
        raise NonFiniteLoss(f"the gradient norm became {grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, bool(totals[2].item())


def _gradient_sync(model, sync: bool):
    """DDP and FSDP reduce gradients across processes once per step, on the last micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext()


@torch.no_grad()
def estimate_val_loss(model, dataset, cfg: TrainConfig, world: World, micro_batch_size: int, autocast) -> float:
    """Mean loss on the same cfg.eval_batches validation batches every time, shared out among the processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=world.device)
    share = cfg.batch_size // world.size
    for index in range(cfg.eval_batches):
        for start in range(world.rank * share, (world.rank + 1) * share, micro_batch_size):
            rows = slice(start, start + micro_batch_size)
            inputs, targets = dataset.batch("val", cfg.batch_size, cfg.seed, index, rows)
            with autocast:
                totals[0] += next_token_loss(model, inputs.to(world.device), targets.to(world.device), "sum")
            totals[1] += n_targets(targets)
    if world.size > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1]).item()


def micro_batch_size(cfg: TrainConfig, world: World) -> int:
    """The sequences of a forward pass, checked against the batch and the processes (cfg.check() has checked the
    rest of the settings); Muon with FSDP is refused."""
    if world.size > 1 and cfg.strategy == "fsdp" and cfg.optimizer == "muon":
        raise LLMError("muon does not go with fsdp: Muon orthogonalizes whole matrices and FSDP holds shards of them; "
                       "use --strategy ddp, or --set train.optimizer=adamw")
    if cfg.batch_size < 1 or cfg.batch_size % world.size:
        raise LLMError(f"the batch size ({cfg.batch_size}) must be a positive multiple of the number of "
                       f"processes ({world.size})")
    share = cfg.batch_size // world.size
    micro = cfg.micro_batch_size or share
    if micro < 1 or share % micro:
        raise LLMError(f"the micro-batch size ({micro}) must divide the batch of each process "
                       f"({cfg.batch_size} / {world.size} processes = {share})")
    return micro


def check_settings(cfg: TrainConfig, world: World) -> int:
    """Clear errors for settings that cannot work, before anything is written; returns the micro-batch size."""
    cfg.check()
    return micro_batch_size(cfg, world)


# --- the Trainer -----------------------------------------------------------------------------------------------------

class Trainer:
    """Trains `model` on `dataset`'s batches for the run's max_steps, validating, saving checkpoints of the run in
    out_dir and stopping cleanly on Ctrl-C. A dataset is any object with batch(split, batch_size, seed, index, rows)
    -> (inputs, targets) drawn from its arguments alone, and tokens(batch_size), the tokens a batch holds. Only the
    parameters that require gradients are trained.

    setup() (once: resume state, sharding, optimizer), then fit() -> summary; validate(step) and save(step, loss)
    are the two things fit does besides steps."""

    def __init__(self, world: World, run, out_dir: Path, model, dataset, command: str = "llm pretrain"):
        self.world, self.run, self.cfg, self.out_dir = world, run, run.train, Path(out_dir)
        self.model, self.dataset, self.command = model, dataset, command
        self.micro = micro_batch_size(self.cfg, world)
        self.say = log if world.is_main else (lambda message: None)
        self.metrics_path = self.out_dir / checkpoint.METRICS_FILE
        self.tokens_per_step = dataset.tokens(self.cfg.batch_size)
        self.start_step, self.best, self.elapsed_before = 0, None, 0.0
        self.started = time.perf_counter()

    def setup(self, resume: bool = False):
        """Load the latest checkpoint's state (resume), shard or replicate the model across the processes, make the
        optimizer and choose the precision; say what will be trained."""
        cfg, world, model = self.cfg, self.world, self.model
        saved_state = self._resume_state() if resume else {}
        if not resume and world.is_main:
            self.metrics_path.unlink(missing_ok=True)
        if world.is_main:
            clear_leftovers(self.out_dir)
        self.train_model = torch.compile(model) if cfg.compile else model
        if world.size > 1 and cfg.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:  # each block's parameters are gathered just before it runs, then freed
                fully_shard(block)
            fully_shard(model)
        elif world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.train_model, device_ids=[world.device] if world.device.type == "cuda" else None)
        self.optimizer = make_optimizer(model, cfg)  # after sharding: FSDP's optimizer holds shards
        load_optimizer_state(saved_state, model, self.optimizer)
        self.precision = resolve_precision(cfg.precision, model.config.n_embd, world.device)
        for module in model.modules():  # (a classifier wraps the Transformer)
            if isinstance(module, Transformer):
                module.attend_in_float32(FP32_ATTENTION_MAX)
        self.autocast = torch.autocast(world.device.type, dtype=torch.bfloat16) \
            if self.precision == "bf16-mixed" else nullcontext()
        self.say(self._describe())
        return self

    def _resume_state(self) -> dict:
        dirs = checkpoint_dirs(self.out_dir)
        if not dirs:
            raise LLMError(f"cannot resume: {self.out_dir} has no checkpoint yet (they are in "
                           f"{self.out_dir / CHECKPOINTS_DIR})")
        meta, saved_state = load_train_weights(dirs[-1], self.model)
        self.start_step, self.elapsed_before = meta["step"], meta.get("time", 0.0)
        self.best = meta.get("best_val_loss")
        if self.world.is_main:
            truncate_metrics(self.metrics_path, self.start_step)
        self.say(f"resuming {self.out_dir} from step {self.start_step} ({dirs[-1].name})")
        if self.start_step >= self.cfg.max_steps:
            raise LLMError(f"{self.out_dir} already reached step {self.start_step} of {self.cfg.max_steps}; "
                           "give a larger --max-steps to train longer")
        return saved_state

    def _describe(self) -> str:
        cfg, world, shape, micro = self.cfg, self.world, self.model.config, self.micro
        share = cfg.batch_size // world.size
        n_params = self.model.num_params()
        n_trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (f"model: {n_params / 1e6:.2f}M parameters" + (f" ({n_trained:,} trained)" if n_trained < n_params
                                                               else "")
                + f", {shape.n_layer} layers, {shape.n_embd} wide, context {shape.context}; {cfg.max_steps} steps of "
                f"{cfg.batch_size} sequences"
                + (f" on {world.size} processes" + (" (fsdp)" if cfg.strategy == "fsdp" else "")
                   if world.size > 1 else "")
                + (f", {share // micro} micro-batches of {micro}" if micro < share else "")
                + f", {self.precision}" + (", compiled" if cfg.compile else ""))

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def record(self, **row):
        """Append a row to metrics.jsonl (process 0)."""
        if not self.world.is_main:
            return
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise LLMError(f"could not write {self.metrics_path}: {os_error_reason(e)}; stopping at step "
                           f"{row['step']}: {kept_note(self.out_dir)}") from None

    def bits_per_byte(self, loss: float) -> float | None:
        """A validation loss (nats per token) in bits per byte of text, where the dataset knows its text's bytes."""
        tokens_per_byte = getattr(self.dataset, "val_tokens_per_byte", None)
        return loss / math.log(2) * tokens_per_byte if tokens_per_byte else None

    def validate(self, step: int) -> float:
        """The validation loss at `step`, recorded (with its bits per byte, val_bpb, where known)."""
        loss = estimate_val_loss(self.train_model, self.dataset, self.cfg, self.world, self.micro, self.autocast)
        bpb = self.bits_per_byte(loss)
        self.record(step=step, val_loss=loss, **({"val_bpb": bpb} if bpb is not None else {}),
                    tokens=step * self.tokens_per_step, time=self._elapsed())
        return loss

    def _val_text(self, loss: float) -> str:
        bpb = self.bits_per_byte(loss)
        return f"val loss {loss:.4f}" + (f" ({bpb:.4f} bits per byte)" if bpb is not None else "")

    def save(self, step: int, val_loss: float | None):
        """A checkpoint of `step` (every process calls it: FSDP gathers shards; process 0 writes)."""
        weights, state = checkpoint_tensors(self.model, self.optimizer, getattr(torch, self.cfg.save_dtype))
        if not all(torch.isfinite(w).all() for w in weights.values()):  # never write a NaN checkpoint
            raise LLMError(f"the weights became non-finite at step {step}; stopping: the last good checkpoint is "
                           f"kept; try a lower learning rate (--lr {self.cfg.lr / 3:.2g})")
        if val_loss is not None and (self.best is None or val_loss < self.best):
            self.best = val_loss
        meta = {"step": step, "val_loss": val_loss, "best_val_loss": self.best,
                "tokens": step * self.tokens_per_step, "time": self._elapsed()}
        if self.world.is_main:
            save_checkpoint(self.out_dir, step, weights, state, self.run.to_dict(), meta, self.cfg.keep_last)

    def step(self, step: int, stop_requested: bool) -> tuple[float, float, bool]:
        """One optimizer update: (training loss, learning rate, whether any process asked to stop)."""
        cfg, world, micro = self.cfg, self.world, self.micro
        share = cfg.batch_size // world.size
        torch.manual_seed(seed_for(cfg.seed, step, world.rank))  # dropout: a function of the step alone
        lr = learning_rate(step - 1, cfg)
        micro_batches = [self.dataset.batch("train", cfg.batch_size, cfg.seed, step, slice(r, r + micro))
                         for r in range(world.rank * share, (world.rank + 1) * share, micro)]
        try:
            loss, grad_norm, stopping = train_step(self.train_model, self.optimizer, micro_batches, lr,
                                                   cfg.grad_clip, self.autocast, world, stop_requested)
        except NonFiniteLoss as e:
            raise LLMError(f"{e} at step {step}; stopping: {kept_note(self.out_dir, 'the last good checkpoint')}; "
                           f"try a lower learning rate (--lr {cfg.lr / 3:.2g})") from None
        self.last_grad_norm = grad_norm
        return loss, lr, stopping

    def fit(self) -> dict:
        """Train from the start (or the resumed step) to max_steps; returns a summary. Ctrl-C saves the step it
        finishes and raises KeyboardInterrupt."""
        cfg = self.cfg
        save_interval = cfg.save_interval or cfg.eval_interval
        self.started = time.perf_counter()
        val_loss = first_loss = None
        if self.start_step == 0:
            first_loss = val_loss = self.validate(0)
            self.say(f"step 0: {self._val_text(val_loss)}")
        self.train_model.train()
        train_loss = float("nan")
        fields = "loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"
        bar = progress_bar("training", cfg.max_steps, fields) if self.world.is_main \
            else nullcontext(lambda **k: None)
        with bar as update, StopSignal() as stop:
            step_started = time.perf_counter()
            for step in range(self.start_step + 1, cfg.max_steps + 1):
                train_loss, lr, stopping = self.step(step, stop.received is not None)
                now = time.perf_counter()
                tokens_per_s = self.tokens_per_step / (now - step_started)
                step_started = now
                self.record(step=step, train_loss=train_loss, lr=lr, grad_norm=self.last_grad_norm,
                            tokens_per_s=tokens_per_s, tokens=step * self.tokens_per_step,
                            time=self.elapsed_before + now - self.started)
                update(completed=step, loss=train_loss, lr=lr, tps=tokens_per_s)
                evaluated = step % cfg.eval_interval == 0 or step == cfg.max_steps
                if evaluated:
                    val_loss = self.validate(step)
                    self.say(f"step {step}: train loss {train_loss:.4f}, {self._val_text(val_loss)}, lr {lr:.2e}, "
                             f"{tokens_per_s:,.0f} tokens/s")
                if stopping or evaluated or step % save_interval == 0:
                    self.save(step, val_loss if evaluated else None)
                    step_started = time.perf_counter()  # evaluation and saving are not training time
                if stopping:
                    self.say(f"interrupted at step {step}; the checkpoint is saved in {self.out_dir}; "
                             f"continue with: {self.command} --resume {self.out_dir}")
                    raise KeyboardInterrupt
        return self._finish(first_loss, val_loss, train_loss)

    def _finish(self, first_loss, val_loss, train_loss) -> dict:
        """The summary of a finished run, also written into the run's config.yaml."""
        cfg, elapsed = self.cfg, self._elapsed()
        n_params = self.model.num_params()
        summary = {
            "steps": cfg.max_steps, "tokens": cfg.max_steps * self.tokens_per_step, "parameters": n_params,
            "trained_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "first_val_loss": first_loss if first_loss is not None else first_val_loss(self.metrics_path),
            "val_loss": val_loss, "train_loss": train_loss, "precision": self.precision,
            "seconds": round(elapsed, 1), "tokens_per_s": round(cfg.max_steps * self.tokens_per_step / elapsed),
            "checkpoint": str(self.out_dir),
        }
        if val_loss is not None and self.bits_per_byte(val_loss) is not None:
            summary["val_bpb"] = self.bits_per_byte(val_loss)
        if self.world.is_main:
            self.run.summary = summary
            self.run.save(self.out_dir)
        return summary
