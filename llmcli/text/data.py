"""Corpora: read documents from files (text, JSON lines; CSV, Parquet, gzip, zstd through llmcli/text/corpus.py).

A document is a whole file, a record of a `.jsonl` file (its `--text-field`), or the text between separator lines
(`<|endoftext|>` by default, the TinyStories format). In the token shards every document is preceded by the
end-of-text token, so the model learns where texts start.

Documents stream: they are read a piece at a time (CHUNK_CHARS), so memory stays flat however large the corpus;
llmcli/text/shards.py tokenizes them into cached shards of token ids.
"""

import glob
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

from llmcli.errors import LLMError
from llmcli.text import corpus
from llmcli.text.tokenizer import END_OF_TEXT

DOC_SEPARATOR = END_OF_TEXT
CHUNK_CHARS = 1 << 20  # text per unit of work: large enough to amortise the hand-off, small enough to keep RSS flat


def check_text_file(path: str | Path) -> Path:
    """The path as a Path if it names a readable file, else a clear error."""
    path = Path(path)
    if not path.exists():
        raise LLMError(f"{path} does not exist")
    if path.is_dir():
        raise LLMError(f"{path} is a directory; expected a text file")
    return path


def expand_corpus(specs: Iterable[str]) -> list[str]:
    """Files named by the user: files as given, directories searched recursively for *.txt, *.md, *.jsonl, *.csv
    and *.parquet (also as .gz or .zst), glob patterns expanded (sorted, so the order is stable), '-' kept for stdin.
    A binary file that is none of the formats taken is refused (llmcli/text/corpus.py)."""
    paths: list[str] = []
    for spec in specs:
        spec = str(spec)
        if spec == "-":
            paths.append(spec)
        elif Path(spec).is_dir():
            found = sorted(str(p) for p in Path(spec).rglob("*") if corpus.is_corpus_name(p) and p.is_file())
            if not found:
                raise LLMError(f"{spec} is a directory with no corpus files: llm reads {corpus.FORMATS}")
            paths += found
        elif Path(spec).exists():
            paths.append(spec)
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise LLMError(f"no file matches {spec}")
            paths += found
        else:
            raise LLMError(f"{spec} does not exist")
    if not paths:
        raise LLMError("no corpus given")
    for path in paths:
        corpus.check_corpus_file(path)
    return paths


class Lines:
    """The lines of a UTF-8 text file, or of stdin for '-', read as they arrive: an iterator of each line's text.

    What a line is, for every reader of text (files, stdin, JSON lines, corpora): the text up to a line ending,
    LF, CR LF or CR (Python's universal newlines), without it; the last line may have no ending. Documents join
    their lines with LF, so a text means the same whatever its line endings. `ending` is the ending of the line
    last returned ("\\n", "\\r\\n", "\\r", or "" for a last line without one), so a reader that writes a line for
    a line (llm tokenize encode) can give back every byte. `ready()` says whether the next line (or the
    end of the input) can be had without waiting, so a pipeline can work on what has arrived. NUL bytes and bytes
    that are not UTF-8 are errors naming their place.
    """

    BLOCK = 1 << 20

    def __init__(self, path: str | Path):
        if str(path) == "-":
            self.fd, self.name, self.owned = sys.stdin.fileno(), "<stdin>", False
        else:
            path = check_text_file(path)
            self.fd, self.name, self.owned = os.open(path, os.O_RDONLY), str(path), True
        # a gzip or zstd file is read through its decompressor
        self.kind = corpus.compression(path) if self.owned else None
        self.stream = corpus.open_decompressed(path, self.kind) if self.kind else None
        self.buffer, self.pos = b"", 0  # bytes read and not yet returned: buffer[pos:]
        self.eof = False
        self.number = 0  # of the line last returned
        self.offset = 0  # of the next line in the input, in bytes
        self.ending = ""

    def __iter__(self) -> "Lines":
        return self

    def _read(self) -> bytes:
        if self.stream is not None and not self.eof:
            try:
                block = self.stream.read(self.BLOCK)
            except corpus.stream_errors() as e:
                raise corpus.read_error(self.name, self.kind, e) from None
        else:
            block = os.read(self.fd, self.BLOCK) if not self.eof else b""
        if not block:
            self.eof = True
            self.close()
        return block

    def _line_end(self) -> tuple[int, int] | None:
        """(end of the text, end of the line ending) of the next line in the buffer; None if more input is needed
        to know where it ends."""
        n = self.buffer.find(b"\n", self.pos)
        r = self.buffer.find(b"\r", self.pos, n if n >= 0 else len(self.buffer))
        if r < 0:
            return (n, n + 1) if n >= 0 else None
        if r + 1 < len(self.buffer):
            return (r, r + 2) if self.buffer[r + 1] == 0x0A else (r, r + 1)
        return (r, r + 1) if self.eof else None  # a CR last in the buffer: is an LF next?

    def ready(self) -> bool:
        import select

        while not self.eof and self._line_end() is None:
            if self.stream is None and not select.select([self.fd], [], [], 0)[0]:
                return False
            self.buffer, self.pos = self.buffer[self.pos:] + self._read(), 0
        return True

    def __next__(self) -> str:
        found = self._line_end()
        while found is None and not self.eof:  # read on to the end of the line; blocks are joined once
            parts = [self.buffer[self.pos:]]
            ends = b"\r" in parts[0]  # (a CR last in the buffer: one more block tells what it ends)
            while not ends and (block := self._read()):
                parts.append(block)
                ends = b"\n" in block or b"\r" in block
            if parts[-1].endswith(b"\r") and not self.eof:
                parts.append(self._read())  # (the LF of a CR LF cut between two blocks)
            self.buffer, self.pos = b"".join(parts), 0
            found = self._line_end()
        if found is None:  # the last line, without an ending
            if self.pos >= len(self.buffer):
                raise StopIteration
            found = (len(self.buffer), len(self.buffer))
        raw, self.ending = self.buffer[self.pos:found[0]], self.buffer[found[0]:found[1]].decode("ascii")
        self.pos = found[1]
        self.number += 1
        if b"\0" in raw:
            raise LLMError(f"{self.name}: NUL byte at line {self.number} (byte {self.offset + raw.index(0)}): "
                           "this looks like a binary file, not text")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LLMError(f"{self.name}: bytes that are not UTF-8 at line {self.number}, byte {self.offset + e.start} "
                           f"({raw[e.start:e.start + 4]!r})") from None
        self.offset += len(raw) + len(self.ending)
        return line

    def close(self):
        if getattr(self, "stream", None) is not None:
            self.stream.close()
            self.stream = None
        if getattr(self, "owned", False) and self.fd >= 0:  # (a failed __init__ opened nothing)
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


