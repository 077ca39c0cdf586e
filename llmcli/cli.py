"""The `llm` command: parses arguments and dispatches to the modules that do the work.

Heavy modules (torch and everything that imports it) are imported inside the commands that need them, so that
`llm --help` and `llm tokenize` start quickly.
"""

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcli.errors import LLMError, Terminated

# the order `llm --help` lists the commands in: what people use first, first
COMMAND_ORDER = ("generate", "chat", "serve", "eval", "embed", "search", "classify", "pretrain", "finetune",
                 "tokenize", "models", "info", "export", "plot", "cache")


class _Commands(typer.core.TyperGroup):
    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))


# rich_markup_mode=None: click's plain help, which fits 80 columns, shows flags without a type, and leaves the
# "[default: ...]" of a help text as written (Rich read it as markup and dropped it)
app = typer.Typer(
    name="llm",
    cls=_Commands,
    help="Train, sample from and evaluate small language models. Results go to stdout, progress and logs to "
    "stderr. `llm COMMAND -h` shows a command's options and examples.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool):
    if value:
        from llmcli import __version__

        print(f"llm {__version__}")
        raise typer.Exit()


@app.callback()
def _common(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                  help="Print the version and exit")] = False):
    pass


def examples(*commands: str) -> str:
    """The epilog of a command's help: its examples, a line each ("\b": click keeps these lines as they are)."""
    return "\b\nExamples:\n" + "\n".join(f"  {c}" for c in commands)


tokenize_app = typer.Typer(help="Train a SentencePiece tokenizer; encode and decode text.", no_args_is_help=True,
                           rich_markup_mode=None, epilog=examples("llm tokenize train corpus.txt -o tok",
                                                                  "echo 'Once upon a time' | llm tokenize encode"))
app.add_typer(tokenize_app, name="tokenize")


MODEL_HELP = ("Checkpoint directory (ours or a Hugging Face folder), a .gguf file, or a Hub id: ORG/NAME, "
              "ORG/NAME:FILE.gguf, ORG/NAME:Q4_K_M (llm models) [default: the shipped model, or $LLM_MODEL]")
ModelOption = Annotated[Optional[Path], typer.Option("--model", "-m", help=MODEL_HELP, show_default=False)]
TokenizerOption = Annotated[Optional[Path], typer.Option(
    "--tokenizer", "-t", help="Tokenizer: a directory with tokenizer.model (a checkpoint works) or the file itself "
    "[default: the shipped model's]", show_default=False)]
QuantizeOption = Annotated[Optional[str], typer.Option(
    help="int8 or int4: multiply by weights stored as int8, or as 4-bit groups, on the CPU: less memory, a small "
    "cost in quality; whether it is faster depends on the model (docs/perf.md) [default: off]",
    show_default=False)]
InputArgument = Annotated[str, typer.Argument(help="Text file to read, '-' for stdin")]
# the sampling options of `generate` and `chat`; unset ones take the checkpoint's stored defaults
MaxNewTokensOption = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", "--max-tokens", help="Most tokens to add [default: the model's, else 200]",
    show_default=False)]
TemperatureOption = Annotated[Optional[float], typer.Option(
    help="0 = greedy [default: the model's, else 0.8]", show_default=False)]
TopKOption = Annotated[Optional[int], typer.Option(
    help="Sample from the k most likely tokens; 0 = off [default: the model's, else 0]", show_default=False)]
TopPOption = Annotated[Optional[float], typer.Option(
    help="Sample from the smallest set with this much probability [default: the model's, else 1 = off]",
    show_default=False)]
MinPOption = Annotated[Optional[float], typer.Option(
    help="Drop tokens less likely than this times the most likely [default: the model's, else 0 = off]",
    show_default=False)]
RepetitionPenaltyOption = Annotated[Optional[float], typer.Option(
    help="Above 1 makes tokens already in the text less likely [default: the model's, else 1 = off]",
    show_default=False)]
SystemOption = Annotated[Optional[str], typer.Option(
    "--system", "-s", help="A system message, where the chat template has a place for one [default: none]",
    show_default=False)]


def _input_lines(source: str):
    from llmcli.text.data import read_lines

    return read_lines(source)


@tokenize_app.command("train", epilog=examples("llm tokenize train corpus.txt -o tok --vocab-size 1024"))
def tokenize_train(
    corpus: Annotated[list[str], typer.Argument(
        help="Corpus files or directories: text, .jsonl, .csv, .parquet, also .gz or .zst ('-' for stdin)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write tokenizer.model to")],
    vocab_size: Annotated[int, typer.Option(help="Number of tokens")] = 2048,
    type: Annotated[str, typer.Option("--type", help="bpe, unigram or char (a token per character)")] = "bpe",
    special: Annotated[Optional[list[str]], typer.Option(
        help="Extra special token, kept whole (repeatable); <|endoftext|> is always one [default: none]",
        show_default=False)] = None,
    text_field: Annotated[str, typer.Option(help="Field (column) of the records of .jsonl, .csv and .parquet files")]
    = "text",
):
    """Train a SentencePiece tokenizer on text files; prints its path.

    Byte fallback, so any UTF-8 text round-trips exactly."""
    from llmcli.text.data import expand_corpus, training_lines
    from llmcli.text.tokenizer import train_tokenizer

    lines = training_lines(expand_corpus(corpus), text_field)
    tokenizer = train_tokenizer(lines, out, vocab_size, type, tuple(special or ()))
    print(tokenizer.path)


