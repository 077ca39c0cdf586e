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
    from llmcli.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("ckpt2") / "other"
    pretrain([str(shakespeare_slice)], out, preset="nano",
             overrides={"max_steps": 10, "eval_interval": 10, "vocab_size": 384})
    return out


def test_windows_predict_every_token_once():
    from llmcli.eval.evaluate import windows

    for n, context, stride in [(10, 4, 4), (10, 4, 3), (10, 4, 1), (3, 4, 2), (200, 64, 32), (65, 64, 64)]:
        length = min(context, n - 1)
        predicted = [start + 1 + i for start, offset in windows(n, context, stride) for i in range(offset, length)]
        assert sorted(predicted) == list(range(1, n)), (n, context, stride)


def test_stride_one_gives_every_token_its_full_context(nano_checkpoint, text_file):
    from llmcli.eval.evaluate import evaluate_file, tokenize_file
    from llmcli.formats import load_model

    model, tok, _ = load_model(nano_checkpoint)
    ids = torch.tensor(tokenize_file(tok, str(text_file))[0])
    C = model.config.context
    with torch.no_grad():  # reference: each token alone, after the (up to) C tokens before it
        nll = sum(F.cross_entropy(model(ids[max(0, i - C):i][None])[0, -1], ids[i]).item() for i in range(1, len(ids)))
    result = evaluate_file(model, tok, str(text_file), batch_size=16, stride=1)
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert result["tokens"] == len(ids) - 1 and result["stride"] == 1 and result["context"] == C
    consecutive = evaluate_file(model, tok, str(text_file), stride=C)
    assert consecutive["windows"] < result["windows"] and consecutive["loss"] != result["loss"]


def test_eval_several_models_one_table(nano_checkpoint, second_checkpoint, text_file, shakespeare_slice, tmp_path):
    other = tmp_path / "other.txt"  # a second file: a few thousand characters make the point
    other.write_text(shakespeare_slice.read_text()[:6_000])
    ev = run_cli("eval", "-m", nano_checkpoint, "-m", second_checkpoint, text_file, other, "--json",
                 "--stride", "32")
    assert ev.returncode == 0, ev.stderr
    rows = [json.loads(line) for line in ev.stdout.splitlines()]
    assert [(r["model"], r["file"]) for r in rows] == [(str(m), str(f)) for m in (nano_checkpoint, second_checkpoint)
                                                       for f in (text_file, other)]
    assert all(r["stride"] == 32 and r["tokens_per_s"] > 0 for r in rows)
    # different tokenizers: different token counts of the same file, both scored per byte of it
    assert rows[0]["tokens"] != rows[2]["tokens"] and rows[0]["bytes"] == rows[2]["bytes"]
    assert rows[0]["bits_per_byte"] < rows[2]["bits_per_byte"]  # 60 steps beat 10
    table = run_cli("eval", "-m", nano_checkpoint, "-m", second_checkpoint, text_file, "--stride", "32")
    assert table.returncode == 0, table.stderr
    assert "bits per byte" in table.stdout and "stride 32" in table.stdout
    assert f"{rows[0]['bits_per_byte']:.4f}" in table.stdout and f"{rows[2]['bits_per_byte']:.4f}" in table.stdout


def choice_logprob(model, tok, context: str, choice: str) -> float:
    """log P(choice | end-of-text + context), written out: the whole text encoded, the last context + 1 tokens kept."""
    ctx, whole = tok.encode(context), tok.encode(context + choice)
    assert whole[:len(ctx)] == ctx  # (the examples below are chosen so that the choice starts a new token)
    tokens = ([tok.end_of_text] + whole)[-(model.config.context + 1):]
    n = len(whole) - len(ctx)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([tokens[:-1]]))[0], dim=-1)
    return sum(logp[i, tokens[i + 1]].item() for i in range(len(tokens) - 1 - n, len(tokens) - 1))


