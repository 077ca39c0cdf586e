"""llm eval (sliding windows, several models, multiple-choice tasks), llm embed and llm search."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli


@pytest.fixture(scope="module")
def text_file(shakespeare_slice, tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "speech.txt"
    path.write_text(shakespeare_slice.read_text()[100_000:100_800])
    return path


@pytest.fixture(scope="module")
def second_checkpoint(shakespeare_slice, tmp_path_factory):
    """Another model with another tokenizer (vocabulary 384), so only bits per byte compares the two."""
    from llmcli.train import pretrain

    out = tmp_path_factory.mktemp("ckpt2") / "other"
    pretrain([str(shakespeare_slice)], out, preset="nano",
             overrides={"max_steps": 10, "eval_interval": 10, "vocab_size": 384})
    return out


def test_windows_predict_every_token_once():
    from llmcli.evaluate import windows

    for n, context, stride in [(10, 4, 4), (10, 4, 3), (10, 4, 1), (3, 4, 2), (200, 64, 32), (65, 64, 64)]:
        length = min(context, n - 1)
        predicted = [start + 1 + i for start, offset in windows(n, context, stride) for i in range(offset, length)]
        assert sorted(predicted) == list(range(1, n)), (n, context, stride)


def test_stride_one_gives_every_token_its_full_context(nano_checkpoint, text_file):
    from llmcli.checkpoint import load_checkpoint
    from llmcli.evaluate import evaluate_file, tokenize_file

    model, tok, _ = load_checkpoint(nano_checkpoint)
    ids = torch.tensor(tokenize_file(tok, str(text_file)))
    C = model.config.context
    with torch.no_grad():  # reference: each token alone, after the (up to) C tokens before it
        nll = sum(F.cross_entropy(model(ids[max(0, i - C):i][None])[0, -1], ids[i]).item() for i in range(1, len(ids)))
    result = evaluate_file(model, tok, str(text_file), batch_size=16, stride=1)
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert result["tokens"] == len(ids) - 1 and result["stride"] == 1 and result["context"] == C
    consecutive = evaluate_file(model, tok, str(text_file), stride=C)
    assert consecutive["windows"] < result["windows"] and consecutive["loss"] != result["loss"]


def test_eval_several_models_one_table(nano_checkpoint, second_checkpoint, text_file, shakespeare_slice):
    ev = run_cli("eval", "-m", nano_checkpoint, "-m", second_checkpoint, text_file, shakespeare_slice, "--json",
                 "--stride", "32")
    assert ev.returncode == 0, ev.stderr
    rows = [json.loads(line) for line in ev.stdout.splitlines()]
    assert [(r["model"], r["file"]) for r in rows] == [(str(m), str(f)) for m in (nano_checkpoint, second_checkpoint)
                                                       for f in (text_file, shakespeare_slice)]
    assert all(r["stride"] == 32 and r["tokens_per_s"] > 0 for r in rows)
    # different tokenizers: different token counts of the same file, both scored per byte of it
    assert rows[0]["tokens"] != rows[2]["tokens"] and rows[0]["bytes"] == rows[2]["bytes"]
    assert rows[0]["bits_per_byte"] < rows[2]["bits_per_byte"]  # 60 steps beat 10
    table = run_cli("eval", "-m", nano_checkpoint, "-m", second_checkpoint, text_file, "--stride", "32")
    assert table.returncode == 0, table.stderr
    assert "bits per byte" in table.stdout and "stride 32" in table.stdout
    assert f"{rows[0]['bits_per_byte']:.4f}" in table.stdout and f"{rows[2]['bits_per_byte']:.4f}" in table.stdout


def test_multiple_choice_task(nano_checkpoint, shakespeare_slice, tmp_path):
    lines = [line for line in shakespeare_slice.read_text().splitlines() if len(line) > 30][:40]
    gibberish = "zqxj vbkw qqpf xzzk jjqv"
    task = tmp_path / "task.jsonl"
    examples = [{"context": lines[i] + "\n", "choices": [gibberish, lines[i + 1]], "answer": 1} for i in range(0, 40, 2)]
    task.write_text("".join(json.dumps(e) + "\n" for e in examples))
    ev = run_cli("eval", "-m", nano_checkpoint, task, "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["examples"] == 20 and result["chance"] == 0.5
    assert result["accuracy"] >= 0.9 and result["accuracy_norm"] >= 0.9  # real text beats gibberish
    p = result["accuracy"]
    assert result["accuracy_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 19))
    for e in examples:
        e["answer"] = 0
    task.write_text("".join(json.dumps(e) + "\n" for e in examples))
    wrong = json.loads(run_cli("eval", "-m", nano_checkpoint, task, "--json").stdout)
    assert wrong["accuracy"] == pytest.approx(1 - p)
    table = run_cli("eval", "-m", nano_checkpoint, task)
    assert "accuracy" in table.stdout and "chance" in table.stdout


def _bad(*args, input=None):
    result = run_cli(*args, input=input)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("llm: error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_bad_eval_input(nano_checkpoint, text_file, tmp_path):
    from llmcli.errors import LLMError
    from llmcli.tasks import read_task

    task = tmp_path / "task.jsonl"
    good = json.dumps({"context": "a", "choices": [" b", " c"], "answer": 0})
    for body, message in [("", "has no examples"),
                          (good + "\n[1, 2]\n", "line 2 is a JSON list"),
                          (good + "\n\n" + json.dumps({"context": "a", "choices": [" b", " c"]}),
                           "line 3 lacks the field 'answer'"),
                          (good + "\n{oops", "line 2 is not JSON")]:
        task.write_text(body)
        with pytest.raises(LLMError, match=message):
            read_task(task)
    # and through the command
    task.write_text(good + "\n" + json.dumps({"context": "a", "choices": [" b", " c"], "answer": 2}))
    assert "line 2: answer 2 is out of range for 2 choices" in _bad("eval", "-m", nano_checkpoint, task)
    task.write_text(json.dumps({"context": "a", "choices": [" b" * 100, " c"], "answer": 0}))
    assert "longer than the model's context" in _bad("eval", "-m", nano_checkpoint, task)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "has no text to score" in _bad("eval", "-m", nano_checkpoint, empty)
    assert "--stride must be between 1 and the model's context (64)" in _bad(
        "eval", "-m", nano_checkpoint, text_file, "--stride", "65")


def test_embed(nano_checkpoint, tmp_path):
    texts = "To be, or not to be\nROMEO:\n\nA much longer line, that the batch pads the others to, and further"
    out = run_cli("embed", "-m", nano_checkpoint, input=texts + "\n")
    assert out.returncode == 0, out.stderr
    vectors = np.array([json.loads(line) for line in out.stdout.splitlines()])
    assert vectors.shape == (4, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    from llmcli.checkpoint import load_checkpoint
    from llmcli.embed import embed_texts

    model, tok, _ = load_checkpoint(nano_checkpoint)
    alone = embed_texts(model, tok, ["ROMEO:"])[0]
    assert np.allclose(alone, vectors[1], atol=1e-5)  # padding in a batch does not change an embedding
    last = embed_texts(model, tok, texts.splitlines(), pooling="last")
    assert not np.allclose(last, vectors, atol=1e-3)

    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts.splitlines())))
    npy = run_cli("embed", records, "-m", nano_checkpoint, "--field", "body", "-o", tmp_path / "e.npy")
    assert npy.returncode == 0, npy.stderr
    assert np.allclose(np.load(npy.stdout.strip(), allow_pickle=False), vectors, atol=1e-5)
    st = run_cli("embed", records, "-m", nano_checkpoint, "--field", "body", "-o", tmp_path / "e.safetensors")
    from safetensors.numpy import load_file

    assert np.allclose(load_file(st.stdout.strip())["embeddings"], vectors, atol=1e-5)
    assert "line 2 has no text field 'text'" in _bad("embed", "-m", nano_checkpoint, "--field", "text",
                                                     input='{"text": "a"}\n{"body": "b"}\n')
    # the rule for empty input (README): a command that answers each line answers none with nothing
    empty = run_cli("embed", "-m", nano_checkpoint, input="")
    assert empty.returncode == 0 and empty.stdout == "" and "is empty" in empty.stderr
    assert "must end in .npy or .safetensors" in _bad("embed", "-m", nano_checkpoint, "-o", tmp_path / "e.txt",
                                                      input="a\n")


def test_search_finds_the_document_and_caches(nano_checkpoint, shakespeare_slice, tmp_path):
    speeches = [s.replace("\n", " ") for s in shakespeare_slice.read_text().split("\n\n")[:60] if len(s) > 80]
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(speeches) + "\n")
    first = run_cli("search", speeches[7], "--docs", docs, "-m", nano_checkpoint, "-k", "3")
    assert first.returncode == 0, first.stderr
    rank, score, number, text = first.stdout.splitlines()[0].split("\t")
    assert (rank, number) == ("1", "8") and float(score) == pytest.approx(1, abs=1e-4)
    assert len(first.stdout.splitlines()) == 3 and "cached the document embeddings" in first.stderr
    assert len(list(tmp_path.glob(".docs.txt.*.embeddings.safetensors"))) == 1
    again = run_cli("search", speeches[20], "--docs", docs, "-m", nano_checkpoint, "--json")
    assert "from the cache" in again.stderr
    hits = [json.loads(line) for line in again.stdout.splitlines()]
    assert hits[0]["doc"] == 21 and hits[0]["text"] == speeches[20] and len(hits) == 5
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    docs.write_text("\n".join(speeches[:10]) + "\n")  # new content, new key
    changed = run_cli("search", speeches[3], "--docs", docs, "-m", nano_checkpoint)
    assert "cached the document embeddings" in changed.stderr
    assert len(list(tmp_path.glob(".docs.txt.*.embeddings.safetensors"))) == 2
    assert "the query is empty" in _bad("search", " ", "--docs", docs, "-m", nano_checkpoint)


def test_task_files_are_told_from_text_files(tmp_path):
    from llmcli.tasks import is_task_file

    corpus, task, text = tmp_path / "corpus.jsonl", tmp_path / "task.jsonl", tmp_path / "task.txt"
    corpus.write_text('{"text": "Once upon a time"}\n')
    task.write_text('\n{"context": "a", "choices": [" b", " c"], "answer": 0}\n')
    text.write_text(task.read_text())
    assert not is_task_file(corpus) and is_task_file(task) and not is_task_file(text)
