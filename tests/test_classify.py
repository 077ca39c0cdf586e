"""llm finetune --task classify: which corpus a passage comes from (Shakespeare or TinyStories), llm eval, llm classify."""

import json
import random

import yaml
from conftest import SHAKESPEARE, TINYSTORIES_VALID, run_cli

from llmcli.formats import load_model


def passages(path, label, n, rng, chars=160):
    """n passages of about `chars` characters, whitespace folded so that line breaks give nothing away."""
    text = " ".join(path.read_text(encoding="utf-8")[:400_000].replace("<|endoftext|>", " ").split())
    starts = rng.sample(range(0, len(text) - chars), n)
    return [{"text": text[s:s + chars].split(" ", 1)[1].rsplit(" ", 1)[0], "label": label} for s in starts]


def write_split(tmp_path, n_train, n_val):
    rng = random.Random(0)
    records = passages(SHAKESPEARE, "shakespeare", n_train + n_val, rng) + \
        passages(TINYSTORIES_VALID, "tinystories", n_train + n_val, rng)
    rng.shuffle(records)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records[:2 * n_train]))
    val.write_text("".join(json.dumps(r) + "\n" for r in records[2 * n_train:]))
    return train, val, records[2 * n_train:]


def test_tells_shakespeare_from_tinystories(tmp_path, nano_checkpoint):
    train, val, val_records = write_split(tmp_path, 200, 50)
    out = tmp_path / "cls"
    result = run_cli("finetune", "--task", "classify", train, "--val", val, "-m", nano_checkpoint,
                     "--max-steps", "40", "--lr", "2e-3", "-o", out)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["task"] == "classify" and config["labels"] == ["shakespeare", "tinystories"]

    report = run_cli("eval", "-m", out, val, "--json")
    assert report.returncode == 0, report.stderr
    scores = json.loads(report.stdout)
    assert scores["examples"] == 100 and scores["accuracy"] >= 0.9 and scores["macro_f1"] >= 0.9
    assert sum(map(sum, scores["confusion"])) == 100
    about = json.loads(run_cli("info", out, "--json").stdout)
    assert about["task"] == "classifier (shakespeare, tinystories)"
    assert about["parameters"] == load_model(out)[0].num_params()
    export = run_cli("export", out, "--format", "hf", "-o", tmp_path / "hf")
    assert export.returncode == 1
    assert export.stderr == f"llm: error: {out} is a classifier; export writes language models\n"
    quantized = run_cli("eval", "-m", out, val, "--json", "--quantize", "int8")
    assert quantized.returncode == 0, quantized.stderr
    assert json.loads(quantized.stdout)["accuracy"] >= 0.9
    table = run_cli("eval", "-m", out, val)
    assert "accuracy" in table.stdout and "gold \\ predicted" in table.stdout

    texts = [r["text"] for r in val_records[:10]]
    labels = run_cli("classify", "-m", out, input="".join(t + "\n" for t in texts))
    assert labels.returncode == 0, labels.stderr
    predicted = labels.stdout.splitlines()
    assert len(predicted) == 10 and set(predicted) <= {"shakespeare", "tinystories"}
    assert sum(p == r["label"] for p, r in zip(predicted, val_records)) >= 8
    rows = [json.loads(line) for line in run_cli("classify", "-m", out, "--json", input=texts[0] + "\n").stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["label"] == predicted[0]
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5

    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"text": "hello", "label": "poetry"}\n')
    bad = run_cli("eval", "-m", out, unknown)
    assert bad.returncode == 1 and "unknown.jsonl: line 1: label 'poetry' is not one of" in bad.stderr
    no_text = run_cli("generate", "hello", "-m", out)
    assert no_text.returncode == 1 and "is a classifier" in no_text.stderr
    no_chat = run_cli("chat", "-m", out, input="")
    assert no_chat.returncode == 1 and "is a classifier" in no_chat.stderr
    not_classifier = run_cli("classify", "-m", nano_checkpoint, input="hello\n")
    assert not_classifier.returncode == 1 and "not a classifier" in not_classifier.stderr
