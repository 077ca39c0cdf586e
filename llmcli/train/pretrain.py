"""Pretraining: corpus -> tokenizer -> token shards -> a Transformer trained on next-token prediction.

AdamW with weight decay on matrices only, warmup then cosine, linear or warmup-stable-decay, gradient clipping,
gradient accumulation over micro-batches, bfloat16 autocast where it pays (precision auto), optional torch.compile,
and data parallelism across processes started by torchrun: DistributedDataParallel, or FSDP (fully_shard) to shard
parameters, gradients and optimizer state; gloo on CPU, NCCL on GPU. Checkpoints hold whole tensors, so any number
of processes resumes any.

Nothing is lost: every save_interval steps a checkpoint directory is written under a temporary name and renamed into
place (checkpoints/step-NNNNNNN, holding the weights, the optimizer state in safetensors and the step in JSON), and
`--resume` continues from the latest one exactly. A run needs no saved random state: the batch of step s is drawn
from (seed, s) and dropout is seeded from (seed, s, rank), so a resumed run repeats an uninterrupted one bit for bit.
Ctrl-C (or SIGTERM) finishes the step, saves and exits 130; a non-finite loss stops before the update is applied.
"""

import dataclasses
import json
import math
import os
import secrets
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmcli.config import TrainConfig, resolve_run_config
from llmcli.errors import PEER_STOPPED, LLMError
from llmcli.files import atomic_write, file_mode, make_output_dir, os_error_reason
from llmcli.formats import ours as checkpoint
from llmcli.model.transformer import ModelConfig, Transformer
from llmcli.progress import log, progress_bar
from llmcli.text import data
from llmcli.text.tokenizer import Tokenizer, load_tokenizer, tokenizer_files, train_tokenizer
from llmcli.runtime import BF16_MIN_WIDTH, FP32_ATTENTION_MAX, default_threads

SAVE_DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "wsd")
PRECISIONS = ("auto", "fp32", "bf16-mixed")
STRATEGIES = ("ddp", "fsdp")
CHECKPOINTS_DIR = "checkpoints"
TRAIN_STATE_FILE = "train_state.safetensors"  # optimizer moments (and fp32 weights when saved in a lower precision)
TRAIN_STATE_META = "train_state.json"  # step, validation loss, tokens seen, time


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then down to cfg.lr * cfg.min_lr_ratio at cfg.max_steps: by a cosine, a straight
    line, or (wsd) flat until the last decay_fraction of the steps and a straight line from there."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - int(cfg.decay_fraction * cfg.max_steps)
        decay_start = max(decay_start, cfg.warmup_steps)
        progress = min(1.0, max(0, step - decay_start) / max(1, cfg.max_steps - decay_start))
        return cfg.lr - (cfg.lr - min_lr) * progress
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


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


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    # decay matrices (weights, embeddings); leave biases and norm gains alone
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


IGNORE = -100  # a target that carries no loss (a prompt token or padding in fine-tuning)


