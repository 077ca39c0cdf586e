"""Corpora: read text files as documents, turn them into a memory-mapped file of token ids, draw training batches.

A document is a whole file, or the text between lines that hold only `<|endoftext|>` (the TinyStories format).
In the token file every document is preceded by the end-of-text token, so the model learns where texts start.
"""

import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llmcli.errors import LLMError
from llmcli.tokenizer import END_OF_TEXT, Tokenizer

DOC_SEPARATOR = END_OF_TEXT


def check_text_file(path: str | Path) -> Path:
    """The path as a Path if it names a readable file, else a clear error."""
    path = Path(path)
    if not path.exists():
        raise LLMError(f"{path} does not exist")
    if path.is_dir():
        raise LLMError(f"{path} is a directory; expected a text file")
    return path


def read_lines(path: str | Path) -> Iterator[str]:
    """The lines of a UTF-8 text file without their line endings; '-' reads stdin. Names the place of bad bytes."""
    if str(path) == "-":
        stream, name = sys.stdin.buffer, "<stdin>"
    else:
        path = check_text_file(path)
        stream, name = open(path, "rb"), str(path)
    offset = 0
    with stream:
        for number, raw in enumerate(stream, start=1):
            if b"\0" in raw:
                raise LLMError(f"{name}: NUL byte at line {number} (byte {offset + raw.index(0)}): "
                               "this looks like a binary file, not text")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LLMError(f"{name}: bytes that are not UTF-8 at line {number}, byte {offset + e.start} "
                               f"({raw[e.start:e.start + 4]!r})") from None
            offset += len(raw)
            yield line.rstrip("\r\n")


def read_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """Documents from text files: each file is one or more documents separated by `<|endoftext|>` lines."""
    for path in paths:
        lines: list[str] = []
        for line in read_lines(path):
            if line.strip() == DOC_SEPARATOR:
                if lines:
                    yield "\n".join(lines)
                lines = []
            else:
                lines.append(line)
        if lines:
            yield "\n".join(lines)


def save_stdin(path: Path) -> Path:
    """Copy stdin to a file, so that a corpus read from a pipe can be passed over more than once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        shutil.copyfileobj(sys.stdin.buffer, f)
    return path


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def tokenize_corpus(paths: list, tokenizer: Tokenizer, out_path: Path, batch_docs: int = 512, progress=None) -> int:
    """Write the token ids of all documents, each after an end-of-text token, to out_path. Returns the count."""
    if tokenizer.end_of_text is None:
        raise LLMError(f"the tokenizer {tokenizer.path} has no {END_OF_TEXT} token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(out_path, "wb") as f:
        def flush(docs: list[str]):
            nonlocal count
            for ids in tokenizer.encode_batch(docs):
                np.array([tokenizer.end_of_text, *ids], dtype=dtype).tofile(f)
                count += 1 + len(ids)
            if progress:
                progress(sum(len(d) for d in docs) + len(docs))

        batch: list[str] = []
        for doc in read_documents(paths):
            batch.append(doc)
            if len(batch) == batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    if count == 0:
        raise LLMError("the corpus is empty: no text to train on")
    return count


class TokenData:
    """A token file split into a training part and a held-out validation part (its last val_fraction)."""

    def __init__(self, path: Path, vocab_size: int, val_fraction: float):
        self.tokens = np.memmap(path, dtype=token_dtype(vocab_size), mode="r")
        self.val_start = len(self.tokens) - int(len(self.tokens) * val_fraction)

    def split(self, name: str) -> np.ndarray:
        return self.tokens[: self.val_start] if name == "train" else self.tokens[self.val_start:]

    def check_fits(self, context: int, val_fraction: float):
        """A clear error if either split is shorter than one training sequence of context + 1 tokens."""
        need = context + 1
        train, val = len(self.split("train")), len(self.split("val"))
        if min(train, val) < need:
            total = int(need / min(val_fraction, 1 - val_fraction)) + 1
            raise LLMError(
                f"the corpus is too small: {len(self.tokens)} tokens ({train} for training, {val} for validation); "
                f"each split needs at least context + 1 = {need} tokens, so about {total} tokens in all "
                "(use more text or a smaller --context)"
            )

    def get_batch(self, split: str, batch_size: int, context: int, generator):
        """batch_size random windows of the split: inputs (B, context) and next-token targets (B, context)."""
        import torch

        data = self.split(split)
        starts = torch.randint(len(data) - context, (batch_size,), generator=generator).tolist()
        windows = torch.from_numpy(np.stack([data[s: s + context + 1].astype(np.int64) for s in starts]))
        return windows[:, :-1], windows[:, 1:]
