"""Corpus files in the formats people have: plain text, JSON lines, CSV and Parquet, any of them gzip- or
zstd-compressed, each read as a stream so that memory stays flat however large the file.

The format is the file name's (`.jsonl`, `.csv`, `.parquet`, anything else text) after a `.gz` or `.zst`; the
compression is the file's magic bytes (gzip 1f 8b, zstd 28 b5 2f fd; RFC 1952, RFC 8878). Records (JSON lines, CSV
rows, Parquet rows) give their `--text-field` as a document; Parquet is read a batch of rows at a time with pyarrow
(an optional extra, as is `zstandard` before Python 3.14's compression.zstd). A binary file that is none of these is
refused before anything is trained on it.
"""

import io
import sys
from pathlib import Path
from typing import BinaryIO, Iterator

from llmcli.errors import LLMError

GZIP, ZSTD, PARQUET = b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PAR1"
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}
RECORD_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = (".txt", ".md")
FORMATS = ("plain text, JSON lines (.jsonl), CSV (.csv, the --text-field column) or Parquet (.parquet, the "
           "--text-field column), each also gzip- (.gz) or zstd-compressed (.zst)")


def compression(path: str | Path) -> str | None:
    """"gzip", "zstd" or None, by the file's first bytes."""
    if str(path) == "-":
        return None
    with open(path, "rb") as f:
        head = f.read(4)
    return "gzip" if head[:2] == GZIP else "zstd" if head == ZSTD else None


def file_format(path: str | Path) -> str:
    """"text", "jsonl", "csv" or "parquet": the name's suffix, after a compression suffix."""
    name = Path(str(path))
    if name.suffix in COMPRESSED:
        name = name.with_suffix("")
    return RECORD_FORMATS.get(name.suffix, "text")


def is_corpus_name(path: Path) -> bool:
    """Whether a directory's file is taken as part of a corpus: *.txt, *.md and the record formats, compressed
    or not."""
    name = path.with_suffix("") if path.suffix in COMPRESSED else path
    return name.suffix in TEXT_SUFFIXES or name.suffix in RECORD_FORMATS


def open_decompressed(path: str | Path, kind: str) -> BinaryIO:
    """A binary stream of the file's decompressed bytes."""
    if kind == "gzip":
        import gzip

        return gzip.open(path, "rb")
    try:
        from compression import zstd  # Python 3.14

        return zstd.open(path, "rb")
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise LLMError(f"{path} is zstd-compressed, which needs the zstandard library: "
                       "pip install 'llmcli[corpus]'") from None
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)


def stream_errors() -> tuple:
    """What reading a damaged compressed stream raises: gzip's OSError and EOFError, zstd's ZstdError."""
    errors = [OSError, EOFError]
    for module, name in (("zstandard", "ZstdError"), ("compression.zstd", "ZstdError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def read_error(path, kind: str | None, error: Exception) -> LLMError:
    """The one line for a stream that broke off while being read: a truncated or corrupt compressed file."""
    what = f"its {kind} stream is truncated or corrupt" if kind else "it could not be read"
    return LLMError(f"{path}: {what} ({' '.join(str(error).split()) or type(error).__name__})")


def check_corpus_file(path: str | Path):
    """Refuse, in one line naming the formats taken, a file whose first bytes are binary and that is none of them."""
    if str(path) == "-" or file_format(path) == "parquet":
        return
    kind = compression(path)
    try:
        if kind is None:
            with open(path, "rb") as f:
                head = f.read(8192)
        else:
            with open_decompressed(path, kind) as f:
                head = f.read(8192)
    except stream_errors() as e:
        raise read_error(path, kind, e) from None
    if b"\0" in head or head.startswith(PARQUET):
        raise LLMError(f"{path} is a binary file, not a corpus: llm reads {FORMATS}")


def record_texts(path: str | Path, field: str) -> Iterator[str]:
    """The `field` of each record of a CSV or Parquet file (JSON lines go through llmcli.text.data's line reader)."""
    if file_format(path) == "csv":
        return _csv_texts(path, field)
    return _parquet_texts(path, field)


def _csv_texts(path, field: str) -> Iterator[str]:
    import csv

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a document may be longer than csv's default 128 kB field
    kind = compression(path)
    raw = open_decompressed(path, kind) if kind else open(path, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        rows = csv.reader(text)
        try:
            header = next(rows, None)
            if header is None:
                return
            if field not in header:
                raise LLMError(f"{path} has no column '{field}' (it has: {', '.join(header) or 'nothing'}); choose "
                               "the column with --text-field")
            column = header.index(field)
            for row in rows:
                if len(row) > column and row[column]:
                    yield row[column]
        except UnicodeDecodeError as e:
            raise LLMError(f"{path}: bytes that are not UTF-8 near byte {e.start} of a block") from None
        except csv.Error as e:
            raise LLMError(f"{path}: line {rows.line_num} is not CSV ({e})") from None
        except stream_errors() as e:
            raise read_error(path, kind, e) from None


def _parquet_texts(path, field: str) -> Iterator[str]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise LLMError(f"{path} is Parquet, which needs the pyarrow library: pip install 'llmcli[corpus]'") from None
    kind = compression(path)
    source = _seekable_copy(path, kind) if kind else str(path)
    try:
        parquet = pq.ParquetFile(source)
        names = parquet.schema_arrow.names
        if field not in names:
            raise LLMError(f"{path} has no column '{field}' (it has: {', '.join(names)}); choose the column with "
                           "--text-field")
        if not pyarrow.types.is_string(parquet.schema_arrow.field(field).type) and \
                not pyarrow.types.is_large_string(parquet.schema_arrow.field(field).type):
            raise LLMError(f"{path}: column '{field}' holds {parquet.schema_arrow.field(field).type}, not text")
        for batch in parquet.iter_batches(batch_size=1024, columns=[field]):  # a row group is read in slices
            for text in batch.column(0).to_pylist():
                if text:
                    yield text
    except pyarrow.ArrowException as e:
        raise LLMError(f"{path} is not a readable Parquet file ({' '.join(str(e).split())})") from None


def _seekable_copy(path, kind: str):
    """A compressed Parquet file decompressed into an unnamed temporary file (Parquet is read from its end)."""
    import shutil
    import tempfile

    copy = tempfile.TemporaryFile()
    try:
        with open_decompressed(path, kind) as f:
            shutil.copyfileobj(f, copy, 1 << 20)
    except stream_errors() as e:
        raise read_error(path, kind, e) from None
    copy.seek(0)
    return copy