@tokenize_app.command("encode", epilog=examples(
    "echo 'Once upon a time' | llm tokenize encode",
    "llm tokenize encode story.txt --json -t checkpoint",
))
def tokenize_encode(
    source: InputArgument = "-",
    tokenizer: TokenizerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help='One {"ids": [...], "pieces": [...]} object a line')] = False,
):
    """Print the token ids of each input line.

    Space-separated, one output line per input line, ended as the input line was (LF, CR LF, or nothing for a last
    line without one), so that decode gives back every byte."""
    tok = _load_tokenizer(tokenizer)
    lines = _input_lines(source)
    empty = True
    for line in lines:
        ids = tok.encode(line)
        sys.stdout.write((json.dumps({"ids": ids, "pieces": tok.pieces(ids)}, ensure_ascii=False) if as_json
                          else " ".join(map(str, ids))) + lines.ending)
        empty = False
    if empty:
        _say_empty(source)


@tokenize_app.command("decode", epilog=examples("echo 'Once upon a time' | llm tokenize encode | llm tokenize decode"))
def tokenize_decode(source: InputArgument = "-", tokenizer: TokenizerOption = None):
    """Turn lines of token ids back into text, a line for a line.

    Lines of space-separated ids, or JSON objects with "ids"; each line of text is ended as its line of ids was."""
    tok = _load_tokenizer(tokenizer)
    lines = _input_lines(source)
    number = 0
    for number, line in enumerate(lines, start=1):
        try:
            ids = json.loads(line)["ids"] if line.lstrip().startswith("{") else [int(t) for t in line.split()]
        except (ValueError, KeyError, TypeError):
            raise LLMError(f"line {number}: expected token ids separated by spaces, got {line[:40]!r}") from None
        sys.stdout.write(tok.decode(ids) + lines.ending)
    if number == 0:
        _say_empty(source)


def _say_empty(source: str):
    """The rule for empty input (README): a command that answers each line prints nothing, says so, exits 0."""
    from llmcli.progress import log

    log(f"{'<stdin>' if source == '-' else source} is empty: no output")


SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Any other setting as SECTION.NAME=VALUE, the names of a --config file (train.warmup_steps=50); "
    "repeatable [default: none]", show_default=False)]


def _load_tokenizer(path: Optional[Path]):
    from llmcli.formats import load_model_tokenizer

    return load_model_tokenizer(path)


def _run_path(corpus: list[str], preset: str) -> Path:
    """A new run's directory when -o is not given: checkpoints/CORPUS-PRESET, numbered if it exists."""
    stem = "stdin" if corpus[0] == "-" else Path(corpus[0].rstrip("/")).stem or "corpus"
    return _free_path(Path("checkpoints") / f"{stem}-{preset}")


def _from_preset(help: str):
    """An option of pretrain whose default is the preset's (or the --config file's)."""
    return typer.Option(help=f"{help} [default: the preset's]", show_default=False)


