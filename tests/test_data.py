import numpy as np
import pytest

from llmcli.data import TokenData, read_documents, read_lines, tokenize_corpus
from llmcli.errors import LLMError
from llmcli.tokenizer import train_tokenizer


def test_documents_are_split_on_end_of_text_lines(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("first story\nsecond line\n<|endoftext|>\nsecond story\n<|endoftext|>\n")
    b = tmp_path / "b.txt"
    b.write_text("a whole file is a document")
    assert list(read_documents([a, b])) == ["first story\nsecond line", "second story", "a whole file is a document"]


def test_bad_bytes_are_located(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("good line\nbad: caf\xe9\n".encode("latin-1"))
    with pytest.raises(LLMError, match=r"not UTF-8 at line 2, byte 18"):
        list(read_lines(path))
    path.write_bytes(b"\x7fELF\x00\x01\x02")
    with pytest.raises(LLMError, match="binary"):
        list(read_lines(path))


def test_token_file_and_split(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"story number {i} is about a cat\n<|endoftext|>\n" for i in range(300)))
    tok = train_tokenizer(read_lines(corpus), tmp_path, vocab_size=300)
    n = tokenize_corpus([corpus], tok, tmp_path / "tokens.bin")
    assert (tmp_path / "tokens.bin").stat().st_size == 2 * n  # uint16: the vocabulary fits
    data = TokenData(tmp_path / "tokens.bin", tok.vocab_size, val_fraction=0.1)
    assert np.count_nonzero(data.tokens == tok.end_of_text) == 300  # one before each document
    assert len(data.split("train")) + len(data.split("val")) == n
    import torch

    x, y = data.get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    with pytest.raises(LLMError, match=r"too small.*context \+ 1 = 1025"):
        data.check_fits(1024, 0.1)


def test_empty_corpus(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("<|endoftext|>\n")
    tok = train_tokenizer(["some words to train on"] * 50, tmp_path, vocab_size=300)
    with pytest.raises(LLMError, match="empty"):
        tokenize_corpus([corpus], tok, tmp_path / "tokens.bin")
