"""llm finetune (instructions): the loss mask, a tiny instruction set learned exactly, resume, bad input."""

import json

import pytest
import yaml
from conftest import run_cli

from llmcli.text.chat_template import ChatTemplate
from llmcli.text.tokenizer import Tokenizer
from llmcli.train.finetune import CHAT_TEMPLATE, SFTBatches, sft_example
from llmcli.train.loop import IGNORE

INSTRUCTIONS = [
    {"prompt": "Say hello.", "response": "Hello there."},
    {"prompt": "Name a color.", "response": "Blue."},
    {"prompt": "What is two plus two?", "response": "Four."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name an animal."},
                  {"role": "assistant", "content": "A cat."}]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_only_reply_tokens_carry_loss(nano_checkpoint):
    tok = Tokenizer(nano_checkpoint)
    template = ChatTemplate.for_tokenizer(CHAT_TEMPLATE, tok)
    messages = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there."}]
    ids, trained = sft_example(tok, template, messages, train_on_prompt=False)
    assert ids[0] == tok.end_of_text and not trained[0]
    # the prompt is exactly what generation will be given, and the trained tokens are the reply and its end
    n_prompt = trained.index(True)
    assert tok.decode(ids[1:n_prompt]) == template.prompt(messages[:1]) == "<|user|>\nSay hello.\n<|assistant|>\n"
    assert all(trained[n_prompt:]) and ids[-1] == tok.end_of_text
    assert tok.decode(ids[n_prompt:-1]) == "Hello there."

    inputs, targets = SFTBatches.collate([(ids, trained), (ids[:n_prompt + 2], trained[:n_prompt + 2])])
    assert inputs.shape == targets.shape == (2, len(ids) - 1)
    assert (targets[0, :n_prompt - 1] == IGNORE).all()  # targets that are prompt tokens: no loss
    assert targets[0, n_prompt - 1:].tolist() == ids[n_prompt:]  # every reply token (and the end) is a target
    assert (targets[1, n_prompt + 1:] == IGNORE).all()  # padding: no loss

    _, all_trained = sft_example(tok, template, messages, train_on_prompt=True)
    assert all(all_trained[1:])  # the first token is never a target


def test_learns_a_tiny_instruction_set(tmp_path, nano_checkpoint):
    data = write_jsonl(tmp_path / "inst.jsonl", INSTRUCTIONS)
    out = tmp_path / "sft"
    result = run_cli("finetune", data, "-m", nano_checkpoint, "--max-steps", "60", "--lr", "3e-3",
                     "--batch-size", "8", "--eval-interval", "30", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(out)
    assert "loss on replies only" in result.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["task"] == "sft" and config["generation"]["chat_template"] == CHAT_TEMPLATE
    assert config["generation"]["prompt_template"] == "<|user|>\n{prompt}\n<|assistant|>\n"
    prompts = [r["prompt"] for r in INSTRUCTIONS[:3]]
    gen = run_cli("generate", "-", "-m", out, "--temperature", "0", "--max-new-tokens", "20",
                  input="".join(p + "\n" for p in prompts))
    assert gen.returncode == 0, gen.stderr
    samples = gen.stdout.split("<|endoftext|>\n")  # several prompts: each sample ends with a separator line
    assert [s.strip() for s in samples] == [r["response"] for r in INSTRUCTIONS[:3]] + [""]

    # the run resumes like a pretraining run
    more = run_cli("finetune", "--resume", out, "--max-steps", "62")
    assert more.returncode == 0, more.stderr
    assert "resuming" in more.stderr and (out / "checkpoints" / "step-0000062").is_dir()


def test_bad_input_says_which_line(tmp_path, nano_checkpoint):
    cases = {
        "missing.jsonl": ('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', "missing.jsonl: line 2: missing field 'response'"),
        "bad.jsonl": ('{"prompt": "a", "response": "b"}\n\n{"prompt": oops}\n', "bad.jsonl: line 3 is not JSON"),
        "empty.jsonl": ("\n", "has no records"),
        "nolabel.jsonl": ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "needs at least two"),
        "role.jsonl": ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "role.jsonl: line 1: each message needs"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        task = ["--task", "classify"] if name == "nolabel.jsonl" else []
        result = run_cli("finetune", tmp_path / name, *task, "-m", nano_checkpoint, "-o", tmp_path / "out")
        assert result.returncode == 1, name
        assert result.stderr.startswith("llm: error: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
    # a missing data file is said before the base model is loaded (here a base that does not exist either)
    result = run_cli("finetune", tmp_path / "typo.jsonl", "-m", tmp_path / "no-model", "-o", tmp_path / "out2")
    assert result.returncode == 1 and result.stderr == f"llm: error: {tmp_path / 'typo.jsonl'} does not exist\n"
    result = run_cli("finetune", "-", "-m", tmp_path / "no-model", "-o", tmp_path / "out2", input="{}\n")
    assert result.returncode == 1 and "reads its records from a file, not stdin" in result.stderr, result.stderr
    result = run_cli("finetune", tmp_path / "bad.jsonl", "--task", "clasify", "-m", tmp_path / "no-model")
    assert result.returncode == 1 and result.stderr == "llm: error: unknown task 'clasify'; choose sft or classify\n"


def _losses(run_dir) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], kind): r[kind] for r in rows for kind in ("train_loss", "val_loss") if kind in r}