@app.command(epilog=examples(
    "llm pretrain corpus.txt --preset nano --max-steps 200 -o run",
    "llm pretrain --resume run --max-steps 400",
))
def pretrain(
    corpus: Annotated[Optional[list[str]], typer.Argument(
        help="Corpus files (text, .jsonl, .csv, .parquet, also .gz or .zst), directories of them, globs, '-' for "
        "stdin; in text, lines holding only <|endoftext|> separate documents", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Checkpoint directory [default: checkpoints/<corpus>-<preset>]", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="Continue this run directory from its latest checkpoint (exactly: same losses as without a stop) "
        "[default: a new run]", show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option(
        help="nano (tests), tiny (~1M), small (~10M) or gpt2 (124M) [default: tiny]", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="YAML file with 'model' and 'train' sections; options below override it [default: none]",
        show_default=False)] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(
        "--tokenizer", "-t", help="Use this tokenizer instead of training one on the corpus [default: train one]",
        show_default=False)] = None,
    init: Annotated[Optional[Path], typer.Option(
        help="Continue pretraining this checkpoint (ours or a Hugging Face folder): its weights, shape and "
        "tokenizer [default: random weights]", show_default=False)] = None,
    max_steps: Annotated[Optional[int], _from_preset("Training steps")] = None,
    batch_size: Annotated[Optional[int], _from_preset("Sequences per step, over all processes")] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option(
        help="Sequences per forward pass; the rest of the batch is accumulated [default: the whole batch]",
        show_default=False)] = None,
    lr: Annotated[Optional[float], _from_preset("Peak learning rate")] = None,
    schedule: Annotated[Optional[str], typer.Option(
        help="After warmup: cosine, linear or wsd (warmup-stable-decay) [default: wsd]", show_default=False)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(
        help="Steps of linear warmup [default: 5% of the steps]", show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(
        help="fp32, bf16-mixed (bfloat16 autocast) or auto: bf16-mixed where the CPU (or GPU) multiplies bfloat16 "
        "natively and the model is at least 256 wide, else fp32 [default: auto]", show_default=False)] = None,
    compile: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", help="torch.compile the model [default: no-compile]", show_default=False)] = None,
    context: Annotated[Optional[int], _from_preset("Tokens per sequence")] = None,
    vocab_size: Annotated[Optional[int], _from_preset("Size of the tokenizer trained on the corpus")] = None,
    eval_interval: Annotated[Optional[int], _from_preset("Steps between validations")] = None,
    save_interval: Annotated[Optional[int], typer.Option(
        help="Steps between checkpoints [default: at every validation]", show_default=False)] = None,
    keep_last: Annotated[Optional[int], typer.Option(
        help="Checkpoints kept besides the best by validation loss [default: 2]", show_default=False)] = None,
    text_field: Annotated[Optional[str], typer.Option(
        help="Field (column) of the records of .jsonl, .csv and .parquet files [default: text]",
        show_default=False)] = None,
    doc_separator: Annotated[Optional[str], typer.Option(
        help="A line holding only this ends a document [default: <|endoftext|>]", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed [default: 1337]", show_default=False)] = None,
    nproc: Annotated[Optional[int], typer.Option(
        help="Train with this many processes (runs torchrun --nproc-per-node N) [default: 1]", show_default=False)
    ] = None,
    strategy: Annotated[Optional[str], typer.Option(
        help="With several processes: ddp (a whole model each) or fsdp (parameters, gradients and optimizer state "
        "sharded across them) [default: ddp]", show_default=False)] = None,
    settings: SetOption = None,
):
    """Pretrain a Transformer on text files; prints the checkpoint.

    Next-token prediction, with a tokenizer trained on the corpus unless --tokenizer gives one; a summary on stderr."""
    if nproc is not None:
        from llmcli.train.launch import relaunch_with_torchrun

        sys.exit(relaunch_with_torchrun(nproc, sys.argv[1:], on_hangup=_terminate))
    from llmcli.config import parse_settings, resolve_run_config
    from llmcli.train.pretrain import pretrain as run_pretrain

    if resume is not None:
        out = resume
    elif not corpus:
        raise LLMError("give a corpus to train on, or --resume RUN_DIR")
    out = out or _run_path(corpus, resolve_run_config(preset, config, {})["preset"])
    options = dict(max_steps=max_steps, batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr,
                   schedule=schedule, warmup_steps=warmup_steps, precision=precision, compile=compile, context=context,
                   vocab_size=vocab_size, eval_interval=eval_interval, save_interval=save_interval, keep_last=keep_last,
                   text_field=text_field, doc_separator=doc_separator, seed=seed, strategy=strategy)
    overrides = parse_settings(settings or []) | {k: v for k, v in options.items() if v is not None}
    summary = run_pretrain(corpus, out, preset, config, overrides, tokenizer, resume=resume, init=init)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, process 0 alone reports
        _print_summary(summary)
        print(summary["checkpoint"])


def _free_path(path: Path) -> Path:
    """path, or path-2, path-3, ... if it is taken: a default never overwrites an earlier run."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _print_summary(summary: dict, title: str = "pretraining summary"):
    from rich.table import Table

    from llmcli.progress import console

    table = Table(title=title, show_header=False)
    trained = summary.get("trained_parameters", summary["parameters"])
    table.add_row("parameters", f"{summary['parameters'] / 1e6:.2f}M"
                  + (f" ({trained:,} trained)" if trained < summary["parameters"] else ""))
    table.add_row("steps", f"{summary['steps']:,} ({summary['tokens']:,} tokens)")
    table.add_row("val loss", f"{summary['first_val_loss']:.4f} -> {summary['val_loss']:.4f}")
    if "val_bpb" in summary:
        table.add_row("val bits per byte", f"{summary['val_bpb']:.4f}")
    table.add_row("train loss", f"{summary['train_loss']:.4f}")
    table.add_row("time", f"{summary['seconds']:.1f}s, {summary['tokens_per_s']:,} tokens/s")
    from llmcli.eval.plot import read_metrics, sparkline

    train_losses = [row["train_loss"] for row in read_metrics(summary["checkpoint"]) if "train_loss" in row]
    table.add_row("train loss curve", f"{sparkline(train_losses, 40)} {max(train_losses):.2f} -> {train_losses[-1]:.2f}")
    table.add_row("checkpoint", summary["checkpoint"])
    console.print(table)


class _TrainByDefault(typer.core.TyperGroup):
    """`llm finetune DATA ...` is `llm finetune train DATA ...`: a first argument that names no subcommand (nor asks
    for help) is training's."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["train", *args]
        elif not args:
            args = ["train"]
        return super().parse_args(ctx, args)

    def list_commands(self, ctx):
        return ["train", "merge"]


finetune_app = typer.Typer(
    cls=_TrainByDefault, rich_markup_mode=None,
    help="Fine-tune a model on instructions or labelled texts.\n\nThe whole model or LoRA adapters. "
    "`llm finetune DATA.jsonl` "
    "is short for `llm finetune train DATA.jsonl`.",
    epilog=examples("llm finetune data.jsonl -o tuned --max-steps 100",
                    "llm finetune data.jsonl --lora-rank 8 -o adapter",
                    "llm finetune merge adapter -o merged"))
app.add_typer(finetune_app, name="finetune")


@finetune_app.command("merge", epilog=examples("llm finetune merge adapter -o merged"))
def finetune_merge(
    adapter: Annotated[Path, typer.Argument(help="LoRA adapter directory (from llm finetune --lora-rank R)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New checkpoint directory to write")],
):
    """Write a base model plus its LoRA adapter as one checkpoint; prints its directory."""
    from llmcli.train.finetune import merge

    print(merge(adapter, out))


@finetune_app.command("train", epilog=examples(
    "llm finetune data.jsonl -o tuned --max-steps 100",
    "llm finetune labelled.jsonl --task classify -o classifier",
    "llm finetune data.jsonl --lora-rank 8 -m base -o adapter"))
def finetune(
    data: Annotated[Optional[list[str]], typer.Argument(
        help="JSONL records: {prompt, response} or {messages: [{role, content}, ...]}; {text, label} with --task "
        "classify", show_default=False)] = None,
    model: ModelOption = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Checkpoint directory [default: checkpoints/<data>-<task>]", show_default=False)] = None,
    task: Annotated[str, typer.Option(help="sft (instructions) or classify (a head predicting the label)")] = "sft",
    val: Annotated[Optional[str], typer.Option(
        help="Validation records [default: 10% of the data held out]", show_default=False)] = None,
    train_on_prompt: Annotated[bool, typer.Option(
        help="Loss on every token, not only on the replies")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this fine-tuning run from its latest checkpoint "
                                                                     "[default: a new run]",
                                                   show_default=False)] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Training steps [default: 200]", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per step [default: 16]",
                                                      show_default=False)] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option(help="Examples per forward pass [default: all]",
                                                            show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate [default: 5e-4]", show_default=False)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Steps of linear warmup [default: 10]",
                                                                show_default=False)] = None,
    eval_interval: Annotated[Optional[int], typer.Option(help="Steps between validations [default: 50]",
                                                                 show_default=False)] = None,
    save_interval: Annotated[Optional[int], typer.Option(
        help="Steps between checkpoints [default: at every validation]", show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 or bf16-mixed [default: fp32]",
                                                               show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed [default: 1337]", show_default=False)] = None,
    lora_rank: Annotated[int, typer.Option(help="Train rank-R LoRA adapters only (0 = every weight)")] = 0,
    lora_alpha: Annotated[float, typer.Option(help="LoRA scale numerator: updates are scaled by alpha / rank")] = 16.0,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the adapters' input")] = 0.0,
    lora_targets: Annotated[str, typer.Option(
        help="Layers given adapters, of attn.qkv, attn.proj, mlp.fc, mlp.proj")] = "attn.qkv,attn.proj",
    settings: SetOption = None,
):
    """Fine-tune on instructions or labelled texts; prints the checkpoint.

    The whole model, or LoRA adapters only (--lora-rank); llm finetune merge makes an adapter a checkpoint."""
    from llmcli.config import parse_settings
    from llmcli.train.finetune import LoRAConfig
    from llmcli.train.finetune import finetune as run_finetune

    if resume is None and not data:
        raise LLMError("give a JSONL data file to fine-tune on, or --resume RUN_DIR")
    if data and len(data) > 1:
        raise LLMError(f"give one data file (and --val for validation), got {len(data)}")
    if resume is None and out is None:
        out = _free_path(Path("checkpoints") / f"{Path(data[0]).stem}-{task}")
    overrides = dict(max_steps=max_steps, batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr,
                     warmup_steps=warmup_steps, eval_interval=eval_interval, save_interval=save_interval,
                     precision=precision, seed=seed)
    overrides = parse_settings(settings or [], sections=("train",)) | {k: v for k, v in overrides.items()
                                                                      if v is not None}
    lora = LoRAConfig(lora_rank, lora_alpha, lora_dropout, lora_targets)
    summary = run_finetune(data[0] if data else None, out, model, task, val, train_on_prompt, overrides, lora, resume)
    _print_summary(summary, "fine-tuning summary")
    print(summary["checkpoint"])


@app.command(epilog=examples(
    "llm classify texts.txt -m classifier",
    "echo 'what a lovely day' | llm classify -m classifier --json",
))
def classify(
    source: Annotated[str, typer.Argument(help="Text file, one text a line; '-' for stdin")] = "-",
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line: label and probabilities")] = False,
):
    """Label each line with a classifier checkpoint, a label a line.

    A classifier comes from llm finetune --task classify."""
    from llmcli.eval.classify import predict
    from llmcli.formats import default_model_path, load_model

    net, tok, config = load_model(model)
    if config.get("task") != "classify":
        raise LLMError(f"{model or default_model_path()} is not a classifier; make one with llm finetune --task "
                       "classify")
    labels = config["labels"]
    from llmcli.text.data import batches

    lines = _input_lines(source)
    empty = True
    for batch in batches(lines, 32, lines.ready):  # each batch written as soon as it is done
        empty = False
        for probs in predict(net, tok, batch).tolist():
            best = labels[max(range(len(labels)), key=probs.__getitem__)]
            sys.stdout.write((json.dumps({"label": best, "probabilities": dict(zip(labels, probs))}) if as_json
                              else best) + "\n")
        sys.stdout.flush()
    if empty:
        _say_empty(source)


@app.command(epilog=examples(
    'llm generate "Tell me a story about a cat"',
    'llm generate "Once upon a time" --temperature 0 --max-tokens 50 -m run',
    'printf "A dog\\nA boat\\n" | llm generate - -n 2 --json',
))
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text; '-' reads prompts from stdin, one a line; with "
                                          "--input-format jsonl, '-' or a file of JSON lines")] = "",
    model: ModelOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    presence_penalty: Annotated[Optional[float], typer.Option(
        help="Subtract this from the logit of every token already generated (OpenAI's; -2..2) [default: 0]",
        show_default=False)] = None,
    frequency_penalty: Annotated[Optional[float], typer.Option(
        help="Subtract this times the count of each token already generated (OpenAI's; -2..2) [default: 0]",
        show_default=False)] = None,
    logit_bias: Annotated[Optional[list[str]], typer.Option(
        help="TOKEN_ID=BIAS: add BIAS (-100..100) to that token's logit (repeatable) [default: none]",
        show_default=False)] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        help="End a sample before this string (repeatable); it is not printed [default: none]", show_default=False)
    ] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Samples per prompt")] = 1,
    seed: Annotated[Optional[int], typer.Option(
        help="Random seed; the same seed gives the same text [default: a random one]", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Samples (prompts x --num-samples) decoded together")] = 8,
    input_format: Annotated[str, typer.Option(help="text: a prompt a line; jsonl: JSON objects with a 'prompt'")
                            ] = "text",
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template")] = False,
    system: SystemOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a sample: text, token counts, "
                                          "finish reason, timings")] = False,
    truncate: Annotated[bool, typer.Option(help="Keep the end of a prompt longer than the context")] = False,
    quantize: QuantizeOption = None,
    ignore_eos: Annotated[bool, typer.Option(
        "--ignore-eos", help="Never sample the end tokens: decode to --max-new-tokens (for timing)")] = False,
):
    """Continue a prompt, or each prompt of stdin or a file.

    One sample of a prompt argument streams as it is produced; prompts read from stdin or a file, and several
    samples, are each followed by a line <|endoftext|>, a batch's as soon as it is done."""
    import time

    start = time.perf_counter()
    from llmcli.formats import default_model_path, load_model
    from llmcli.infer.generate import apply_template, generate_text
    from llmcli.infer.sampler import sampling_settings
    from llmcli.progress import log

    if system is not None and not chat:
        raise LLMError("--system is for a chat: add --chat (or use llm chat)")
    if input_format not in ("text", "jsonl"):
        raise LLMError(f"--input-format must be text or jsonl, not {input_format!r}")
    # a small model decodes on NumPy: text appears before torch could even have been imported
    net, tok, config = load_model(model, numpy_if_small=True, quantize=quantize)
    load_s = time.perf_counter() - start
    turns = None
    if chat:
        from llmcli.text.chat_template import find_chat_template

        turns = find_chat_template(model or default_model_path(), config, tok)
        if turns is None:
            log("this model has no chat template; the prompt is continued as plain text")
    cfg, template = sampling_settings(config, turns, tok, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                      stop=tuple(stop) if stop else None, num_samples=num_samples, seed=seed,
                                      batch_size=batch_size, ignore_eos=ignore_eos or None,
                                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                      logit_bias=_logit_bias_option(logit_bias))
    prompts, lines = _prompts(prompt, input_format)
    if turns is not None:
        head = [{"role": "system", "content": system}] if system else []
        wrap = lambda p: turns.prompt([*head, {"role": "user", "content": p}])  # noqa: E731
    elif chat:
        wrap = None
    else:
        wrap = lambda p: apply_template(template, p)  # noqa: E731
    generate_text(net, tok, prompts, cfg, truncate=truncate, log=log, as_json=as_json, load_s=load_s, template=wrap,
                  ready=lines.ready if lines is not None else None, several=lines is not None)


