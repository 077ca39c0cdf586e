import json

import numpy as np
import pytest

from llmcli.errors import LLMError
from llmcli.text import data as data_module
from llmcli.text import shards
from llmcli.text.data import document_pieces, expand_corpus, read_documents, read_lines
from llmcli.text.shards import TokenData, cached_tokens, tokenize_corpus
from llmcli.text.tokenizer import train_tokenizer


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


def test_token_shards_and_split(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"story number {i} is about a cat\n<|endoftext|>\n" for i in range(300)))
    tok = train_tokenizer(read_lines(corpus), tmp_path, vocab_size=300)
    index = tokenize_corpus([corpus], tok, tmp_path / "tokens")
    n = index["tokens"]
    assert sum((tmp_path / "tokens" / s["file"]).stat().st_size for s in index["shards"]) == 2 * n  # uint16
    data = TokenData(tmp_path / "tokens", val_fraction=0.1)
    tokens = data.read(0, n)
    assert np.count_nonzero(tokens == tok.end_of_text) == 300  # one before each document
    assert data.split_len("train") + data.split_len("val") == n
    import torch

    x, y = data.batch("train", 4, 16, seed=0, index=7)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    again = data.batch("train", 4, 16, seed=0, index=7)
    assert torch.equal(again[0], x)  # a batch is a function of (seed, index): reproducible, resumable
    assert torch.equal(data.batch("train", 4, 16, seed=0, index=7, rows=slice(2, 4))[0], x[2:])  # a share of it
    assert not torch.equal(data.batch("train", 4, 16, seed=0, index=8)[0], x)
    with pytest.raises(LLMError, match=r"too small.*context \+ 1 = 1025"):
        data.check_fits(1024, 0.1)


def test_parallel_tokenization_matches_serial_across_shards(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of a story about dogs and cats\n<|endoftext|>\n" for i in range(2000)))
    tok = train_tokenizer(read_lines(corpus), tmp_path, vocab_size=300)
    monkeypatch.setattr(data_module, "CHUNK_CHARS", 5_000)  # many chunks, several shards
    monkeypatch.setattr(shards, "SHARD_TOKENS", 7_000)
    serial = tokenize_corpus([corpus], tok, tmp_path / "serial", workers=1)
    parallel = tokenize_corpus([corpus], tok, tmp_path / "parallel", workers=2)
    assert serial == parallel and len(parallel["shards"]) > 3
    a, b = TokenData(tmp_path / "serial", 0.1), TokenData(tmp_path / "parallel", 0.1)
    assert np.array_equal(a.read(0, a.n_tokens), b.read(0, b.n_tokens))
    whole = [tok.end_of_text] + tok.encode("line 0 of a story about dogs and cats")
    assert a.read(0, len(whole)).tolist() == whole
    on_disk = np.concatenate([np.asarray(shard) for shard in a.shards])
    assert a.read(6_995, 10).tolist() == on_disk[6_995:7_005].tolist()  # a window across two shard files


def test_cache_skips_a_second_tokenization(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a small corpus about nothing much\n" * 200)
    tok = train_tokenizer(read_lines(corpus), tmp_path, vocab_size=300)
    said = []
    first = cached_tokens([str(corpus)], tok, cache_dir=tmp_path / "cache", log=said.append)
    second = cached_tokens([str(corpus)], tok, cache_dir=tmp_path / "cache", log=said.append)
    assert first == second and said == [f"tokens found in the cache ({first}): skipping tokenization"]
    corpus.write_text("a different corpus\n" * 200)  # the key is the content, not the name
    third = cached_tokens([str(corpus)], tok, cache_dir=tmp_path / "cache", log=said.append)
    assert third != first and len(said) == 1


def test_corpus_from_directories_globs_and_jsonl(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "sub" / "b.md").write_text("beta")
    (tmp_path / "d" / "sub" / "c.jsonl").write_text(json.dumps({"body": "gamma"}) + "\n\n" +
                                                    json.dumps({"body": "delta\nline"}) + "\n")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\0")
    paths = expand_corpus([str(tmp_path / "d")])
    assert [p.split("/d/")[1] for p in paths] == ["a.txt", "sub/b.md", "sub/c.jsonl"]
    assert expand_corpus([str(tmp_path / "d" / "**" / "*.md")]) == [str(tmp_path / "d" / "sub" / "b.md")]
    assert list(read_documents(paths, text_field="body")) == ["alpha", "beta", "gamma", "delta\nline"]
    with pytest.raises(LLMError, match=r"c.jsonl: line 1 has no text field 'text' \(it has: body\)"):
        list(read_documents(paths))
    with pytest.raises(LLMError, match="no file matches"):
        expand_corpus([str(tmp_path / "*.nothing")])
    (tmp_path / "sep.txt").write_text("one\n=====\ntwo\n")
    assert list(read_documents([tmp_path / "sep.txt"], separator="=====")) == ["one", "two"]


def test_a_huge_document_streams_in_pieces(tmp_path):
    path = tmp_path / "big.txt"
    lines = [f"line {i} " * 10 for i in range(1000)]
    path.write_text("\n".join(lines))
    pieces = list(document_pieces([path], max_chars=5_000))
    assert len(pieces) > 10 and all(len(text) < 6_000 for text, _ in pieces)
    assert [starts for _, starts in pieces] == [True] + [False] * (len(pieces) - 1)  # one document
    assert "".join(text for text, _ in pieces) == "\n".join(lines)


def test_empty_corpus(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("<|endoftext|>\n")
    tok = train_tokenizer(["some words to train on"] * 50, tmp_path, vocab_size=300)
    with pytest.raises(LLMError, match="empty"):
        tokenize_corpus([corpus], tok, tmp_path / "tokens")
