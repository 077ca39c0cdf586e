"""The commands as a user runs them: exit codes, what goes to stdout and stderr, and the messages for bad input."""

import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import SHAKESPEARE, run_cli


def test_pretrain_generate_eval_end_to_end(tmp_path):
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:300_000])
    out = tmp_path / "run"
    result = run_cli("pretrain", corpus, "--preset", "nano", "--max-steps", "150", "--eval-interval", "50",
                     "--seed", "1", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)  # stdout carries the result only
    assert "val loss" in result.stderr and "train loss curve" in result.stderr
    for name in ("model.safetensors", "config.yaml", "tokenizer.model", "metrics.jsonl"):
        assert (out / name).is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 50, 100, 150]
    assert val[-1] < 0.7 * val[0], val  # from ~ln(512) = 6.2 to well below
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["summary"]["val_loss"] == pytest.approx(val[-1])

    drawn = run_cli("plot", out, out, "-o", tmp_path / "loss.png")
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.strip() == str(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    not_a_run = run_cli("plot", tmp_path, "-o", tmp_path / "x.png")
    assert not_a_run.returncode == 1 and "has no metrics.jsonl" in not_a_run.stderr

    gen = run_cli("generate", "ROMEO:", "-m", out, "--max-new-tokens", "40", "--seed", "3")
    assert gen.returncode == 0, gen.stderr
    assert len(gen.stdout.strip()) > 20
    again = run_cli("generate", "ROMEO:", "-m", out, "--max-new-tokens", "40", "--seed", "3")
    assert again.stdout == gen.stdout  # same seed, same text

    samples = run_cli("generate", "-", "-m", out, "--max-new-tokens", "10", "-n", "2", input="To be\nKING:\n")
    assert samples.returncode == 0, samples.stderr
    assert samples.stdout.count("<|endoftext|>\n") == 4  # 2 prompts x 2 samples, each closed by the separator

    # a text that fits one window (the context is 64 tokens): its loss, perplexity and bits per byte written out
    import math

    import torch
    import torch.nn.functional as F

    from llmcli.formats import load_model

    model, tok, _ = load_model(out)
    short = tmp_path / "short.txt"
    short.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n")
    scored = short.read_text().removesuffix("\n")  # the line ending that closes the file is no text (README)
    ids = [tok.end_of_text] + tok.encode(scored)
    assert len(ids) <= 64
    with torch.no_grad():
        nll = F.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]), reduction="sum").item()
    ev = run_cli("eval", "-m", out, short, "--json")
    assert ev.returncode == 0, ev.stderr
    scores = json.loads(ev.stdout)
    assert scores["context"] == 64 and scores["tokens"] == len(ids) - 1
    assert scores["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert scores["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(scored.encode()), rel=1e-5)
    table = run_cli("eval", "-m", out, short)
    assert "bits/byte" in table.stdout and f"{scores['bits_per_byte']:.4f}" in table.stdout


def test_pretrain_reads_stdin_and_accepts_a_tokenizer(nano_checkpoint, shakespeare_slice, tmp_path):
    result = run_cli("pretrain", "-", "--preset", "nano", "--max-steps", "5", "-t", nano_checkpoint,
                     "-o", tmp_path / "run", input=shakespeare_slice.read_text())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == (nano_checkpoint / "tokenizer.model").read_bytes()


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from llmcli.cli import app; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    result = run_cli("--help")
    assert result.returncode == 0 and "pretrain" in result.stdout
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmcli", "tokenize", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and " torch" not in result.stderr


def _bad(*args, input=None, cwd=None):
    result = run_cli(*args, input=input, cwd=cwd)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("llm: error: "), result.stderr
    return lines[-1]


