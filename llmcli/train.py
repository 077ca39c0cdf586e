"""Pretraining: corpus -> tokenizer -> token file -> a Transformer trained on next-token prediction.

AdamW with weight decay on matrices only, linear warmup then cosine decay, gradient clipping, a fixed seed.
Validation loss is measured every eval_interval steps on the same held-out batches, and the checkpoint is saved then.
"""

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcli import checkpoint, data
from llmcli.config import TrainConfig, resolve_run_config
from llmcli.errors import LLMError
from llmcli.model import ModelConfig, Transformer
from llmcli.progress import log, progress_bar
from llmcli.tokenizer import TOKENIZER_FILE, Tokenizer, train_tokenizer

SAVE_DTYPES = ("float32", "bfloat16", "float16")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    # decay matrices (weights, embeddings); leave biases and norm gains alone
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def next_token_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


@torch.no_grad()
def estimate_val_loss(model: Transformer, token_data: data.TokenData, cfg: TrainConfig, context: int) -> float:
    """Mean loss on the same cfg.eval_batches validation batches every time, so evaluations compare."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    was_training = model.training
    model.eval()
    losses = [next_token_loss(model, *token_data.get_batch("val", cfg.batch_size, context, generator)).item()
              for _ in range(cfg.eval_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def prepare_tokenizer(corpus: list, out_dir: Path, run: dict, tokenizer_path: str | None) -> Tokenizer:
    """Copy the given tokenizer into the run, or train one on the corpus."""
    target = out_dir / TOKENIZER_FILE
    if tokenizer_path is not None:
        tokenizer = Tokenizer(tokenizer_path)
        if tokenizer.path.resolve() != target.resolve():
            shutil.copyfile(tokenizer.path, target)
        run["model"]["vocab_size"] = tokenizer.vocab_size
        return Tokenizer(target)
    vocab_size = run["model"]["vocab_size"]
    log(f"training a {run['train']['tokenizer_type']} tokenizer with {vocab_size} tokens")
    lines = (line for path in corpus for line in data.read_lines(path))
    tokenizer = train_tokenizer(lines, out_dir, vocab_size, run["train"]["tokenizer_type"])
    return tokenizer


def pretrain(
    corpus: list[str],
    out_dir: str | Path,
    preset: str | None = None,
    config_file: str | None = None,
    overrides: dict | None = None,
    tokenizer_path: str | None = None,
) -> dict:
    """Train a model on the corpus files ('-' for stdin) and write a checkpoint to out_dir. Returns a summary."""
    run = resolve_run_config(preset, config_file, overrides or {})
    cfg = TrainConfig(**run["train"])
    if cfg.save_dtype not in SAVE_DTYPES:
        raise LLMError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {cfg.save_dtype!r}")
    save_dtype = getattr(torch, cfg.save_dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LLMError(f"{out_dir} exists and is not a directory")
    corpus = [str(data.check_text_file(p)) if p != "-" else p for p in corpus]
    if not corpus:
        raise LLMError("no corpus given")
    out_dir.mkdir(parents=True, exist_ok=True)
    if "-" in corpus:  # stdin can be read once; the tokenizer and the tokenization both need it
        stdin_copy = str(data.save_stdin(out_dir / "data" / "stdin.txt"))
        corpus = [stdin_copy if p == "-" else p for p in corpus]

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    tokenizer = prepare_tokenizer(corpus, out_dir, run, tokenizer_path)
    token_file = out_dir / "data" / "tokens.bin"
    total_bytes = sum(os.path.getsize(p) for p in corpus)
    with progress_bar("tokenizing", total_bytes) as update:
        started = time.perf_counter()
        n_tokens = data.tokenize_corpus(corpus, tokenizer, token_file, progress=lambda n: update(advance=n))
    log(f"tokenized {total_bytes / 1e6:.1f} MB into {n_tokens:,} tokens in {time.perf_counter() - started:.1f}s")
    token_data = data.TokenData(token_file, tokenizer.vocab_size, cfg.val_fraction)
    try:
        model_config = ModelConfig(**run["model"])
    except (TypeError, ValueError) as e:
        raise LLMError(f"bad model settings: {e}") from None
    token_data.check_fits(model_config.context, cfg.val_fraction)

    model = Transformer(model_config)
    optimizer = make_optimizer(model, cfg)
    run["tokenizer"] = {"file": TOKENIZER_FILE, "vocab_size": tokenizer.vocab_size}
    run["data"] = {"corpus": corpus, "tokens": n_tokens, "train_tokens": len(token_data.split("train")),
                   "val_tokens": len(token_data.split("val"))}
    checkpoint.write_config(out_dir, run)
    metrics_path = out_dir / checkpoint.METRICS_FILE
    metrics_path.unlink(missing_ok=True)
    n_params = model.num_params()
    log(f"model: {n_params / 1e6:.2f}M parameters, {model_config.n_layer} layers, {model_config.n_embd} wide, "
        f"context {model_config.context}; {cfg.max_steps} steps of {cfg.batch_size} x {model_config.context} tokens")

    def record(**row):
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def evaluate_and_save(step: int) -> float:
        val_loss = estimate_val_loss(model, token_data, cfg, model_config.context)
        record(step=step, val_loss=val_loss, tokens=step * tokens_per_step, time=time.perf_counter() - started)
        if step > 0:
            checkpoint.save_model(out_dir, model, {"step": step, "val_loss": val_loss}, save_dtype)
        return val_loss

    tokens_per_step = cfg.batch_size * model_config.context
    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    first_val_loss = val_loss = evaluate_and_save(0)
    log(f"step 0: val loss {val_loss:.4f}")
    model.train()
    train_loss, step = float("nan"), 0
    fields = "loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"
    with progress_bar("training", cfg.max_steps, fields) as update:
        try:
            step_started = time.perf_counter()
            for step in range(1, cfg.max_steps + 1):
                lr = learning_rate(step - 1, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                inputs, targets = token_data.get_batch("train", cfg.batch_size, model_config.context, generator)
                loss = next_token_loss(model, inputs, targets)
                train_loss = loss.item()
                if not math.isfinite(train_loss):
                    raise LLMError(f"the loss became {train_loss} at step {step}; the last good checkpoint is kept "
                                   f"in {out_dir}; try a lower learning rate (--lr {cfg.lr / 3:.2g})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                optimizer.step()
                now = time.perf_counter()
                tokens_per_s = tokens_per_step / (now - step_started)
                step_started = now
                record(step=step, train_loss=train_loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                       tokens=step * tokens_per_step, time=now - started)
                update(completed=step, loss=train_loss, lr=lr, tps=tokens_per_s)
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    val_loss = evaluate_and_save(step)
                    log(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, lr {lr:.2e}, "
                        f"{tokens_per_s:,.0f} tokens/s")
                    step_started = time.perf_counter()  # evaluation time is not training time
        except KeyboardInterrupt:
            checkpoint.save_model(out_dir, model, {"step": step}, save_dtype)
            log(f"interrupted at step {step}; the model so far is saved in {out_dir}")
            raise
    elapsed = time.perf_counter() - started
    summary = {
        "steps": cfg.max_steps, "tokens": cfg.max_steps * tokens_per_step, "parameters": n_params,
        "first_val_loss": first_val_loss, "val_loss": val_loss, "train_loss": train_loss,
        "seconds": round(elapsed, 1), "tokens_per_s": round(cfg.max_steps * tokens_per_step / elapsed),
        "checkpoint": str(out_dir),
    }
    run["summary"] = summary
    checkpoint.write_config(out_dir, run)
    return summary
