"""Token shards: a corpus tokenized into files of token ids (cached), and training batches drawn from them.

Tokenization streams: documents (llmcli/text/data.py) are cut into chunks of about a megabyte, encoded by worker
processes and appended to shard files, so memory stays flat however large the corpus. The shards and their index
live in a cache directory named by a hash of the corpus bytes and the tokenizer, so a second run on the same inputs
skips the work. Batches are a pure function of (seed, step): a run is reproducible, and resumable at any step on any
number of processes.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from llmcli.errors import LLMError
from llmcli.text import corpus, data
from llmcli.text.data import DOC_SEPARATOR, document_pieces
from llmcli.text.tokenizer import END_OF_TEXT, Tokenizer

INDEX_FILE = "index.json"
TOKENS_FORMAT = "llmcli-tokens/1"
SHARD_TOKENS = 1 << 27  # 128M tokens (256 MB of uint16) per shard file


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def default_cache_dir() -> Path:
    if os.environ.get("LLM_CACHE_DIR"):
        return Path(os.environ["LLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmcli"


def corpus_hash(paths: list[str], tokenizer: Tokenizer, text_field: str, separator: str) -> str:
    """A hash of what the token shards depend on: the corpus bytes in order, the tokenizer's model (what decides
    the tokens, not the paths it records), how documents split."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([TOKENS_FORMAT, text_field, separator, data.CHUNK_CHARS]).encode())
    digest.update(tokenizer_fingerprint(tokenizer.path.read_bytes()))
    for path in paths:
        digest.update(f"\0{corpus.file_format(path)}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


# Fields of SentencePiece's TrainerSpec (sentencepiece_model.proto) that only say how a model was trained, never
# how it encodes: where its input and output were (input, model_prefix, input_format, seed_sentencepieces_file) and
# how much of the machine it used (num_threads). A model trained twice on the same text differs only in these.
_TRAINING_ONLY_FIELDS = {1, 2, 7, 16, 54}


def tokenizer_fingerprint(model: bytes) -> bytes:
    """The bytes of a SentencePiece model proto that decide its tokens: the pieces, their scores and types, the
    normalizer and the trainer settings used when encoding, without the fields above or the self-test data (field 4
    of ModelProto). Not a proto (or not one we can walk): the bytes themselves."""
    try:
        kept = []
        for number, raw, payload in _proto_fields(model):
            if number == 2:  # trainer_spec
                raw = b"".join(r for n, r, _ in _proto_fields(payload) if n not in _TRAINING_ONLY_FIELDS)
            if number != 4:
                kept.append(raw)
        return b"".join(kept)
    except (IndexError, ValueError):
        return model


def _proto_fields(buffer: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(field number, the field's whole encoding, its length-delimited payload or b"") of a protobuf message."""
    def varint(i: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = buffer[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i
            if shift > 63:
                raise ValueError("varint too long")

    i = 0
    while i < len(buffer):
        start = i
        key, i = varint(i)
        payload = b""
        if key & 7 == 0:
            _, i = varint(i)
        elif key & 7 == 1:
            i += 8
        elif key & 7 == 2:
            length, i = varint(i)
            payload, i = buffer[i:i + length], i + length
        elif key & 7 == 5:
            i += 4
        else:
            raise ValueError(f"wire type {key & 7}")
        if i > len(buffer):
            raise ValueError("truncated")
        yield key >> 3, buffer[start:i], payload


def cached_tokens(paths: list[str], tokenizer: Tokenizer, text_field: str = "text", separator: str = DOC_SEPARATOR,
                  cache_dir: Path | None = None, workers: int | None = None, progress=None, log=None) -> Path:
    """The directory of token shards for this corpus and tokenizer: found in the cache, or made and put there.

    It is made under a temporary name, .tmp-KEY-HOST-PID, and renamed into place; the temporary folders of
    processes of this host that are gone (killed) are removed first."""
    key = corpus_hash(paths, tokenizer, text_field, separator)
    target = (cache_dir or default_cache_dir()) / "tokens" / key
    if (target / INDEX_FILE).is_file():
        if log:
            log(f"tokens found in the cache ({target}): skipping tokenization")
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LLMError(f"could not make the token cache {target.parent}: {e.strerror or e}") from None
    remove_stale_temporaries(target.parent)
    tmp = target.parent / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenize_corpus(paths, tokenizer, tmp, text_field, separator, workers, progress)
        os.rename(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / INDEX_FILE).is_file():  # another process made the same shards meanwhile
            return target
        raise LLMError(f"could not write token shards to {target.parent}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def document_separator(tokenizer) -> list[int]:
    """The ids before each document of a corpus: `<|endoftext|>` where the tokenizer has it (ours, GPT-2's), else the
    model's end token then its beginning token (Llama's </s> <s>), so a document ends as the model's texts end and
    starts as its prompts start."""
    start = tokenizer.start_of_text
    return [tokenizer.end_of_text] + ([start] if start is not None and start != tokenizer.end_of_text else [])


def _temporary_owner(name: str) -> tuple[str, int] | None:
    """(host, process id) of a temporary folder .tmp-KEY-HOST-PID (or .tmp-KEY-PID, this host's), else None."""
    parts = name[len(".tmp-"):].split("-") if name.startswith(".tmp-") else []
    if len(parts) < 2 or not parts[-1].isdigit():
        return None
    return "-".join(parts[1:-1]) or socket.gethostname(), int(parts[-1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(tokens_dir: Path) -> int:
    """Delete the temporary folders that processes of this host left when they were killed; their bytes."""
    freed = 0
    host = socket.gethostname()
    for path in tokens_dir.glob(".tmp-*"):
        owner = _temporary_owner(path.name)
        if owner is None or owner[0] != host or (owner[1] != os.getpid() and _alive(owner[1])):
            continue  # a process still writing it, or one on another machine of a shared file system
        freed += directory_size(path)
        shutil.rmtree(path, ignore_errors=True)
    return freed


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def cache_entries(cache_dir: Path | None = None) -> list[dict]:
    """The token cache's entries, largest first: {"path", "bytes", "tokens", "corpus"}; temporary folders of
    running processes count too (tokens None)."""
    root = (cache_dir or default_cache_dir()) / "tokens"
    entries = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir():
            continue
        try:
            index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
        entries.append({"path": str(path), "bytes": directory_size(path), "tokens": index.get("tokens"),
                        "corpus": index.get("corpus", [])})
    return sorted(entries, key=lambda e: -e["bytes"])


def clear_cache(cache_dir: Path | None = None) -> int:
    """Delete the token cache's entries (not the temporary folders of processes still writing them); the bytes
    freed. A run whose tokens were deleted tokenizes its corpus again when resumed."""
    root = (cache_dir or default_cache_dir()) / "tokens"
    if not root.is_dir():
        return 0
    freed = remove_stale_temporaries(root)
    for path in root.iterdir():
        if path.is_dir() and not path.name.startswith(".tmp-"):
            freed += directory_size(path)
            shutil.rmtree(path, ignore_errors=True)
    return freed


# A tokenizer per worker process, given once to the pool's initializer.
# Ctrl-C and SIGTERM are held while the pool forks its workers: one that arrived during a fork would be raised in a
# fork hook (logging's lock release), where Python prints it and goes on, and the command would run to its end.
HELD_DURING_FORK = {signal.SIGINT, signal.SIGTERM}
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer, parent: int):
    global _worker_tokenizer
    _die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_DURING_FORK)  # (held by the parent while it forked us)
    # Ctrl-C reaches the whole process group: the parent stops the pool, a worker must not print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited through fork
    _worker_tokenizer = tokenizer


def _die_with_parent(parent: int):
    """Have the kernel kill this process when its parent dies (Linux's PR_SET_PDEATHSIG), so that a parent killed
    by SIGKILL leaves no worker behind holding its stdout and stderr open. Elsewhere the parent's cleanup alone."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _encode_chunk(pieces: list[tuple[str, bool]], tokenizer: Tokenizer | None = None) -> np.ndarray:
    """Token ids of a chunk of document pieces, with the document separator before each document's first piece."""
    tokenizer = tokenizer or _worker_tokenizer
    separator = document_separator(tokenizer)
    flat: list[int] = []
    for (_, starts), ids in zip(pieces, tokenizer.encode_batch([text for text, _ in pieces])):
        if starts:
            flat += separator
        flat += ids
    return np.array(flat, dtype=token_dtype(tokenizer.vocab_size))


def _chunks(pieces: Iterator[tuple[str, bool]], max_chars: int) -> Iterator[tuple[list, int]]:
    chunk, size = [], 0
    for text, starts in pieces:
        chunk.append((text, starts))
        size += len(text) + 1
        if size >= max_chars:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


def tokenize_corpus(paths: list, tokenizer: Tokenizer, out_dir: Path, text_field: str = "text",
                    separator: str = DOC_SEPARATOR, workers: int | None = None, progress=None) -> dict:
    """Write the token shards of the corpus and their index (index.json) to out_dir; return the index.

    Chunks are encoded by a pool of worker processes, at most two chunks per worker in flight, and written in
    corpus order, so the result does not depend on the number of workers.
    """
    if tokenizer.end_of_text is None:
        raise LLMError(f"the tokenizer {tokenizer.path} has neither {END_OF_TEXT} nor an end token to separate "
                       "documents")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    workers = workers or os.cpu_count() or 1
    shards: list[dict] = []
    current = {"file": None, "tokens": 0}
    handle = None

    def write(ids: np.ndarray):
        nonlocal handle
        while len(ids):
            if handle is None:
                current.update(file=f"shard-{len(shards):05d}.bin", tokens=0)
                handle = open(out_dir / current["file"], "wb")
            take = min(len(ids), SHARD_TOKENS - current["tokens"])
            ids[:take].tofile(handle)
            current["tokens"] += take
            ids = ids[take:]
            if current["tokens"] == SHARD_TOKENS:
                close_shard()

    def close_shard():
        nonlocal handle
        if handle is not None:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            handle = None
            shards.append(dict(current))

    chunks = _chunks(document_pieces(paths, text_field, separator), data.CHUNK_CHARS)
    first = next(chunks, None)
    second = next(chunks, None) if first is not None else None
    try:
        if second is None or workers == 1:  # one chunk (or one core): no pool to start
            for chunk, size in (c for c in (first, second) if c is not None):
                write(_encode_chunk(chunk, tokenizer))
                progress and progress(size)
            for chunk, size in chunks:
                write(_encode_chunk(chunk, tokenizer))
                progress and progress(size)
        else:
            _tokenize_in_pool(first, second, chunks, tokenizer, workers, write, progress)
        close_shard()
    finally:
        if handle is not None:
            handle.close()
    n_tokens = sum(s["tokens"] for s in shards)
    if n_tokens == 0:
        raise LLMError("the corpus is empty: no text to train on")
    index = {"format": TOKENS_FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
             "tokens": n_tokens, "shards": shards, "corpus": [str(p) for p in paths]}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1), encoding="utf-8")
    return index


def _tokenize_in_pool(first, second, chunks, tokenizer, workers, write, progress):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork: workers start in milliseconds and use only sentencepiece and numpy, never torch
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(tokenizer, os.getpid()))
    pending: deque = deque()

    def drain(limit: int):
        while len(pending) > limit:
            future, size = pending.popleft()
            write(future.result())
            progress and progress(size)

    try:
        for i, (chunk, size) in enumerate(_chain(first, second, chunks)):
            forks = i == 0  # the first submit forks every worker
            if forks:
                signal.pthread_sigmask(signal.SIG_BLOCK, HELD_DURING_FORK)
            try:
                pending.append((pool.submit(_encode_chunk, chunk), size))
            finally:
                if forks:  # a signal that came meanwhile is raised here
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_DURING_FORK)
            drain(2 * workers)
        drain(0)
    except BaseException:  # an error, Ctrl-C or SIGTERM: stop the workers now rather than finish their chunks
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def _chain(first, second, rest):
    yield first
    yield second
    yield from rest


class TokenData:
    """Token shards seen as one sequence, split into a training part and a held-out validation part (the last
    val_fraction of the tokens)."""

    def __init__(self, directory: Path, val_fraction: float):
        directory = Path(directory)
        try:
            index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LLMError(f"{directory} holds no readable token index: {e}") from None
        dtype = np.dtype(index["dtype"])
        self.shards = [np.memmap(directory / s["file"], dtype=dtype, mode="r") for s in index["shards"]]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_tokens = int(self.starts[-1])
        self.val_start = self.n_tokens - int(self.n_tokens * val_fraction)

    def split_range(self, name: str) -> tuple[int, int]:
        return (0, self.val_start) if name == "train" else (self.val_start, self.n_tokens)

    def split_len(self, name: str) -> int:
        lo, hi = self.split_range(name)
        return hi - lo

    def read(self, start: int, length: int) -> np.ndarray:
        """length tokens from global position start, across shard boundaries, as int64."""
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self.starts[shard])
            take = min(length - done, len(self.shards[shard]) - offset)
            out[done:done + take] = self.shards[shard][offset:offset + take]
            done += take
            shard += 1
        return out

    def text_bytes(self, tokenizer, split: str = "val") -> int:
        """The UTF-8 bytes of the text a split's tokens encode, counted as `llm eval` counts them (each document's
        text, not its separator tokens): decoded once, document by document, for bits per byte."""
        lo, hi = self.split_range(split)
        ids = self.read(lo, hi - lo)
        separators = np.flatnonzero(np.isin(ids, document_separator(tokenizer)))
        n_bytes = 0
        for doc in np.split(ids, separators):
            doc = doc[~np.isin(doc, document_separator(tokenizer))]
            if len(doc):
                n_bytes += len(tokenizer.decode(doc.tolist(), skip_special=True).encode("utf-8"))
        return n_bytes

    def check_fits(self, context: int, val_fraction: float):
        """A clear error if either split is shorter than one training sequence of context + 1 tokens."""
        need = context + 1
        train, val = self.split_len("train"), self.split_len("val")
        if min(train, val) < need:
            total = int(need / min(val_fraction, 1 - val_fraction)) + 1
            raise LLMError(
                f"the corpus is too small: {self.n_tokens} tokens ({train} for training, {val} for validation); "
                f"each split needs at least context + 1 = {need} tokens, so about {total} tokens in all "
                "(use more text or a smaller --context)"
            )

    def batch(self, split: str, batch_size: int, context: int, seed: int, index: int, rows: slice | None = None):
        """Batch number `index` of a split as (inputs, targets), each (rows, context): windows at positions drawn
        from a generator seeded with (seed, split, index) alone, so any batch can be drawn again at any time.
        rows picks part of the batch (a process's share, or a micro-batch)."""
        import torch

        lo, hi = self.split_range(split)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
        starts = lo + rng.integers(0, hi - lo - context, size=batch_size)[rows or slice(None)]
        windows = torch.from_numpy(np.stack([self.read(int(s), context + 1) for s in starts]))
        return windows[:, :-1], windows[:, 1:]
