"""Pretraining: corpus -> tokenizer -> token shards -> Run -> Trainer.fit() (llmcli/train/loop.py), a Transformer
trained on next-token prediction.

Process 0 prepares the data (under torchrun the others wait, then read what it wrote) and holds the run directory
(llmcli/train/run.py: a second run into it is refused). Checkpoints, resume and Ctrl-C are the Trainer's
(llmcli/train/checkpoints.py); `--resume` continues from the latest checkpoint exactly, on the data the run started
with: a corpus that changed since is refused.
"""

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch

from llmcli.errors import PEER_STOPPED, LLMError
from llmcli.files import make_output_dir
from llmcli.model.transformer import ModelConfig, Transformer
from llmcli.progress import log, progress_bar
from llmcli.text import data, shards
from llmcli.text.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from llmcli.runtime import default_threads
from llmcli.train.checkpoints import checkpoint_dirs
from llmcli.train.loop import Trainer, World, join_world, lost_peer, micro_batch_size
from llmcli.train.run import Run, locked


class LMBatches:
    """The Trainer's dataset for pretraining: random windows of a token file, inputs and next tokens.
    val_tokens_per_byte turns the validation loss into bits per byte of text (the Trainer's val_bpb)."""

    def __init__(self, token_data: shards.TokenData, context: int, val_bytes: int | None = None):
        self.token_data, self.context = token_data, context
        self.val_tokens_per_byte = token_data.split_len("val") / val_bytes if val_bytes else None

    def batch(self, split: str, batch_size: int, seed: int, index: int, rows: slice | None = None):
        return self.token_data.batch(split, batch_size, self.context, seed, index, rows)

    def tokens(self, batch_size: int) -> int:
        return batch_size * self.context


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
    checkpoint; `init`: start from that checkpoint's weights, shape and tokenizer (continued pretraining).
    overrides: settings by name, {"train.warmup_steps": 50, "lr": 0.01, ...} (see Run.new). Returns a summary.
    Under torchrun, every process calls this; process 0 alone writes."""
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


def _pretrain(world: World, corpus, out_dir, preset, config_file, overrides, tokenizer_path, resume, init) -> dict:
    run, out_dir, initial_weights, tokenizer_path = _settle_run(corpus, out_dir, preset, config_file, overrides,
                                                                tokenizer_path, resume, init)
    micro_batch_size(run.train, world)  # settings that cannot work are refused before anything is written
    torch.set_num_threads(run.train.threads or default_threads(world.local_size))
    made = False
    if resume is None:
        if out_dir.exists() and not out_dir.is_dir():
            raise LLMError(f"{out_dir} exists and is not a directory")
        if world.is_main:
            made = not out_dir.exists()
            make_output_dir(out_dir)
    with locked(out_dir, hold=world.is_main):
        if resume is None:
            run = _start(world, corpus, out_dir, run, tokenizer_path, made)
        token_data = _token_data(world, run, out_dir, resume is not None)
        torch.manual_seed(run.train.seed)
        model = Transformer(run.model).to(world.device)
        if initial_weights is not None:
            model.load_state_dict(initial_weights)
        if "val_bytes" not in run.data:  # a run started before bits per byte were reported gets them now
            run.data["val_bytes"] = token_data.text_bytes(load_tokenizer(out_dir))
        batches = LMBatches(token_data, run.model.context, run.data["val_bytes"])
        trainer = Trainer(world, run, out_dir, model, batches)
        return trainer.setup(resume=resume is not None).fit()


def _settle_run(corpus, out_dir, preset, config_file, overrides, tokenizer_path, resume, init):
    """(run, its directory, the weights it starts from or None, the tokenizer it takes or None)."""
    if resume is not None:
        if corpus or preset or config_file or tokenizer_path or init:
            if init is not None:
                raise LLMError("--init starts a new run from a checkpoint's weights and tokenizer; it does not go "
                               "with --resume or --tokenizer")
            raise LLMError("--resume continues a run with its own corpus and settings; give only the run directory "
                           "(and --max-steps to train longer)")
        return Run.resume(Path(resume), overrides), Path(resume), None, None
    run = Run.new(preset, config_file, overrides)
    if init is None:
        return run, Path(out_dir), None, tokenizer_path
    if tokenizer_path is not None:
        raise LLMError("--init starts a new run from a checkpoint's weights and tokenizer; it does not go with "
                       "--resume or --tokenizer")
    return run, Path(out_dir), *_initial_model(init, run)


def _start(world: World, corpus, out_dir: Path, run: Run, tokenizer_path, made: bool) -> Run:
    """Process 0 prepares a new run's tokenizer and token shards; every process then reads the run it wrote."""
    if world.is_main:
        if checkpoint_dirs(out_dir):
            raise LLMError(f"{out_dir} already holds a training run; continue it with --resume {out_dir}, "
                           "or choose another directory")
        try:
            _prepare_data(corpus, out_dir, run, tokenizer_path)
            # the checks every process makes below, made here too while a failed start can still be undone
            shards.TokenData(Path(run.data["token_dir"]), run.train.val_fraction).check_fits(
                run.model.context, run.train.val_fraction)
        except BaseException:
            if made:  # a run that could not start leaves nothing half-made behind
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
    world.barrier()
    return Run.load(out_dir)  # every process trains on what process 0 prepared