def test_lora_options_micro_batches_exact_resume_and_refusals(tmp_path, nano_checkpoint):
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(nano_checkpoint, base)
    data = write_jsonl(tmp_path / "inst.jsonl", INSTRUCTIONS * 3)
    # (no LoRA dropout: a batch split in two draws other dropout masks; test_lora.py runs --lora-dropout)
    common = ("-m", base, "--lora-rank", "4", "--lora-alpha", "8", "--train-on-prompt",
              "--seed", "3", "--batch-size", "4", "--lr", "1e-2", "--max-steps", "6", "--save-interval", "2",
              "--eval-interval", "3", "--precision", "fp32")
    run = tmp_path / "run"
    result = run_cli("finetune", data, *common, "--micro-batch-size", "2", "-o", run)
    assert result.returncode == 0, result.stderr
    assert "loss on every token" in result.stderr and "2 micro-batches of 2" in result.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["finetune"]["train_on_prompt"] is True
    assert (config["adapter"]["alpha"], config["adapter"]["rank"]) == (8.0, 4)
    assert (config["train"]["seed"], config["train"]["micro_batch_size"]) == (3, 2)

    # micro-batches: the losses of one batch of 4 (prompt and padding targets masked: unequal token counts)
    whole = tmp_path / "whole"
    result = run_cli("finetune", data, *common, "-o", whole)
    assert result.returncode == 0, result.stderr
    assert _losses(whole).keys() == _losses(run).keys()
    assert _losses(whole) == pytest.approx(_losses(run), rel=1e-5)

    # resume from step 4 repeats steps 5 and 6 bit for bit
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000006")
    result = run_cli("finetune", "--resume", resumed)
    assert result.returncode == 0, result.stderr
    assert "from step 4" in result.stderr
    assert _losses(resumed) == _losses(run)

    # refusals: a changed setting, an existing run as -o, an adapter as the base, a changed base
    assert "--resume keeps the run's settings; lr cannot change" in _refused("finetune", "--resume", run, "--lr", "1")
    assert "already exists; continue it with --resume" in _refused("finetune", data, "-m", base, "-o", run)
    assert "is a classifier or an adapter" in _refused("finetune", data, "-m", run, "-o", tmp_path / "x")
    assert "already exists; choose a new directory" in _refused("finetune", "merge", run, "-o", whole)
    weights = load_file(base / "model.safetensors")
    weights["norm_f.weight"] = weights["norm_f.weight"] + 1
    save_file(weights, base / "model.safetensors")
    assert "has changed since" in _refused("finetune", "--resume", run, "--max-steps", "8")


def _refused(*args) -> str:
    result = run_cli(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr
