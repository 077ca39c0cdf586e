import json

import pytest
from conftest import run_cli

from llmcli.errors import LLMError
from llmcli.text.tokenizer import END_OF_TEXT, Tokenizer, train_tokenizer

SAMPLES = [
    "Plain ASCII text, with punctuation!",
    "  leading and trailing spaces\tand a tab  ",
    "café, naïve, Ångström, señor",
    "日本語のテキストと中文文本",
    "emoji: 🐱🎉👩‍👩‍👧",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(shakespeare_slice, tmp_path_factory):
    lines = shakespeare_slice.read_text(encoding="utf-8").splitlines()
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_end_of_text_is_one_token(tokenizer):
    ids = tokenizer.encode(f"one{END_OF_TEXT}two")
    assert tokenizer.end_of_text in ids
    assert tokenizer.pieces([tokenizer.end_of_text]) == [END_OF_TEXT]


def test_unigram_and_special_tokens(shakespeare_slice, tmp_path):
    lines = shakespeare_slice.read_text(encoding="utf-8").splitlines()
    tok = train_tokenizer(lines, tmp_path, vocab_size=400, model_type="unigram", special_tokens=("<|sep|>",))
    ids = tok.encode("a<|sep|>b")
    assert "<|sep|>" in tok.pieces(ids)
    assert tok.decode(ids) == "a<|sep|>b"
    assert Tokenizer(tmp_path).vocab_size == 400


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(LLMError, match="too small"):
        train_tokenizer(["some text"], tmp_path, vocab_size=100)
    with pytest.raises(LLMError, match="unknown tokenizer type"):
        train_tokenizer(["some text"], tmp_path, vocab_size=400, model_type="wordpiece")
    with pytest.raises(LLMError, match="empty"):
        train_tokenizer([], tmp_path, vocab_size=400)


def test_cli_train_encode_decode(shakespeare_slice, tmp_path):
    result = run_cli("tokenize", "train", shakespeare_slice, "--vocab-size", "500", "-o", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tok" / "tokenizer.model").is_file()
    text = "\n".join(SAMPLES[:-1]) + "\n"
    encoded = run_cli("tokenize", "encode", "-t", tmp_path / "tok", input=text)
    assert encoded.returncode == 0, encoded.stderr
    lines = encoded.stdout.splitlines()
    assert len(lines) == len(SAMPLES) - 1  # one output line per input line
    assert all(tok.isdigit() for line in lines for tok in line.split())
    decoded = run_cli("tokenize", "decode", "-t", tmp_path / "tok", input=encoded.stdout)
    assert decoded.stdout == text

    as_json = run_cli("tokenize", "encode", "--json", "-t", tmp_path / "tok", input="Hello\n")
    record = json.loads(as_json.stdout)
    assert len(record["ids"]) == len(record["pieces"]) >= 1
    # decode accepts the JSON objects too, so encode --json | decode round-trips
    assert run_cli("tokenize", "decode", "-t", tmp_path / "tok", input=as_json.stdout).stdout == "Hello\n"


def test_cli_decode_rejects_garbage(shakespeare_slice, tmp_path):
    train_tokenizer(shakespeare_slice.read_text().splitlines(), tmp_path, vocab_size=400)
    result = run_cli("tokenize", "decode", "-t", tmp_path, input="12 x 7\n")
    assert result.returncode == 1
    assert "line 1" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("tokenize", "decode", "-t", tmp_path, input="99999\n")
    assert result.returncode == 1 and "outside the vocabulary" in result.stderr


def test_char_tokenizer_has_a_token_per_character(shakespeare_slice, tmp_path):
    """--type char: every character of the corpus is one token (nanoGPT's char-level data), the vocabulary is the
    corpus's characters besides the bytes and special tokens (fewer than --vocab-size asks), and text outside the
    corpus's characters still round-trips through byte fallback."""
    result = run_cli("tokenize", "train", shakespeare_slice, "--type", "char", "--vocab-size", "1000",
                     "-o", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(tmp_path / "tok")
    characters = set(shakespeare_slice.read_text(encoding="utf-8")) - {"\n"}
    assert 260 + len(characters) // 2 < tok.vocab_size <= 261 + len(characters) < 1000
    text = "ROMEO: But soft, what light"
    assert tok.pieces(tok.encode(text)) == [c.replace(" ", "\u2581") for c in text]
    for sample in SAMPLES:
        assert tok.decode(tok.encode(sample)) == sample


def test_char_tokenizer_gives_even_a_rare_character_its_token(shakespeare_slice, tmp_path):
    """A character the corpus uses once (an 'é' in English text) is one token too while --vocab-size has room, not
    the bytes of its UTF-8; with no room, the rarest characters fall back to bytes and the size is kept."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_slice.read_text(encoding="utf-8") + "\nA café in Zürich.\n", encoding="utf-8")
    result = run_cli("tokenize", "train", corpus, "--type", "char", "--vocab-size", "1000", "-o", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(tmp_path / "tok")
    assert tok.pieces(tok.encode("café Zürich")) == list("café\u2581Zürich")
    result = run_cli("tokenize", "train", corpus, "--type", "char", "--vocab-size", "270", "-o", tmp_path / "small")
    assert result.returncode == 0, result.stderr
    small = Tokenizer(tmp_path / "small")
    assert small.vocab_size == 270 and small.decode(small.encode("café Zürich")) == "café Zürich"


def test_pretrain_with_a_char_tokenizer_has_an_embedding_per_token(shakespeare_slice, tmp_path):
    """train.tokenizer_type: char in a run's config: the model gets the tokenizer's size, not --vocab-size (an upper
    bound for char), so that no logit is computed for a token that does not exist."""
    import yaml

    config = tmp_path / "char.yaml"
    config.write_text("train:\n  tokenizer_type: char\n  eval_batches: 1\n")
    result = run_cli("pretrain", shakespeare_slice, "--preset", "nano", "--config", config, "--vocab-size", "1000",
                     "--max-steps", "1", "--eval-interval", "1", "-o", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    size = Tokenizer(tmp_path / "run").vocab_size
    assert size < 1000 and yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["vocab_size"] == size


def test_a_tokenizer_trained_without_spaces_still_round_trips_them(tmp_path):
    """A corpus with no space gives a model with no ▁ piece, and SentencePiece then spells a space with ▁'s bytes:
    a space and a literal ▁ would decode alike. Spaces go as the byte token <0x20> instead."""
    (tmp_path / "corpus.txt").write_text("abcabcabd" * 50 + "\n")
    trained = run_cli("tokenize", "train", tmp_path / "corpus.txt", "--vocab-size", "270", "-o", tmp_path / "tok")
    assert trained.returncode == 0, trained.stderr
    text = " ab c  d\u2581e \u2581\n"
    encoded = run_cli("tokenize", "encode", "-t", tmp_path / "tok", input=text)
    decoded = run_cli("tokenize", "decode", "-t", tmp_path / "tok", input=encoded.stdout)
    assert decoded.returncode == 0 and decoded.stdout == text, decoded.stderr