def _prompts(prompt: str, input_format: str):
    """(the prompts, the lines they come from or None): the argument itself, stdin's lines ('-'), or the 'prompt'
    of each JSON line of a file or stdin (--input-format jsonl)."""
    if input_format == "jsonl":
        lines = _input_lines(prompt)
        return _jsonl_prompts(lines), lines
    if prompt == "-":
        lines = _input_lines("-")
        return lines, lines
    return iter([prompt]), None


def _logit_bias_option(values: list[str] | None) -> dict[int, float] | None:
    """--logit-bias TOKEN_ID=BIAS, repeated, as {token id: bias}."""
    bias = {}
    for value in values or ():
        token, _, number = value.partition("=")
        try:
            bias[int(token)] = float(number)
        except ValueError:
            raise LLMError(f"--logit-bias takes TOKEN_ID=BIAS (like 50256=-100), got {value!r}") from None
    return bias or None


def _jsonl_prompts(lines):
    """The 'prompt' of each JSON object a line (of a file, or stdin); blank lines are skipped."""
    from llmcli.text.data import jsonl_texts

    return jsonl_texts(lines, "prompt", option=None)


@app.command(epilog=examples("llm chat", "llm chat -m Qwen2.5-0.5B-Instruct -s 'Answer in one sentence.'"))
def chat(
    model: ModelOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed [default: a random one]", show_default=False)
                    ] = None,
    system: SystemOption = None,
    quantize: QuantizeOption = None,
):
    """Talk with a model in the terminal, a line a message.

    The reply streams as it is produced. /help lists the commands: /reset forgets the conversation, /system TEXT
    sets the system message, /exit or Ctrl-D leaves; Ctrl-C stops a reply."""
    from llmcli.formats import default_model_path, load_model
    from llmcli.infer.chat import Chat, repl
    from llmcli.infer.sampler import sampling_settings
    from llmcli.progress import log
    from llmcli.text.chat_template import find_chat_template

    net, tok, config = load_model(model, numpy_if_small=True, quantize=quantize)
    if config.get("task") == "classify":
        raise LLMError("this checkpoint is a classifier: it labels text (llm classify), it does not chat")
    template = find_chat_template(model or default_model_path(), config, tok)
    cfg, _ = sampling_settings(config, template, tok, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    conversation = Chat(net, tok, cfg, template, system, log)
    if template is None:
        log("this model has no chat template: your messages are continued as plain text")
    repl(conversation, str(model) if model else f"{default_model_path().name} (the default model)", log)


@app.command("eval", epilog=examples("llm eval valid.txt", "llm eval valid.txt tasks.jsonl -m run -m other --json"))
def evaluate(
    files: Annotated[list[str], typer.Argument(
        help="Text files to score, and multiple-choice task files: .jsonl with context, choices, answer a line")],
    models: Annotated[Optional[list[Path]], typer.Option(
        "--model", "-m", help=MODEL_HELP.replace(" [", ", repeatable: a table row a model ["), show_default=False)
    ] = None,
    stride: Annotated[Optional[int], typer.Option(
        help="Tokens between sliding windows over a text file: each window scores only its last STRIDE tokens, so "
        "every token sees at least context - stride before it; = context is fastest [default: half the context]",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Windows (or choices) scored at once", min=1)] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a (model, file) pair on stdout")] = False,
    quantize: QuantizeOption = None,
):
    """Score models: bits per byte on text files, accuracy on tasks.

    Bits per byte, loss and perplexity on text files; accuracy on multiple-choice task files. Several --model
    give one table, a row a model: bits per byte compares models whatever their tokenizers."""
    from llmcli.eval.evaluate import evaluate_file
    from llmcli.eval.tasks import evaluate_task, is_task_file
    from llmcli.formats import default_model_path, load_model
    from llmcli.text.data import check_text_file

    for f in files:
        check_text_file(f)  # before loading any model
    results = []
    for path in models or [default_model_path()]:
        net, tok, config = load_model(path, quantize=quantize)
        if config.get("task") == "classify":  # labelled JSONL: accuracy, macro F1, confusion matrix
            from llmcli.eval.classify import evaluate_classifier, print_report

            for f in files:
                result = evaluate_classifier(net, tok, config["labels"], f)
                print(json.dumps({"model": str(path), **result})) if as_json else print_report(result)
            continue
        for f in files:
            result = (evaluate_task(net, tok, f, batch_size) if is_task_file(f)
                      else evaluate_file(net, tok, f, batch_size, stride))
            results.append({"model": str(path), **result})
            if as_json:
                print(json.dumps(results[-1]), flush=True)
        del net
    if results and not as_json:
        from llmcli.report import print_eval_tables

        print_eval_tables(results)


PoolingOption = Annotated[str, typer.Option(
    help="How hidden states become one vector: mean (of the text's tokens) or last (the last token's)")]


@app.command(epilog=examples(
    "llm embed texts.txt > vectors.jsonl",
    "llm embed docs.jsonl --pooling last -o vectors.npy",
))
def embed(
    source: Annotated[str, typer.Argument(help="Text file, one text a line, or .jsonl records; '-' for stdin")] = "-",
    model: ModelOption = None,
    pooling: PoolingOption = "mean",
    field: Annotated[Optional[str], typer.Option(
        help="Read JSONL records and embed this field [default: 'text' for a .jsonl file, else lines]",
        show_default=False)
    ] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write all embeddings to this .npy or .safetensors file (prints its path) instead of "
        "one JSON array a line [default: stdout]", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Texts embedded at once", min=1)] = 32,
):
    """One embedding a line (or JSONL record) of text.

    The model's final hidden states, pooled, scaled to unit length."""
    from llmcli.eval.embed import check_pooling, embed_stream, embed_texts, read_texts, write_embeddings
    from llmcli.formats import default_model_path, load_model

    check_pooling(pooling)
    if out is not None and out.suffix not in (".npy", ".safetensors"):
        raise LLMError(f"cannot write {out}: the output file must end in .npy or .safetensors")
    texts, lines = read_texts(source, field)  # opened before the model loads: a missing file is said at once
    net, tok, _ = load_model(model)
    from llmcli.progress import log

    if out is not None:  # all of them, in one file
        texts = list(texts)
        if not texts:  # the rule for empty input (README): said on stderr; the file holds a (0, n_embd) array
            log(f"{lines.name} is empty: no texts, no embeddings")
        vectors = embed_texts(net, tok, texts, pooling, batch_size)
        log(f"{len(vectors)} embeddings of {vectors.shape[1]} dimensions, {pooling} pooling")
        write_embeddings(vectors, out, {"model": str(model or default_model_path()), "pooling": pooling})
        print(out)
        return
    for vectors in embed_stream(net, tok, texts, lines, pooling, batch_size):  # each batch as soon as it is done
        for v in vectors:
            sys.stdout.write(json.dumps([round(float(x), 6) for x in v]) + "\n")
        sys.stdout.flush()


@app.command(epilog=examples('llm search "a dog in the park" --docs stories.txt -n 3'))
def search(
    query: Annotated[str, typer.Argument(help="What to look for")],
    docs: Annotated[Path, typer.Option(
        help="Documents: .jsonl records ('text'), texts between <|endoftext|> lines, or else one a line")],
    model: ModelOption = None,
    top: Annotated[int, typer.Option("--top", "-n", help="How many documents to show")] = 5,
    pooling: PoolingOption = "mean",
    as_json: Annotated[bool, typer.Option("--json", help='One {"rank", "score", "doc", "text"} object a line')
                       ] = False,
):
    """The documents most like a query, by cosine of embeddings.

    Best first: rank, score, document number (from 1) and its start. Document embeddings are cached next to the
    file."""
    from llmcli.eval.embed import check_pooling, embed_texts
    from llmcli.eval.search import doc_embeddings, read_docs, top_k
    from llmcli.formats import default_model_path, load_model

    check_pooling(pooling)
    if not query.strip():
        raise LLMError("the query is empty")
    if top < 1:
        raise LLMError("--top must be at least 1")
    texts = read_docs(docs)
    net, tok, _ = load_model(model)
    vectors = doc_embeddings(net, tok, Path(model or default_model_path()), docs, texts, pooling)
    for rank, (i, score) in enumerate(top_k(embed_texts(net, tok, [query], pooling)[0], vectors, top), start=1):
        if as_json:
            print(json.dumps({"rank": rank, "score": round(score, 6), "doc": i + 1, "text": texts[i]}))
        else:
            start = " ".join(texts[i].split())
            print(f"{rank}\t{score:.4f}\t{i + 1}\t{start[:100] + '...' if len(start) > 100 else start}")


@app.command(epilog=examples("llm serve --port 8000", "llm serve -m checkpoint --api-key secret --host 0.0.0.0"))
def serve(
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens the server to the network")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="LLM_API_KEY", help="Require 'Authorization: Bearer KEY' [default: $LLM_API_KEY, else no key]",
        show_default=False,
        show_envvar=False)] = None,
    max_batch: Annotated[int, typer.Option(help="Most sequences decoded together (their KV cache is allocated "
                                           "up front)")] = 16,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting for a place in the batch; more get 429")
                         ] = 256,
    quantize: QuantizeOption = None,
):
    """Serve a model over the OpenAI HTTP API.

    Completions, chat and embeddings; concurrent requests batched together. Prints the address; logs a line a
    request on stderr; SIGTERM or Ctrl-C finishes the requests in flight and exits."""
    try:
        from llmcli.infer.serve import serve as run_server
    except ImportError as e:
        raise LLMError(f"llm serve needs the 'serve' extra: pip install -e '.[serve]' ({e})") from None

    run_server(model, host, port, api_key, max_batch, max_queue, quantize)