def read_lines(path: str | Path) -> Lines:
    """The lines of a UTF-8 text file ('-': stdin) without their endings (see Lines for what a line is)."""
    return Lines(path)


def read_jsonl(source: "str | Path | Lines") -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSON-lines file ('-': stdin, or Lines being read); a line
    that is not a JSON object is an error that names it."""
    lines = source if isinstance(source, Lines) else Lines(source)
    name = lines.name
    for line in lines:
        number = lines.number
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LLMError(f"{name}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise LLMError(f"{name}: line {number} is a JSON {type(record).__name__}, not an object")
        yield number, record


def jsonl_texts(source: "str | Path | Lines", field: str, option: str | None = "--text-field") -> Iterator[str]:
    """The string `field` of each record of a JSON-lines file (see read_jsonl); a record without it is an error that
    names it, and the option that chooses another field (None: there is none, the field is required)."""
    lines = source if isinstance(source, Lines) else Lines(source)
    for number, record in read_jsonl(lines):
        if field in record and not isinstance(record[field], str):
            raise LLMError(f"{lines.name}: line {number}: '{field}' must be a string, not "
                           f"{type(record[field]).__name__}")
        if field not in record:
            hint = f"choose the field with {option}" if option else f"every record needs a '{field}'"
            raise LLMError(f"{lines.name}: line {number} has no text field '{field}' (it has: "
                           f"{', '.join(record) or 'nothing'}); {hint}")
        yield record[field]


def document_pieces(paths: Iterable[str | Path], text_field: str = "text", separator: str = DOC_SEPARATOR,
                    max_chars: int = CHUNK_CHARS) -> Iterator[tuple[str, bool]]:
    """(text, starts_a_document) pairs. A document longer than max_chars comes in several pieces (cut after a
    line), so that one huge file never has to sit in memory whole."""
    for path in paths:
        kind = corpus.file_format(path)
        if kind != "text":
            texts = jsonl_texts(str(path), text_field) if kind == "jsonl" else corpus.record_texts(path, text_field)
            for text in texts:
                yield text, True
            continue
        lines: list[str] = []
        size, first = 0, True
        for line in read_lines(path):
            if line.strip() == separator:
                if lines:
                    yield "\n".join(lines), first
                lines, size, first = [], 0, True
                continue
            lines.append(line)
            size += len(line) + 1
            if size > max_chars:
                yield "\n".join(lines) + "\n", first
                lines, size, first = [], 0, False
        if lines:
            yield "\n".join(lines), first


def read_documents(paths: Iterable[str | Path], text_field: str = "text",
                   separator: str = DOC_SEPARATOR) -> Iterator[str]:
    """Whole documents from text and .jsonl files."""
    for text, _ in document_pieces(paths, text_field, separator, max_chars=sys.maxsize):
        yield text


def batches(items: Iterable, size: int, ready: Callable[[], bool] | None = None) -> Iterator[list]:
    """Lists of up to `size` consecutive items, read lazily: at most a batch ahead of the consumer. ready(): whether
    another item can be had without waiting (Lines.ready); when it says no, the batch ends with what it has, so a
    pipe's lines are answered as they come rather than when a batch is full."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size or (ready is not None and not ready()):
            yield batch
            batch = []
    if batch:
        yield batch


def training_lines(paths: Iterable[str | Path], text_field: str = "text",
                   separator: str = DOC_SEPARATOR) -> Iterator[str]:
    """The lines of the corpus's documents, to train a tokenizer on (a .jsonl file's records are documents)."""
    for doc in read_documents(paths, text_field, separator):
        yield from doc.split("\n")


def save_stdin(path: Path) -> Path:
    """Copy stdin to a file, so that a corpus read from a pipe can be passed over more than once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        shutil.copyfileobj(sys.stdin.buffer, f)
    return path
