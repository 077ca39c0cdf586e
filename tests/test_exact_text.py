"""Exact text, honest numbers and real pipelines (issue 15), through the CLI as a user meets them: sampling edges,
byte-exact round trips for both tokenizer kinds, bits per byte whatever the line endings, tokenizer training on long
and empty corpora, streaming pipes that end quietly, resume on the same data only, and the small messages."""

import json
import os
import re
import shutil
import subprocess
import threading

import pytest
import yaml
import zygote
from conftest import ROOT, SHAKESPEARE, TINYSTORIES_VALID, run_cli

from llmcli.text.tokenizer import load_tokenizer

# every kind of text the readers must keep: CR LF and lone CR line endings, a literal U+2581 (SentencePiece's sign
# for a space), control characters other than NUL, Unicode line separators, a long line, and no final newline
AWKWARD = ("one\r\ntwo\r\n" "a\u2581b \u2581\u2581 x\u2581\n" "\u2581\n" "ctl \x01\x0b\x0c\x1b\x7f\tend\n"
           "sep\u2028\u0085|\n" "mac\rline\r\n\n" + "long line " * 3000 + "\n" "no final newline")


@pytest.fixture(scope="module")
def sentencepiece_dir(shakespeare_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "tok"
    result = run_cli("tokenize", "train", shakespeare_slice, "--vocab-size", "400", "-o", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    """A GPT-2 style byte-level BPE (Hugging Face `tokenizers`) in a folder, as HF models bring one."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(SHAKESPEARE.read_text(encoding="utf-8")[:30_000].splitlines(), vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    directory = tmp_path_factory.mktemp("bpe")
    tok.save(str(directory / "tokenizer.json"))
    return directory


# --- 1. sampling controls at their edges -----------------------------------------------------------------------

def test_top_k_1_is_greedy_and_k_past_the_vocabulary_is_off(nano_checkpoint):
    args = ("generate", "ROMEO:", "-m", nano_checkpoint, "--max-new-tokens", "12", "--seed", "1")
    greedy = run_cli(*args, "--temperature", "0")
    top1 = run_cli(*args, "--top-k", "1", "--temperature", "1.5")
    assert top1.returncode == 0 and "Traceback" not in top1.stderr, top1.stderr
    assert top1.stdout == greedy.stdout and len(greedy.stdout) > 1
    assert run_cli(*args, "--top-k", "512").stdout == run_cli(*args, "--top-k", "0").stdout == \
        run_cli(*args, "--top-k", "100000").stdout  # k >= vocabulary (512) keeps every token
    assert run_cli(*args, "--min-p", "1").returncode == 0 and run_cli(*args, "--top-p", "1").returncode == 0
    tiny = run_cli(*args, "--temperature", "1e-300")
    assert tiny.returncode == 0 and tiny.stdout == greedy.stdout, tiny.stderr  # no nan from a tiny temperature


# --- 2. text that survives a round trip --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
def test_encode_decode_gives_back_every_byte(kind, request, tmp_path):
    tokenizer = request.getfixturevalue("sentencepiece_dir" if kind == "sentencepiece" else "byte_level_dir")
    source = tmp_path / "awkward.txt"
    source.write_bytes(AWKWARD.encode("utf-8"))
    for json_option in ([], ["--json"]):
        encoded = run_cli("tokenize", "encode", source, "-t", tokenizer, *json_option, input=b"")
        assert encoded.returncode == 0, encoded.stderr
        assert encoded.stdout.count(b"\n") == AWKWARD.count("\n")  # a line of ids a line, ended as it was
        decoded = run_cli("tokenize", "decode", "-t", tokenizer, input=encoded.stdout)
        assert decoded.returncode == 0, decoded.stderr
        assert decoded.stdout == AWKWARD.encode("utf-8")
    # a missing final newline is not added, and a literal U+2581 is not a space
    for text in (b"abc", "a\u2581b\n".encode()):
        ids = run_cli("tokenize", "encode", "-t", tokenizer, input=text).stdout
        assert run_cli("tokenize", "decode", "-t", tokenizer, input=ids).stdout == text


def test_every_reader_keeps_the_text(sentencepiece_dir, tmp_path):
    """Corpora (text files, CR LF or not, and JSON lines) reach the token shards with every character, U+2581 too."""
    from llmcli.text.data import read_documents, read_lines

    text = "first \u2581 line\r\nsecond\u2581\r\n<|endoftext|>\r\nnext\tdoc\x0b\r\n"
    (tmp_path / "a.txt").write_bytes(text.encode())
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x\u2581y\r\nz"}) + "\r\n")
    docs = list(read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"]))
    assert docs == ["first \u2581 line\nsecond\u2581", "next\tdoc\x0b", "x\u2581y\r\nz"]
    tok = load_tokenizer(sentencepiece_dir)
    assert [tok.decode(ids) for ids in tok.encode_batch(docs)] == docs
    assert tok.encode("a\u2581b") != tok.encode("a b")
    assert list(read_lines(tmp_path / "a.txt"))[:2] == ["first \u2581 line", "second\u2581"]


# --- 3. bits per byte counts the bytes it scores -----------------------------------------------------------------

def test_bits_per_byte_is_the_same_whatever_the_line_endings(nano_checkpoint, tmp_path):
    lf = TINYSTORIES_VALID.read_text(encoding="utf-8")[:3000].encode()  # cut inside a line: no final newline
    variants = {"lf.txt": lf, "crlf.txt": lf.replace(b"\n", b"\r\n") + b"\r",  # sed 's/$/\r/'
                "final-newline.txt": lf + b"\n"}
    for name, content in variants.items():
        (tmp_path / name).write_bytes(content)
    result = run_cli("eval", "-m", nano_checkpoint, *(tmp_path / name for name in variants), "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    # the bytes are those of the documents' text: their lines joined by newlines, without the separator lines
    docs, lines = [], []
    for line in lf.decode().split("\n") + ["<|endoftext|>"]:
        if line.strip() == "<|endoftext|>":
            docs += ["\n".join(lines)] if lines else []
            lines = []
        else:
            lines.append(line)
    assert rows[0]["bytes"] == sum(len(d.encode()) for d in docs) < len(lf)
    for row in rows[1:]:
        assert (row["tokens"], row["bytes"], row["bits_per_byte"]) == \
            (rows[0]["tokens"], rows[0]["bytes"], rows[0]["bits_per_byte"])


# --- 4. tokenizer training on long, blank and small corpora --------------------------------------------------

def test_long_documents_are_trained_on_and_pretrain_without_a_tokenizer(tmp_path):
    stories = TINYSTORIES_VALID.read_text(encoding="utf-8").replace("\n", " ")
    records = tmp_path / "docs.jsonl"
    records.write_text("".join(json.dumps({"text": stories[i * 5000:(i + 1) * 5000]}) + "\n" for i in range(20)))
    result = run_cli("pretrain", records, "--preset", "nano", "--max-steps", "2", "-o", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    # long lines mixed with short ones are trained on too: a word only the long lines have gets its own piece
    corpus = tmp_path / "mixed.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:5000] + ("quokka " * 1000 + "\n") * 5)
    result = run_cli("tokenize", "train", corpus, "--vocab-size", "400", "-o", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    assert len(load_tokenizer(tmp_path / "tok").encode(" quokka")) == 1


def test_blank_and_small_corpora_say_what_is_wrong_and_leave_nothing(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n")
    for args, stdin in (([blank], None), (["-"], "")):
        result = run_cli("tokenize", "train", *args, "--vocab-size", "512", "-o", tmp_path / "tok", input=stdin)
        assert result.returncode == 1 and "no text" in result.stderr and "INTERNAL" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "tok").exists()
    run = run_cli("pretrain", blank, "--preset", "nano", "-o", tmp_path / "run")
    assert run.returncode == 1 and "no text" in run.stderr and not (tmp_path / "run").exists()

    small = tmp_path / "small.txt"
    small.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000])
    result = run_cli("tokenize", "train", small, "--vocab-size", "300", "-o", tmp_path / "tok")
    needed = int(re.search(r"it needs at least (\d+)", result.stderr).group(1))
    assert result.returncode == 1 and needed > 300 and not (tmp_path / "tok").exists()
    assert run_cli("tokenize", "train", small, "--vocab-size", needed - 1, "-o", tmp_path / "tok").returncode == 1
    assert run_cli("tokenize", "train", small, "--vocab-size", needed, "-o", tmp_path / "tok").returncode == 0


# --- 5. pipelines that stream ------------------------------------------------------------------------------------

def _start(*args) -> subprocess.Popen:
    # a process with real pipes, forked from a process that has already imported torch (tests/zygote.py)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([*zygote.llm(env), *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def _answers_each_line_while_stdin_stays_open(args, first_line_ends):
    """Write a line, read its answer with stdin still open, twice; then the end of input ends the command."""
    proc = _start(*args)
    try:
        for prompt in (b"Once upon a time\n", b"Tom went to the park\n"):
            proc.stdin.write(prompt)
            proc.stdin.flush()
            line = proc.stdout.readline()  # would wait forever if the command waited for the end of stdin
            assert line.endswith(b"\n") and first_line_ends(line), (line, proc.stderr.read1())
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def classifier(nano_checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cls")
    records = [{"text": t, "label": label} for t, label in [("a king and a queen", "play"), ("a cat and a dog", "story")]]
    (directory / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 10))
    result = run_cli("finetune", "--task", "classify", directory / "data.jsonl", "-m", nano_checkpoint,
                     "--max-steps", "2", "-o", directory / "cls")
    assert result.returncode == 0, result.stderr
    return directory / "cls"


def test_generate_classify_and_embed_answer_a_pipe_line_by_line(nano_checkpoint, classifier):
    _answers_each_line_while_stdin_stays_open(
        ("generate", "-", "-m", nano_checkpoint, "--max-new-tokens", "3", "--json"),
        lambda line: json.loads(line)["prompt"] in ("Once upon a time", "Tom went to the park"))
    _answers_each_line_while_stdin_stays_open(("classify", "-", "-m", classifier),
                                              lambda line: line.strip() in (b"play", b"story"))
    _answers_each_line_while_stdin_stays_open(("embed", "-", "-m", nano_checkpoint),
                                              lambda line: len(json.loads(line)) == 64)


@pytest.mark.parametrize("command", ["generate", "classify", "embed"])
def test_endless_input_into_head_ends_quietly(command, nano_checkpoint, classifier):
    """`yes "..." | llm COMMAND - | head -1`: the command reads a batch ahead, and exits 0 when head has gone."""
    model = classifier if command == "classify" else nano_checkpoint
    extra = ("--max-new-tokens", "2", "--json") if command == "generate" else ()
    proc = _start(command, "-", "-m", model, *extra)

    def feed():  # endless input, until the command stops reading
        try:
            while True:
                proc.stdin.write(b"Once upon a time\n" * 64)
        except (BrokenPipeError, ValueError, OSError):
            pass

    threading.Thread(target=feed, daemon=True).start()
    try:
        assert proc.stdout.readline().strip()
        proc.stdout.close()  # head -1 has what it wants and goes away
        assert proc.wait(timeout=120) == 0
        stderr = proc.stderr.read().decode()
        assert "Traceback" not in stderr and "Exception" not in stderr, stderr
    finally:
        proc.kill()


# --- 6. resume continues on the data the run started with --------------------------------------------------------

def test_resume_refuses_a_changed_corpus(tmp_path, nano_checkpoint):
    corpus = tmp_path / "corpus.txt"
    original = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    corpus.write_text(original)
    run = tmp_path / "run"
    started = run_cli("pretrain", corpus, "-t", nano_checkpoint, "--preset", "nano", "--max-steps", "2",
                      "--eval-interval", "2", "-o", run)
    assert started.returncode == 0, started.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    corpus.write_text(TINYSTORIES_VALID.read_text(encoding="utf-8")[:30_000])
    shutil.rmtree(config["data"]["token_dir"])
    resumed = run_cli("pretrain", "--resume", run, "--max-steps", "3")
    assert resumed.returncode == 1 and len(resumed.stderr.strip().splitlines()) == 1, resumed.stderr
    assert "corpus" in resumed.stderr and "has changed" in resumed.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["data"] == config["data"]  # nothing rewritten
    corpus.write_text(original)  # the same text again: the run goes on
    resumed = run_cli("pretrain", "--resume", run, "--max-steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["tokens"] == config["data"]["tokens"]


# --- 7. small things users meet --------------------------------------------------------------------------------

def test_json_keeps_the_input_prompt_and_messages_read_right(nano_checkpoint, tmp_path):
    model = tmp_path / "templated"
    shutil.copytree(nano_checkpoint, model)
    config = yaml.safe_load((model / "config.yaml").read_text())
    config["generation"] = {**(config.get("generation") or {}), "prompt_template": "Q: {prompt}\nA:"}
    (model / "config.yaml").write_text(yaml.safe_dump(config))
    record = json.loads(run_cli("generate", "ROMEO:", "-m", model, "--max-new-tokens", "3", "--json").stdout)
    assert record["prompt"] == "ROMEO:" and record["templated_prompt"] == "Q: ROMEO:\nA:"

    missing = run_cli("generate", "-", "--input-format", "jsonl", "-m", nano_checkpoint, input='{"text": "a"}\n')
    assert missing.returncode == 1
    assert "every record needs a 'prompt'" in missing.stderr and "choose the field" not in missing.stderr

    prompt = "7" * 62  # digits are split: with the end-of-text token before it, 63 of the context's 64 tokens
    assert len(load_tokenizer(nano_checkpoint).encode(prompt)) == 62
    result = run_cli("generate", prompt, "-m", nano_checkpoint, "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "leaves room for 1 new token\n" in result.stderr