@app.command(epilog=examples("llm plot run other-run -o loss.png"))
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Training run directories (with metrics.jsonl)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write")] = Path("loss.png"),
):
    """Draw training runs' loss curves to a PNG; prints its path.

    Training and validation loss against tokens seen, several runs overlaid."""
    from llmcli.eval.plot import plot_runs

    print(plot_runs(runs, out))


@app.command(epilog=examples("llm export -m run -o run-hf", "llm export -m run --format gguf --type q8_0 -o run.gguf"))
def export(
    checkpoint: Annotated[Optional[Path], typer.Argument(
        help="The model, as -m gives it", show_default=False)] = None,
    model: ModelOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="New directory (hf) or .gguf file (gguf) to write")] = ...,
    format: Annotated[str, typer.Option("--format", help="hf: a Hugging Face transformers model folder; gguf: one "
                                                         "file for llama.cpp, ollama and transformers")] = "hf",
    type: Annotated[Optional[str], typer.Option("--type", help="gguf: f32, f16, bf16 or q8_0 matrices "
                                                               "[default: f16]", show_default=False)] = None,
):
    """Write a model as a Hugging Face folder or a GGUF file.

    Prints the directory or file written."""
    from llmcli.formats import export_model

    print(export_model(_the_model(checkpoint, model), out, format, type))