def _token_data(world: World, run: Run, out_dir: Path, resuming: bool) -> shards.TokenData:
    """The run's token shards; tokenized again (the same corpus) if the cache was cleared since."""
    if run.data is None:
        raise LLMError(f"cannot resume: {out_dir} is not a pretraining run (continue a fine-tuning run with "
                       "llm finetune --resume)")
    cfg, token_dir = run.train, Path(run.data["token_dir"])
    token_data = shards.TokenData(token_dir, cfg.val_fraction) if (token_dir / shards.INDEX_FILE).is_file() else None
    if token_data is None:
        check_corpus_unchanged(run, out_dir)
        if world.is_main:
            _tokenize(run.data["corpus"], out_dir, run)
        world.barrier()
        token_data = shards.TokenData(Path(run.data["token_dir"]), cfg.val_fraction)
    if token_data.n_tokens != run.data["tokens"]:
        raise LLMError(f"cannot {'resume' if resuming else 'train'}: the run recorded "
                       f"{run.data['tokens']:,} tokens of corpus but its token shards hold {token_data.n_tokens:,}")
    token_data.check_fits(run.model.context, cfg.val_fraction)
    return token_data


def _initial_model(init: str | Path, run: Run) -> tuple[dict, Tokenizer]:
    """The weights and tokenizer of the model (any format load_model reads) a run starts from; its shape replaces
    the run's model settings, but for dropout."""
    from llmcli.formats import load_model

    model, tokenizer, _ = load_model(init)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LLMError(f"{init}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                       f"{model.config.vocab_size} embeddings")
    run.model = ModelConfig(**{**dataclasses.asdict(model.config), "dropout": run.model.dropout})
    run.extra["init"] = str(init)
    return model.state_dict(), tokenizer


def prepare_tokenizer(corpus: list, out_dir: Path, run: Run, tokenizer) -> Tokenizer:
    """Save the given tokenizer (a loaded one, or a path load_tokenizer reads) into the run, or train one on the
    corpus."""
    if tokenizer is not None:
        if not hasattr(tokenizer, "save"):
            tokenizer = load_tokenizer(tokenizer)
        if Path(tokenizer.path).resolve().parent != out_dir.resolve():
            tokenizer.save(out_dir)
        if "init" not in run.extra:  # a model continued from a checkpoint keeps its own embedding size
            run.model.vocab_size = tokenizer.vocab_size
        return load_tokenizer(out_dir)
    cfg = run.train
    log(f"training a {cfg.tokenizer_type} tokenizer with {run.model.vocab_size} tokens")
    lines = data.training_lines(corpus, cfg.text_field, cfg.doc_separator)
    tokenizer = train_tokenizer(lines, out_dir, run.model.vocab_size, cfg.tokenizer_type)
    run.model.vocab_size = tokenizer.vocab_size  # (char: fewer when the corpus has fewer characters)
    return tokenizer


def _prepare_data(corpus, out_dir: Path, run: Run, tokenizer_path):
    """Process 0: the tokenizer and the token shards of the corpus, and the run's config.yaml that names them."""
    corpus = data.expand_corpus(corpus or [])
    if "-" in corpus:  # stdin can be read once; the tokenizer and the tokenization both need it
        stdin_copy = str(data.save_stdin(out_dir / "data" / "stdin.txt"))
        corpus = [stdin_copy if p == "-" else p for p in corpus]
    tokenizer = prepare_tokenizer(corpus, out_dir, run, tokenizer_path)
    run.tokenizer = {"file": tokenizer.path.name, "vocab_size": tokenizer.vocab_size}
    _tokenize(corpus, out_dir, run)


def check_corpus_unchanged(run: Run, out_dir: Path):
    """A run's corpus must be the bytes it was started on: its hash (with the tokenizer's and the settings of
    how documents split) must be the one recorded, which names the token shards in the cache."""
    corpus = run.data["corpus"]
    missing = [p for p in corpus if not Path(p).is_file()]
    if missing:
        raise LLMError(f"cannot resume {out_dir}: its corpus file {missing[0]} is gone (the token cache was "
                       "cleared too, so the run's data cannot be had again)")
    recorded = run.data.get("hash") or Path(run.data["token_dir"]).name
    now = shards.corpus_hash(corpus, load_tokenizer(out_dir), run.train.text_field, run.train.doc_separator)
    if now != recorded:
        raise LLMError(f"cannot resume {out_dir}: its corpus ({', '.join(corpus)}) has changed since the run "
                       f"started (hash {now[:12]}, recorded {recorded[:12]}, {run.data['tokens']:,} tokens); "
                       "put the original back, or start a new run on the new text")


def _tokenize(corpus: list[str], out_dir: Path, run: Run):
    tokenizer, cfg = load_tokenizer(out_dir), run.train
    total_bytes = sum(os.path.getsize(p) for p in corpus)
    started = time.perf_counter()
    with progress_bar("tokenizing", total_bytes) as update:
        token_dir = shards.cached_tokens(corpus, tokenizer, cfg.text_field, cfg.doc_separator,
                                       progress=lambda n: update(advance=n), log=log)
    token_data = shards.TokenData(token_dir, cfg.val_fraction)
    seconds = time.perf_counter() - started
    log(f"{total_bytes / 1e6:.1f} MB of text, {token_data.n_tokens:,} tokens in {token_dir} ({seconds:.1f}s)")
    run.data = {"corpus": corpus, "token_dir": str(token_dir), "hash": token_dir.name,
                "tokens": token_data.n_tokens,
                "train_tokens": token_data.split_len("train"), "val_tokens": token_data.split_len("val"),
                "val_bytes": token_data.text_bytes(tokenizer)}
    run.save(out_dir)