def test_bad_corpus_inputs(tmp_path, nano_checkpoint):
    assert "does not exist" in _bad("pretrain", tmp_path / "missing.txt", "--preset", "nano")
    assert "is a directory" in _bad("pretrain", tmp_path, "--preset", "nano")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in _bad("pretrain", empty, "--preset", "nano", "-o", tmp_path / "r1")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("word " * 100 + "\ncaf\xe9\n").encode("latin-1"))
    assert "not UTF-8 at line 2" in _bad("pretrain", latin, "--preset", "nano", "-o", tmp_path / "r2")
    small = tmp_path / "small.txt"
    small.write_text("just a few words here, repeated a little. " * 20)
    message = _bad("pretrain", small, "--preset", "nano", "-o", tmp_path / "r3")
    assert "Vocabulary size too high (512)" in message and "smaller --vocab-size" in message
    message = _bad("pretrain", small, "--preset", "nano", "-t", nano_checkpoint, "-o", tmp_path / "r4")
    assert "too small" in message and "context + 1 = 65" in message


def test_bad_settings(tmp_path, shakespeare_slice):
    assert "unknown preset 'huge'" in _bad("pretrain", shakespeare_slice, "--preset", "huge")
    config = tmp_path / "run.yaml"
    config.write_text("train: {lr: fast}\n")
    assert "'train.lr' must be float" in _bad("pretrain", shakespeare_slice, "--config", config)
    config.write_text("train: {epochs: 3}\n")
    assert "unknown key 'train.epochs'" in _bad("pretrain", shakespeare_slice, "--config", config)