def _the_model(argument: Optional[Path], option: Optional[Path]) -> Optional[Path]:
    """The model a command was given as its argument or with -m (one way or the other, not both); None: the
    default."""
    if argument is not None and option is not None:
        raise LLMError(f"two models given, {argument} and -m {option}: give one")
    if argument is not None and str(argument).lower() in ("true", "false") and not argument.exists():
        raise LLMError(f"no model {argument}: a flag such as --json takes no value")
    return option if option is not None else argument


@app.command(epilog=examples("llm info", "llm info -m run --json"))
def info(
    checkpoint: Annotated[Optional[Path], typer.Argument(
        help="The model, as -m gives it", show_default=False)] = None,
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
):
    """Describe a model: shape, parameters, context, size on disk.

    Architecture, parameter count, context, vocabulary, dtype and size on disk."""
    from llmcli.formats import model_info

    checkpoint = _the_model(checkpoint, model)
    about = model_info(checkpoint)
    if as_json:
        print(json.dumps(about))
        return
    about["parameters"] = f"{about['parameters']:,} ({about['parameters'] / 1e6:.2f}M)"
    about["size_bytes"] = f"{about['size_bytes']:,} bytes ({about['size_bytes'] / 2**20:.1f} MiB)"
    width = max(map(len, about))
    for key, value in about.items():
        print(f"{key.replace('_bytes', ' on disk'):<{width}}  {value}")