def next_token_loss(model, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the model's logits against targets of the same leading shape: next tokens (B, T) for a
    language model, labels (B,) for a classifier. Targets equal to IGNORE carry no loss."""
    logits = model(inputs)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction,
                           ignore_index=IGNORE)


def n_targets(targets: torch.Tensor) -> int:
    return int((targets != IGNORE).sum())


class LMBatches:
    """The loop's dataset for pretraining: random windows of a token file, inputs and next tokens. A dataset is any
    object with batch(split, batch_size, seed, index, rows) -> (inputs, targets) drawn from its arguments alone, and
    tokens(batch_size), the tokens a batch holds (for tokens/s)."""

    def __init__(self, token_data: data.TokenData, context: int):
        self.token_data, self.context = token_data, context

    def batch(self, split: str, batch_size: int, seed: int, index: int, rows: slice | None = None):
        return self.token_data.batch(split, batch_size, self.context, seed, index, rows)

    def tokens(self, batch_size: int) -> int:
        return batch_size * self.context


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


def _seed_for(*numbers: int) -> int:
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


# --- checkpoints ---------------------------------------------------------------------------------------------------

def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a temporary directory left by a kill is not one)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / TRAIN_STATE_META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def saved_weights(model) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: every weight, or only the trained ones when some are frozen (the frozen ones are
    a base model's, which the checkpoint's config names: see llmcli.lora)."""
    if all(p.requires_grad for p in model.parameters()):
        return model.state_dict()
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (gathered from all processes: every process must call this), else itself."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().contiguous()


def checkpoint_tensors(model: Transformer, optimizer: torch.optim.Optimizer, save_dtype
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights in save_dtype, training state: optimizer moments and, when the weights are rounded, the fp32
    weights), as whole tensors. Under FSDP every process must call it: the shards are gathered."""
    if hasattr(model, "reshard"):  # FSDP leaves the root's parameters gathered after a forward without gradients
        model.reshard()
    names = {p: n for n, p in model.named_parameters()}
    weights = {k: _whole(v) for k, v in saved_weights(model).items()}
    state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                state[f"optimizer.{names[p]}.{key}"] = _whole(value)
    if save_dtype != torch.float32:  # the weights on disk are rounded: keep the fp32 ones to resume exactly
        state.update({f"weights.{k}": v for k, v in weights.items()})
    return {k: v.to(save_dtype) for k, v in weights.items()}, state


def _fsync_tree(directory: Path):
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, weights: dict, state: dict, run: dict, meta: dict, keep_last: int
                    ) -> Path:
    """Write checkpoints/step-NNNNNNN atomically (temporary directory, then rename), point the run directory's
    model.safetensors at it, and delete old checkpoints beyond the last keep_last and the best."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=file_mode(directory=True))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=file_mode(directory=True))  # exclusive: fails on anything left at that name
        save_file(weights, str(tmp / checkpoint.MODEL_FILE), metadata={"step": str(step)})
        save_file(state, str(tmp / TRAIN_STATE_FILE))
        for file in tokenizer_files(run_dir):
            shutil.copyfile(file, tmp / file.name)
        config = {"format": checkpoint.FORMAT, **run, "checkpoint": meta}
        (tmp / checkpoint.CONFIG_FILE).write_text(yaml_dump(config), encoding="utf-8")
        (tmp / TRAIN_STATE_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for path in tmp.iterdir():  # safetensors creates its files 0600: the one mode policy (file_mode)
            os.chmod(path, file_mode())
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (an interrupt right after a save): swap it
            old = root / f".old-{final.name}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        # the run directory itself stays a checkpoint of the latest weights: a hard link costs no space
        link = run_dir / f".{checkpoint.MODEL_FILE}.{secrets.token_hex(8)}.tmp"
        try:
            os.link(final / checkpoint.MODEL_FILE, link)
        except OSError:
            shutil.copyfile(final / checkpoint.MODEL_FILE, link)
        os.replace(link, run_dir / checkpoint.MODEL_FILE)
    except (OSError, SafetensorError) as e:  # a full disk, a quota, a file size limit
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoint_dirs(run_dir)
        kept = f"the previous checkpoint ({previous[-1]}) is intact" if previous else "no earlier checkpoint exists"
        reason = getattr(e, "strerror", None) or str(e).rsplit(": ", 1)[-1]
        raise LLMError(f"could not save the checkpoint of step {step} in {root}: {reason}; {kept}") from None
    _prune_checkpoints(run_dir, keep_last)
    return final


def _prune_checkpoints(run_dir: Path, keep_last: int):
    dirs = checkpoint_dirs(run_dir)
    metas = {p: json.loads((p / TRAIN_STATE_META).read_text()) for p in dirs}
    with_val = [p for p in dirs if metas[p].get("val_loss") is not None]
    keep = set(dirs[-max(1, keep_last):])
    if with_val:
        keep.add(min(with_val, key=lambda p: metas[p]["val_loss"]))
    for path in dirs:
        if path not in keep:
            # renamed first, so that a kill while deleting leaves no half checkpoint, only a leftover removed at start
            doomed = path.with_name(f".old-{path.name}")
            try:
                os.rename(path, doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)


def load_train_state(directory: Path, model: Transformer, optimizer) -> dict:
    """Put a checkpoint's weights and optimizer state into model and optimizer; return its metadata."""
    meta, state = load_train_weights(directory, model)
    load_optimizer_state(state, model, optimizer)
    return meta


def load_train_weights(directory: Path, model: Transformer) -> tuple[dict, dict]:
    """Put a checkpoint's weights into the (not yet sharded) model; return its metadata and training state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / TRAIN_STATE_META).read_text(encoding="utf-8"))
        state = load_file(str(directory / TRAIN_STATE_FILE))
        weights = {k[len("weights."):]: v for k, v in state.items() if k.startswith("weights.")}
        if not weights:
            weights = load_file(str(directory / checkpoint.MODEL_FILE))
        expected = saved_weights(model)
        if set(weights) != set(expected):
            raise ValueError(f"its weights are not this model's ({len(weights)} tensors, expected {len(expected)})")
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:
        raise LLMError(f"cannot resume from {directory}: {str(e).splitlines()[0]}") from None
    return meta, state


def load_optimizer_state(state: dict, model: Transformer, optimizer):
    """Put the saved optimizer moments of each parameter into optimizer, sharded like the parameter under FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        moments = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == f"optimizer.{name}"}
        for key, value in moments.items():
            value = value.to(p.device)
            if isinstance(p, DTensor) and value.shape == p.shape:
                value = distribute_tensor(value, p.device_mesh, p.placements)
            moments[key] = value
        if moments:
            optimizer.state[p] = moments


def yaml_dump(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


# --- the steps -----------------------------------------------------------------------------------------------------

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
        group["lr"] = lr
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
    grad_norm = _whole(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)).item()
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


# --- the run ---------------------------------------------------------------------------------------------------------

def prepare_tokenizer(corpus: list, out_dir: Path, run: dict, tokenizer) -> Tokenizer:
    """Save the given tokenizer (a loaded one, or a path load_tokenizer reads) into the run, or train one on the
    corpus."""
    if tokenizer is not None:
        if not hasattr(tokenizer, "save"):
            tokenizer = load_tokenizer(tokenizer)
        if Path(tokenizer.path).resolve().parent != out_dir.resolve():
            tokenizer.save(out_dir)
        if "init" not in run:  # a model continued from a checkpoint keeps its own embedding size
            run["model"]["vocab_size"] = tokenizer.vocab_size
        return load_tokenizer(out_dir)
    vocab_size = run["model"]["vocab_size"]
    train = run["train"]
    log(f"training a {train['tokenizer_type']} tokenizer with {vocab_size} tokens")
    lines = data.training_lines(corpus, train["text_field"], train["doc_separator"])
    tokenizer = train_tokenizer(lines, out_dir, vocab_size, train["tokenizer_type"])
    run["model"]["vocab_size"] = tokenizer.vocab_size  # (char: fewer when the corpus has fewer characters)
    return tokenizer


def check_settings(cfg: TrainConfig, world: World) -> int:
    """Clear errors for settings that cannot work, before anything is written; returns the micro-batch size."""
    limits = [("max_steps", 1, None), ("lr", 0, None), ("warmup_steps", 0, None), ("eval_interval", 1, None),
              ("eval_batches", 1, None), ("save_interval", 0, None), ("keep_last", 0, None), ("threads", 0, None),
              ("micro_batch_size", 0, None), ("weight_decay", 0, None), ("grad_clip", 0, None),
              ("min_lr_ratio", 0, 1), ("beta1", 0, 1), ("beta2", 0, 1), ("val_fraction", 0, 1),
              ("decay_fraction", 0, 1)]
    for name, low, high in limits:
        value = getattr(cfg, name)
        positive = name in ("lr", "grad_clip", "val_fraction")  # where 0 cannot work either
        too_high = high is not None and value > high
        if not math.isfinite(value) or value < low or (positive and value <= low) or too_high:
            bound = (f"between {low} and {high}" if high is not None else
                     f"above {low}" if positive else f"at least {low}")
            option = f"--{name.replace('_', '-')}"
            raise LLMError(f"{name} ({option}) must be {bound}, not {value}")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise LLMError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {cfg.save_dtype!r}")
    if cfg.schedule not in SCHEDULES:
        raise LLMError(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.precision not in PRECISIONS:
        raise LLMError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.strategy not in STRATEGIES:
        raise LLMError(f"strategy must be one of {', '.join(STRATEGIES)}, got {cfg.strategy!r}")
    if cfg.batch_size < 1 or cfg.batch_size % world.size:
        raise LLMError(f"the batch size ({cfg.batch_size}) must be a positive multiple of the number of "
                       f"processes ({world.size})")
    share = cfg.batch_size // world.size
    micro = cfg.micro_batch_size or share
    if micro < 1 or share % micro:
        raise LLMError(f"the micro-batch size ({micro}) must divide the batch of each process "
                       f"({cfg.batch_size} / {world.size} processes = {share})")
    return micro


def _resolve_run(corpus, out_dir, preset, config_file, overrides, tokenizer_path, resume) -> tuple[dict, Path]:
    if resume is None:
        return resolve_run_config(preset, config_file, overrides or {}), Path(out_dir)
    run_dir = Path(resume)
    if not run_dir.is_dir():
        raise LLMError(f"cannot resume: {run_dir} is not a run directory")
    run = checkpoint.read_config(run_dir)
    run.pop("format", None)
    run.pop("summary", None)
    if corpus or preset or config_file or tokenizer_path:
        raise LLMError("--resume continues a run with its own corpus and settings; give only the run directory "
                       "(and --max-steps to train longer)")
    allowed = {"max_steps", "eval_interval", "save_interval", "keep_last", "threads", "micro_batch_size", "compile",
               "strategy"}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in allowed:
            raise LLMError(f"--resume keeps the run's settings; {key} cannot change (only {', '.join(sorted(allowed))})")
        run["train"][key] = value
    return run, run_dir


def pretrain(
    corpus: list[str] | None,
    out_dir: str | Path | None,
    preset: str | None = None,
    config_file: str | None = None,
    overrides: dict | None = None,
    tokenizer_path: str | None = None,
    resume: str | Path | None = None,
    init: str | Path | None = None,
) -> dict:
    """Train a model on the corpus ('-' for stdin) into out_dir, or continue the run in `resume` from its latest
    checkpoint; `init`: start from that checkpoint's weights, shape and tokenizer (continued pretraining). Returns a
    summary. Under torchrun, every process calls this; process 0 alone writes."""
    world = join_world()
    try:
        summary = _pretrain(world, corpus, out_dir, preset, config_file, overrides, tokenizer_path, resume, init)
        # a finished run's processes leave together: tearing the group down while another process still talks to
        # it took that one down at exit once (FSDP on gloo: "terminate called without an active exception")
        world.barrier()
        return summary
    except RuntimeError as e:
        if world.size > 1 and lost_peer(e):  # the process that stopped first says why; `llm` says this only if none did
            raise LLMError(PEER_STOPPED) from None
        raise
    finally:
        if world.size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _initial_model(init: str | Path, run: dict) -> tuple[dict, Path]:
    """The weights and tokenizer of the model (any format load_model reads) a run starts from; its shape replaces
    the run's model settings, but for dropout."""
    from llmcli.formats import load_model

    model, tokenizer, _ = load_model(init)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LLMError(f"{init}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                       f"{model.config.vocab_size} embeddings")
    run["model"] = {**dataclasses.asdict(model.config), "dropout": run["model"].get("dropout", 0.0)}
    run["init"] = str(init)
    return model.state_dict(), tokenizer


def _pretrain(world, corpus, out_dir, preset, config_file, overrides, tokenizer_path, resume, init=None) -> dict:
    run, out_dir = _resolve_run(corpus, out_dir, preset, config_file, overrides, tokenizer_path, resume)
    initial_weights = None
    if init is not None:
        if resume is not None or tokenizer_path is not None:
            raise LLMError("--init starts a new run from a checkpoint's weights and tokenizer; it does not go with "
                           "--resume or --tokenizer")
        initial_weights, tokenizer_path = _initial_model(init, run)
    try:
        cfg = TrainConfig(**run["train"])
    except (TypeError, ValueError) as e:
        raise LLMError(f"bad settings: {e}") from None
    micro = check_settings(cfg, world)
    torch.set_num_threads(cfg.threads or default_threads(world.local_size))

    if resume is None:
        if out_dir.exists() and not out_dir.is_dir():
            raise LLMError(f"{out_dir} exists and is not a directory")
        if out_dir.is_dir() and checkpoint_dirs(out_dir):
            raise LLMError(f"{out_dir} already holds a training run; continue it with --resume {out_dir}, "
                           "or choose another directory")
        if world.is_main:
            made = not out_dir.exists()
            try:
                _prepare_data(corpus, out_dir, run, tokenizer_path, cfg)
                # the checks every process makes below, made here too while a failed start can still be undone
                data.TokenData(Path(run["data"]["token_dir"]), cfg.val_fraction).check_fits(
                    _model_config(run).context, cfg.val_fraction)
            except BaseException:
                if made:  # a run that could not start leaves nothing half-made behind
                    shutil.rmtree(out_dir, ignore_errors=True)
                raise
        world.barrier()
        run = checkpoint.read_config(out_dir)  # every process trains on what process 0 prepared
        run.pop("format", None)
    token_data = data.TokenData(Path(run["data"]["token_dir"]), cfg.val_fraction) \
        if Path(run["data"]["token_dir"], data.INDEX_FILE).is_file() else None
    if token_data is None:  # the cache was cleared since: tokenize again, the same corpus
        check_corpus_unchanged(run, out_dir, cfg)
        if world.is_main:
            _tokenize(run["data"]["corpus"], out_dir, run, cfg)
        world.barrier()
        token_data = data.TokenData(Path(run["data"]["token_dir"]), cfg.val_fraction)
    if token_data.n_tokens != run["data"]["tokens"]:
        raise LLMError(f"cannot {'resume' if resume is not None else 'train'}: the run recorded "
                       f"{run['data']['tokens']:,} tokens of corpus but its token shards hold {token_data.n_tokens:,}")
    model_config = _model_config(run)
    token_data.check_fits(model_config.context, cfg.val_fraction)

    torch.manual_seed(cfg.seed)
    model = Transformer(model_config).to(world.device)
    if initial_weights is not None:
        model.load_state_dict(initial_weights)
    return train_loop(world, run, cfg, out_dir, model, LMBatches(token_data, model_config.context), micro,
                      resume=resume is not None)


def _model_config(run: dict) -> ModelConfig:
    try:
        return ModelConfig(**run["model"])
    except (TypeError, ValueError) as e:
        raise LLMError(f"bad model settings: {e}") from None


def train_loop(world: World, run: dict, cfg: TrainConfig, out_dir: Path, model, dataset, micro: int,
               resume: bool = False, command: str = "llm pretrain") -> dict:
    """Train model on dataset's batches (see LMBatches) for cfg.max_steps, validating, saving checkpoints of `run`
    in out_dir and stopping cleanly on Ctrl-C; with resume, continue from out_dir's latest checkpoint. Only the
    parameters that require gradients are trained. Returns a summary."""
    say = log if world.is_main else (lambda message: None)
    save_dtype = getattr(torch, cfg.save_dtype)
    start_step, best, elapsed_before, saved_state = 0, None, 0.0, {}
    metrics_path = out_dir / checkpoint.METRICS_FILE
    if resume:
        dirs = checkpoint_dirs(out_dir)
        if not dirs:
            raise LLMError(f"cannot resume: {out_dir} has no checkpoint yet (they are in {out_dir / CHECKPOINTS_DIR})")
        meta, saved_state = load_train_weights(dirs[-1], model)
        start_step, elapsed_before = meta["step"], meta.get("time", 0.0)
        best = meta.get("best_val_loss")
        if world.is_main:
            _truncate_metrics(metrics_path, start_step)
        say(f"resuming {out_dir} from step {start_step} ({dirs[-1].name})")
        if start_step >= cfg.max_steps:
            raise LLMError(f"{out_dir} already reached step {start_step} of {cfg.max_steps}; "
                           "give a larger --max-steps to train longer")
    elif world.is_main:
        metrics_path.unlink(missing_ok=True)
    if world.is_main:  # left by a kill during a save or a prune
        for leftover in [*(out_dir / CHECKPOINTS_DIR).glob(".*-step-*"), *out_dir.glob(f".{checkpoint.MODEL_FILE}.*")]:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    train_model = torch.compile(model) if cfg.compile else model
    if world.size > 1 and cfg.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:  # each block's parameters are gathered just before it runs, then freed
            fully_shard(block)
        fully_shard(model)
    elif world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[world.device] if world.device.type == "cuda"
                                              else None)
    optimizer = make_optimizer(model, cfg)  # after sharding: FSDP's optimizer holds shards
    load_optimizer_state(saved_state, model, optimizer)
    precision = resolve_precision(cfg.precision, model.config.n_embd, world.device)
    model.attend_in_float32(FP32_ATTENTION_MAX)
    autocast = torch.autocast(world.device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" \
        else nullcontext()

    tokens_per_step = dataset.tokens(cfg.batch_size)
    save_interval = cfg.save_interval or cfg.eval_interval
    share = cfg.batch_size // world.size
    n_params = model.num_params()
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = model.config
    say(f"model: {n_params / 1e6:.2f}M parameters" + (f" ({n_trained:,} trained)" if n_trained < n_params else "")
        + f", {shape.n_layer} layers, {shape.n_embd} wide, context {shape.context}; {cfg.max_steps} steps of "
        f"{cfg.batch_size} sequences"
        + (f" on {world.size} processes" + (" (fsdp)" if cfg.strategy == "fsdp" else "") if world.size > 1 else "")
        + (f", {share // micro} micro-batches of {micro}" if micro < share else "")
        + f", {precision}" + (", compiled" if cfg.compile else ""))

    def record(**row):
        if world.is_main:
            try:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                last = checkpoint_dirs(out_dir)
                kept = f"the last checkpoint ({last[-1]}) is kept" if last else "no checkpoint was saved"
                raise LLMError(f"could not write {metrics_path}: {os_error_reason(e)}; stopping at step "
                               f"{row['step']}: {kept}") from None

    def save(step: int, val_loss: float | None):
        nonlocal best
        weights, state = checkpoint_tensors(model, optimizer, save_dtype)  # every process: FSDP gathers shards
        if not all(torch.isfinite(w).all() for w in weights.values()):  # never write a NaN checkpoint
            raise LLMError(f"the weights became non-finite at step {step}; stopping: the last good checkpoint is "
                           f"kept; try a lower learning rate (--lr {cfg.lr / 3:.2g})")
        if val_loss is not None and (best is None or val_loss < best):
            best = val_loss
        meta = {"step": step, "val_loss": val_loss, "best_val_loss": best, "tokens": step * tokens_per_step,
                "time": elapsed_before + time.perf_counter() - started}
        if world.is_main:
            save_checkpoint(out_dir, step, weights, state, run, meta, cfg.keep_last)

    def validate(step: int) -> float:
        loss = estimate_val_loss(train_model, dataset, cfg, world, micro, autocast)
        record(step=step, val_loss=loss, tokens=step * tokens_per_step,
               time=elapsed_before + time.perf_counter() - started)
        return loss

    started = time.perf_counter()
    val_loss = first_val_loss = None
    if start_step == 0:
        first_val_loss = val_loss = validate(0)
        say(f"step 0: val loss {val_loss:.4f}")
    train_model.train()
    train_loss, step = float("nan"), start_step
    fields = "loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"
    bar = progress_bar("training", cfg.max_steps, fields) if world.is_main else nullcontext(lambda **k: None)
    with bar as update, StopSignal() as stop:
        step_started = time.perf_counter()
        for step in range(start_step + 1, cfg.max_steps + 1):
            torch.manual_seed(_seed_for(cfg.seed, step, world.rank))  # dropout: a function of the step alone
            lr = learning_rate(step - 1, cfg)
            micro_batches = [dataset.batch("train", cfg.batch_size, cfg.seed, step, slice(r, r + micro))
                             for r in range(world.rank * share, (world.rank + 1) * share, micro)]
            try:
                train_loss, grad_norm, stopping = train_step(train_model, optimizer, micro_batches, lr,
                                                             cfg.grad_clip, autocast, world, stop.received is not None)
            except NonFiniteLoss as e:
                last = checkpoint_dirs(out_dir)
                kept = f"the last good checkpoint ({last[-1]}) is kept" if last else "no checkpoint was saved"
                raise LLMError(f"{e} at step {step}; stopping: {kept}; try a lower learning rate "
                               f"(--lr {cfg.lr / 3:.2g})") from None
            now = time.perf_counter()
            tokens_per_s = tokens_per_step / (now - step_started)
            step_started = now
            record(step=step, train_loss=train_loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                   tokens=step * tokens_per_step, time=elapsed_before + now - started)
            update(completed=step, loss=train_loss, lr=lr, tps=tokens_per_s)
            evaluated = step % cfg.eval_interval == 0 or step == cfg.max_steps
            if evaluated:
                val_loss = validate(step)
                say(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, lr {lr:.2e}, "
                    f"{tokens_per_s:,.0f} tokens/s")
            if stopping or evaluated or step % save_interval == 0:
                save(step, val_loss if evaluated else None)
                step_started = time.perf_counter()  # evaluation and saving are not training time
            if stopping:
                say(f"interrupted at step {step}; the checkpoint is saved in {out_dir}; "
                    f"continue with: {command} --resume {out_dir}")
                raise KeyboardInterrupt
    elapsed = elapsed_before + time.perf_counter() - started
    summary = {
        "steps": cfg.max_steps, "tokens": cfg.max_steps * tokens_per_step, "parameters": n_params,
        "trained_parameters": n_trained,
        "first_val_loss": first_val_loss if first_val_loss is not None else _first_val_loss(metrics_path),
        "val_loss": val_loss, "train_loss": train_loss,
        "precision": precision, "seconds": round(elapsed, 1), "tokens_per_s": round(cfg.max_steps * tokens_per_step / elapsed),
        "checkpoint": str(out_dir),
    }
    if world.is_main:
        run["summary"] = summary
        checkpoint.write_config(out_dir, run)
    return summary


def _first_val_loss(metrics_path: Path):
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "val_loss" in row:
            return row["val_loss"]
    return None


def _truncate_metrics(path: Path, step: int):
    """Drop the rows of steps after the checkpoint: the resumed run writes them again."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _row_step(line) is not None and _row_step(line) <= step]
    atomic_write(path, "".join(r + "\n" for r in rows))


def _row_step(line: str):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None  # a row cut short by a kill


def _prepare_data(corpus, out_dir: Path, run: dict, tokenizer_path, cfg: TrainConfig):
    """Process 0: the tokenizer and the token shards of the corpus, and the run's config.yaml that names them."""
    corpus = data.expand_corpus(corpus or [])
    make_output_dir(out_dir)
    if "-" in corpus:  # stdin can be read once; the tokenizer and the tokenization both need it
        stdin_copy = str(data.save_stdin(out_dir / "data" / "stdin.txt"))
        corpus = [stdin_copy if p == "-" else p for p in corpus]
    tokenizer = prepare_tokenizer(corpus, out_dir, run, tokenizer_path)
    run["tokenizer"] = {"file": tokenizer.path.name, "vocab_size": tokenizer.vocab_size}
    _tokenize(corpus, out_dir, run, cfg)


def check_corpus_unchanged(run: dict, out_dir: Path, cfg: TrainConfig):
    """A run's corpus must be the bytes it was started on: its hash (with the tokenizer's and the settings of
    how documents split) must be the one recorded, which names the token shards in the cache."""
    corpus = run["data"]["corpus"]
    missing = [p for p in corpus if not Path(p).is_file()]
    if missing:
        raise LLMError(f"cannot resume {out_dir}: its corpus file {missing[0]} is gone (the token cache was "
                       "cleared too, so the run's data cannot be had again)")
    recorded = run["data"].get("hash") or Path(run["data"]["token_dir"]).name
    now = data.corpus_hash(corpus, load_tokenizer(out_dir), cfg.text_field, cfg.doc_separator)
    if now != recorded:
        raise LLMError(f"cannot resume {out_dir}: its corpus ({', '.join(corpus)}) has changed since the run "
                       f"started (hash {now[:12]}, recorded {recorded[:12]}, {run['data']['tokens']:,} tokens); "
                       "put the original back, or start a new run on the new text")


def _tokenize(corpus: list[str], out_dir: Path, run: dict, cfg: TrainConfig):
    tokenizer = load_tokenizer(out_dir)
    total_bytes = sum(os.path.getsize(p) for p in corpus)
    started = time.perf_counter()
    with progress_bar("tokenizing", total_bytes) as update:
        token_dir = data.cached_tokens(corpus, tokenizer, cfg.text_field, cfg.doc_separator,
                                       progress=lambda n: update(advance=n), log=log)
    token_data = data.TokenData(token_dir, cfg.val_fraction)
    seconds = time.perf_counter() - started
    log(f"{total_bytes / 1e6:.1f} MB of text, {token_data.n_tokens:,} tokens in {token_dir} ({seconds:.1f}s)")
    run["data"] = {"corpus": corpus, "token_dir": str(token_dir), "hash": token_dir.name,
                   "tokens": token_data.n_tokens,
                   "train_tokens": token_data.split_len("train"), "val_tokens": token_data.split_len("val")}
    checkpoint.write_config(out_dir, run)