def test_bad_checkpoints(nano_checkpoint, tmp_path):
    import shutil

    assert "does not exist" in _bad("generate", "hi", "-m", tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(nano_checkpoint, broken)
    (broken / "tokenizer.model").unlink()
    assert "tokenizer.model is missing" in _bad("generate", "hi", "-m", broken)

    shutil.copy(nano_checkpoint / "tokenizer.model", broken)
    config = yaml.safe_load((broken / "config.yaml").read_text())
    config["model"]["n_embd"] = 32
    (broken / "config.yaml").write_text(yaml.safe_dump(config))
    assert "does not match config.yaml" in _bad("eval", "-m", broken, nano_checkpoint / "config.yaml")

    config["model"]["n_layer"] = "six"
    (broken / "config.yaml").write_text(yaml.safe_dump(config))
    assert "bad model settings: n_layer must be int, not 'six'" in _bad("generate", "hi", "-m", broken)

    config["model"]["n_embd"], config["model"]["n_layer"] = 64, 2
    (broken / "config.yaml").write_text(yaml.safe_dump(config))
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert "corrupt" in _bad("generate", "hi", "-m", broken)


def test_prompt_longer_than_the_context(nano_checkpoint):
    long_prompt = "KING: " + "word " * 200 + "ROMEO:"  # the nano model's context is 64 tokens
    assert "--truncate" in _bad("generate", long_prompt, "-m", nano_checkpoint)
    result = run_cli("generate", long_prompt, "-m", nano_checkpoint, "--truncate", "--max-new-tokens", "5", "--json",
                     "--temperature", "0")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    # the prompt's last 63 tokens are kept, which leaves room in the context for one new token
    assert record["prompt_tokens"] == 63 and record["new_tokens"] == 1 and record["finish_reason"] == "length"
    assert "keeping its last 63 (the context is 64)" in result.stderr
    # the token is the greedy choice after the prompt's last 63 tokens, computed here
    import torch

    from llmcli.formats import load_model

    model, tok, _ = load_model(nano_checkpoint)
    kept = tok.encode(long_prompt)[-63:]
    with torch.no_grad():
        token = int(model(torch.tensor([kept]))[0, -1].argmax())
    assert record["text"] == tok.decode(kept + [token])[len(tok.decode(kept)):]


def test_bad_sampling_options(nano_checkpoint):
    assert "--top-p" in _bad("generate", "hi", "-m", nano_checkpoint, "--top-p", "1.5")
    assert "--temperature" in _bad("generate", "hi", "-m", nano_checkpoint, "--temperature", "-1")


def test_bad_options_of_the_other_commands(nano_checkpoint, tmp_path):
    text = tmp_path / "one.txt"
    text.write_text("hello there\n")
    for command in ("eval", "embed"):  # usage errors (exit 2), not a traceback
        result = run_cli(command, text, "-m", nano_checkpoint, "--batch-size", "0")
        assert result.returncode == 2 and "--batch-size" in result.stderr and "Traceback" not in result.stderr
    assert _bad("classify", text, "-m", nano_checkpoint) == (f"llm: error: {nano_checkpoint} is not a classifier; "
                                                              "make one with llm finetune --task classify")
    message = _bad("plot", nano_checkpoint, "-o", tmp_path / "curve.txt")
    assert message.startswith(f"llm: error: cannot write {tmp_path / 'curve.txt'}: Format 'txt' is not supported")


COMMANDS = ["generate", "chat", "serve", "eval", "embed", "search", "classify", "pretrain", "finetune",
            "finetune train", "finetune merge", "tokenize", "tokenize train", "tokenize encode", "tokenize decode",
            "info", "export", "plot", "cache"]


def _help(*command: str) -> str:
    result = run_cli(*command, "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _option_entries(help_text: str) -> list[str]:
    """The entries of a help page's Options section, each joined into one line."""
    options = help_text.split("\nOptions:\n", 1)[1].split("\n\n", 1)[0]
    return [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", options) if entry.strip()]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_shows_defaults_and_examples(command):
    text = _help(*command.split())
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "<bool>" not in text  # a flag takes no value
    assert re.search(r"Examples:\n    .*llm ", text), text  # every command ends with examples
    for entry in _option_entries(text):
        if re.match(r"(-\w, )?--[\w-]+(, --[\w-]+)* <", entry):  # an option that takes a value
            assert "[default: " in entry or "[required]" in entry, entry


def test_top_level_help_starts_with_what_people_use_first():
    text = _help()
    lines = [line for line in text.split("Commands:\n", 1)[1].splitlines() if line.strip()]
    commands = [line.split()[0] for line in lines]
    assert commands[:3] == ["generate", "chat", "serve"] and set(commands) >= {"pretrain", "finetune", "tokenize"}
    assert all(not line.endswith("...") for line in lines)  # each summary fits its line whole
    model_help = " ".join(_help("generate").split())
    assert "[default: the shipped model, or $LLM_MODEL]" in model_help
    assert "--max-new-tokens, --max-tokens" in model_help


def test_one_way_to_name_a_model(tmp_path, nano_checkpoint):
    by_option = run_cli("info", "-m", nano_checkpoint, "--json")
    by_argument = run_cli("info", nano_checkpoint, "--json")
    assert by_option.returncode == 0 and by_option.stdout == by_argument.stdout, by_option.stderr
    assert json.loads(by_option.stdout)["parameters"] > 0
    # a flag takes no value: `--json true` is not read as a model
    assert "a flag such as --json takes no value" in _bad("info", "--json", "true")
    assert "give one" in _bad("info", nano_checkpoint, "-m", nano_checkpoint)
    out = tmp_path / "exported"
    exported = run_cli("export", "-m", nano_checkpoint, "-o", out)
    assert exported.returncode == 0 and exported.stdout.strip() == str(out), exported.stderr
    assert (out / "config.json").is_file()


def test_finetune_merge_is_a_subcommand_with_its_own_help():
    text = _help("finetune", "merge")
    assert "Usage:" in text and "finetune merge" in text and "--task" not in text
    assert "--task" in _help("finetune", "train")
    assert "merge" in _help("finetune") and "train" in _help("finetune")
    # `llm finetune` without a subcommand is training's, as it always was
    assert "give a JSONL data file" in _bad("finetune")
    assert "Missing argument" in run_cli("finetune", "merge").stderr


def test_max_tokens_names_max_new_tokens_and_system_needs_a_chat(nano_checkpoint):
    args = ("generate", "ROMEO:", "-m", nano_checkpoint, "--temperature", "0", "--json")
    one = json.loads(run_cli(*args, "--max-tokens", "5").stdout)
    other = json.loads(run_cli(*args, "--max-new-tokens", "5").stdout)
    assert one["text"] == other["text"] and one["new_tokens"] <= 5
    assert "--system is for a chat" in _bad("generate", "hi", "-m", nano_checkpoint, "-s", "be brief")