@app.command(epilog=examples("llm models", "llm models --json"))
def models(as_json: Annotated[bool, typer.Option("--json", help="One JSON object a model")] = False):
    """The models -m takes without a path: shipped, $LLM_MODEL, cached.

    The shipped model, $LLM_MODEL, and the models in the Hugging Face cache (ORG/NAME, ORG/NAME:FILE.gguf), with
    format and size. Any other ORG/NAME is downloaded when first used."""
    from llmcli.formats import available_models

    for entry in available_models():
        if as_json:
            print(json.dumps(entry))
        else:
            size = _size(entry["size_bytes"]) if entry["size_bytes"] is not None else "-"
            print(f"{entry['model']}\t{entry['format']}\t{size}")


@app.command(epilog=examples("llm cache", "llm cache --clear"))
def cache(
    clear: Annotated[bool, typer.Option("--clear", help="Delete the cached token shards")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object an entry")] = False,
):
    """List, or clear, the cache of tokenized corpora.

    The token cache ($LLM_CACHE_DIR, default ~/.cache/llmcli): its entries (size, tokens, corpus) and their
    total; --clear deletes them (a run whose tokens are gone tokenizes its corpus again when resumed)."""
    from llmcli.text.shards import cache_entries, clear_cache, default_cache_dir

    if clear:
        freed = clear_cache()
        print(f"freed {_size(freed)} in {default_cache_dir() / 'tokens'}")
        return
    entries = cache_entries()
    for entry in entries:
        if as_json:
            print(json.dumps(entry))
        else:
            tokens = f"{entry['tokens']:,} tokens" if entry["tokens"] is not None else "being written"
            print(f"{_size(entry['bytes']):>10}  {tokens:>20}  {entry['path']}  {' '.join(entry['corpus'])}")
    if not as_json:
        print(f"{_size(sum(e['bytes'] for e in entries)):>10}  total in {default_cache_dir() / 'tokens'}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


_terminated = False


def _terminate(signum, frame):
    global _terminated
    _terminated = signal.Signals(signum).name
    raise Terminated  # SIGTERM (or SIGHUP) stops a command as Ctrl-C does: cleanup runs, exit 130


def main():
    # before any command imports torch or NumPy: the process tuned for the command (llmcli/runtime.py)
    from llmcli.runtime import configure

    configure(next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None))
    signal.signal(signal.SIGTERM, _terminate)
    sys.stdout = _Results(sys.stdout)
    # typer itself turns usage errors into exit 2 and Ctrl-C into exit 130; our own errors are one line and exit 1
    try:
        app()
    except SystemExit as e:
        code = e.code
        # the reader of stdout went away (`llm ... | head`): click then wraps stdout to silence it and exits 1;
        # that is how a pipeline ends, not a failure, so exit 0 with nothing more written
        if type(sys.stdout).__name__ == "PacifyFlushWrapper":  # click's, or the copy typer carries
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
            code = 0
    except LLMError as e:
        code = _fail(str(e))
    except OSError as e:  # the system refused a read or write we did not expect to fail: say which and why
        code = _fail(_describe_os_error(e))
    except MemoryError:
        code = _fail("out of memory")
    if code == 130 and _terminated:
        sys.stderr.write(f"llm: stopped by {_terminated}\n")
    _flush_stdout()
    sys.exit(code)


def _fail(message: str) -> int:
    sys.stderr.write(f"llm: error: {message}\n")  # one write: the lines of several processes do not interleave
    return 1


def _describe_os_error(e: OSError) -> str:
    import errno

    if e.errno == errno.ENOSPC:
        reason = "the disk is full"
    else:
        reason = e.strerror or str(e)
    return f"{e.filename}: {reason}" if e.filename else reason


class _Results:
    """sys.stdout, whose write errors (a full disk, /dev/full) say that the output could not be written."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise _output_error(e) from None

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            raise _output_error(e) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _output_error(e: OSError) -> OSError:
    import errno

    if e.errno == errno.EPIPE:  # click's own handling of a closed pipe (| head) stays as it is
        return e
    return LLMError(f"cannot write the output: {_describe_os_error(e)}")


def _flush_stdout():
    """Results written to a full disk or /dev/full: one line and exit 1, not Python's own report at exit; a reader
    that went away (| head): exit 0. stdout is then pointed at /dev/null so that the interpreter's last flush has
    nothing to fail on."""
    try:
        sys.stdout.flush()
    except (OSError, LLMError) as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
        if isinstance(e, BrokenPipeError):
            sys.exit(0)
        _fail(str(e))
        sys.exit(1)