def test_multiple_choice_task(nano_checkpoint, shakespeare_slice, tmp_path):
    """Accuracies and their standard errors equal those of log-likelihoods computed here; contexts longer than the
    model's are cut from the left."""
    import statistics

    from llmcli.formats import load_model

    model, tok, _ = load_model(nano_checkpoint)
    lines = [line for line in shakespeare_slice.read_text().splitlines() if len(line) > 30][:80]
    examples = []
    for i in range(0, 80, 4):
        # a line of the play against another line and a short word: no choice always wins; every other context is
        # far longer than the model's context (64 tokens), so only its end fits
        context = (" ".join(lines[max(0, i - 12):i]) if i % 8 == 4 else lines[i]) + "\n"
        choices = [lines[i + 1], lines[i + 3], "O"]
        examples.append({"context": context, "choices": choices, "answer": (i // 4) % 3})
    assert sum(len(tok.encode(e["context"])) > 64 for e in examples) >= 9
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(e) + "\n" for e in examples))
    ev = run_cli("eval", "-m", nano_checkpoint, task, "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)

    scores = [[choice_logprob(model, tok, e["context"], c) for c in e["choices"]] for e in examples]
    correct = [int(np.argmax(s) == e["answer"]) for s, e in zip(scores, examples)]
    per_byte = [[lp / len(c.encode()) for lp, c in zip(s, e["choices"])] for s, e in zip(scores, examples)]
    correct_norm = [int(np.argmax(s) == e["answer"]) for s, e in zip(per_byte, examples)]
    assert 0 < sum(correct) < 20 and correct != correct_norm  # the two accuracies measure different things
    assert result["examples"] == 20 and result["chance"] == pytest.approx(1 / 3)
    assert result["accuracy"] == pytest.approx(sum(correct) / 20)
    assert result["accuracy_norm"] == pytest.approx(sum(correct_norm) / 20)
    # the standard error of the mean: the sample standard deviation over the square root of n
    assert result["accuracy_stderr"] == pytest.approx(statistics.stdev(correct) / math.sqrt(20))
    assert result["accuracy_norm_stderr"] == pytest.approx(statistics.stdev(correct_norm) / math.sqrt(20))
    table = run_cli("eval", "-m", nano_checkpoint, task)
    assert table.returncode == 0, table.stderr
    assert "accuracy" in table.stdout and "chance" in table.stdout and f"{result['accuracy']:.3f}" in table.stdout


def _bad(*args, input=None):
    result = run_cli(*args, input=input)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("llm: error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_bad_eval_input(nano_checkpoint, text_file, tmp_path):
    from llmcli.errors import LLMError
    from llmcli.eval.tasks import read_task

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
    from llmcli.eval.embed import embed_texts
    from llmcli.formats import load_model

    model, tok, _ = load_model(nano_checkpoint)
    alone = embed_texts(model, tok, ["ROMEO:"])[0]
    assert np.allclose(alone, vectors[1], atol=1e-5)  # padding in a batch does not change an embedding
    # last pooling: the final hidden state at each text's own last token, computed here for each text alone
    last = embed_texts(model, tok, texts.splitlines(), pooling="last")
    for text, vector in zip(texts.splitlines(), last):
        with torch.no_grad():
            state = model.features(torch.tensor([[tok.end_of_text] + tok.encode(text)]))[0, -1]
        assert np.allclose(vector, F.normalize(state, dim=-1).numpy(), atol=1e-5), text
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
    first = run_cli("search", speeches[7], "--docs", docs, "-m", nano_checkpoint, "-n", "3")
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


def test_search_pooling_and_a_changed_model_get_their_own_embeddings(nano_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from llmcli.eval.embed import embed_texts
    from llmcli.formats import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(nano_checkpoint, model_dir)
    docs = tmp_path / "docs.txt"
    texts = ["the king is dead", "ROMEO: what light", "a horse, a horse", "my kingdom for a horse", "O Romeo"]
    docs.write_text("\n".join(texts) + "\n")

    def search(pooling):
        result = run_cli("search", "a horse", "--docs", docs, "-m", model_dir, "--pooling", pooling, "--json")
        assert result.returncode == 0, result.stderr
        return result, [json.loads(line) for line in result.stdout.splitlines()]

    def expected(pooling):  # cosines computed here, with the model on disk now
        model, tok, _ = load_model(model_dir)
        vectors = embed_texts(model, tok, texts, pooling)
        return vectors @ embed_texts(model, tok, ["a horse"], pooling)[0]

    mean, mean_hits = search("mean")
    last, last_hits = search("last")
    assert "cached the document embeddings" in mean.stderr and "cached the document embeddings" in last.stderr
    for hits, pooling in ((mean_hits, "mean"), (last_hits, "last")):
        cosines = expected(pooling)
        assert [h["doc"] for h in hits] == [int(i) + 1 for i in np.argsort(-cosines, kind="stable")]
        assert [h["score"] for h in hits] == pytest.approx(sorted(cosines, reverse=True), abs=1e-5)
    assert "from the cache" in search("last")[0].stderr
    # the model's weights change: its cached embeddings are not used
    weights = load_file(model_dir / "model.safetensors")
    weights["norm_f.weight"] = weights["norm_f.weight"] * 2 + 1
    save_file(weights, model_dir / "model.safetensors")
    again, hits = search("last")
    assert "cached the document embeddings" in again.stderr
    assert [h["score"] for h in hits] == pytest.approx(sorted(expected("last"), reverse=True), abs=1e-5)


def test_task_files_are_told_from_text_files(tmp_path):
    from llmcli.eval.tasks import is_task_file

    corpus, task, text = tmp_path / "corpus.jsonl", tmp_path / "task.jsonl", tmp_path / "task.txt"
    corpus.write_text('{"text": "Once upon a time"}\n')
    task.write_text('\n{"context": "a", "choices": [" b", " c"], "answer": 0}\n')
    text.write_text(task.read_text())
    assert not is_task_file(corpus) and is_task_file(task) and not is_task_file(text)
