"""SentencePiece tokenizers: train one on a corpus, load it, encode and decode losslessly.

Hugging Face folders may bring GPT-2's byte-level BPE instead (tokenizer.json, or vocab.json + merges.txt): that is
read by HF's `tokenizers` library, an optional extra (pip install 'llmcli[hf]'), behind the same interface.

Trained tokenizers use byte fallback and no normalisation, so any UTF-8 text round-trips exactly; the end-of-text
token `<|endoftext|>` separates documents and is matched wherever that string appears in text.
"""

import os
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from llmcli.errors import LLMError

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.model"
MODEL_TYPES = ("bpe", "unigram")


class Tokenizer:
    """A loaded SentencePiece model with the few operations the workbench needs."""

    def __init__(self, path: str | Path):
        self.path = resolve_tokenizer_path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise LLMError(f"{self.path} is not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.GetPieceSize()
        eot = self.sp.PieceToId(END_OF_TEXT)
        # PieceToId answers unk for pieces it lacks; a tokenizer from elsewhere may have no end-of-text token
        self.end_of_text = eot if self.sp.IdToPiece(eot) == END_OF_TEXT else None
        # what a text starts with and a sample ends at: ours, the end-of-text token; Llama's, <s> and </s>
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        self.start_of_text = self.end_of_text if self.end_of_text is not None else bos if bos >= 0 else None
        self.stop_token = self.end_of_text if self.end_of_text is not None else eos if eos >= 0 else None
        self.files = [self.path]

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.Encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LLMError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.sp.DecodeIds(ids)

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.IdToPiece(i) for i in ids]


class ByteLevelBPETokenizer:
    """GPT-2's byte-level BPE from a Hugging Face folder, read by the `tokenizers` library."""

    def __init__(self, directory: Path):
        try:
            import tokenizers
        except ImportError:
            raise LLMError(f"{directory} has a byte-level BPE tokenizer, which needs the `tokenizers` library: "
                           "pip install 'llmcli[hf]'") from None
        json_file, vocab, merges = directory / "tokenizer.json", directory / "vocab.json", directory / "merges.txt"
        try:
            if json_file.is_file():
                self.files = [json_file]
                self.tok = tokenizers.Tokenizer.from_file(str(json_file))
            else:
                self.files = [vocab, merges]
                self.tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab), str(merges)))
                self.tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
                self.tok.decoder = tokenizers.decoders.ByteLevel()
                if self.tok.token_to_id(END_OF_TEXT) is not None:
                    self.tok.add_special_tokens([END_OF_TEXT])  # matched whole, never split into pieces
        except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
            raise LLMError(f"the tokenizer in {directory} cannot be read: {e}") from None
        self.path = self.files[0]
        self.vocab_size = self.tok.get_vocab_size()
        self.end_of_text = self.tok.token_to_id(END_OF_TEXT)
        self.start_of_text = self.stop_token = self.end_of_text

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LLMError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.tok.decode(ids, skip_special_tokens=False)

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.tok.id_to_token(i) for i in ids]


def load_tokenizer(path: str | Path):
    """The tokenizer of a directory (ours or a HF folder) or file: SentencePiece first, then byte-level BPE."""
    path = Path(path)
    if path.is_dir() and not (path / TOKENIZER_FILE).is_file():
        if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
            return ByteLevelBPETokenizer(path)
        raise LLMError(f"no tokenizer in {path}: expected {TOKENIZER_FILE}, tokenizer.json or vocab.json + merges.txt")
    return Tokenizer(path)


def resolve_tokenizer_path(path: str | Path) -> Path:
    """Accept a tokenizer.model file or a directory holding one (a tokenizer or a checkpoint directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise LLMError(f"no tokenizer at {path}")
    return path


def train_tokenizer(
    sentences: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    special_tokens: tuple[str, ...] = (),
    max_sentences: int = 2_000_000,
) -> Tokenizer:
    """Train a SentencePiece model on an iterable of lines and write out_dir/tokenizer.model (atomically; the model
    records no path, so the same text and settings give the same bytes wherever they are written)."""
    import io

    from llmcli.checkpoint import atomic_write, make_output_dir

    if model_type not in MODEL_TYPES:
        raise LLMError(f"unknown tokenizer type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 260 + len(special_tokens):
        # byte fallback alone takes 256 ids, plus unk and the special tokens
        raise LLMError(f"vocabulary size {vocab_size} is too small: byte fallback needs at least 260 ids")
    out_dir = make_output_dir(Path(out_dir))
    seen = _CountingIterator(sentences)
    model = io.BytesIO()
    symbols = [END_OF_TEXT] + [s for s in special_tokens if s != END_OF_TEXT]
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=seen,
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",  # no NFKC, no whitespace folding: decode(encode(x)) == x
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            user_defined_symbols=symbols,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            train_extremely_large_corpus=False,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        if seen.error is not None:
            raise seen.error
    except RuntimeError as e:
        if seen.error is not None:
            raise seen.error from None
        if seen.count == 0:
            raise LLMError("the corpus is empty: no text to train a tokenizer on") from None
        message = str(e).strip().splitlines()[-1].rsplit("] ", 1)[-1]  # drop SentencePiece's source location
        if "Vocabulary size" in message:
            message += " Use a smaller --vocab-size or a larger corpus."
        raise LLMError(f"tokenizer training failed: {message}") from None
    atomic_write(out_dir / TOKENIZER_FILE, model.getvalue())
    return Tokenizer(out_dir / TOKENIZER_FILE)


class _CountingIterator:
    """Counts the lines SentencePiece reads, and keeps an error from reading them (SentencePiece would hide it)."""

    def __init__(self, items: Iterable[str]):
        self.items = iter(items)
        self.count = 0
        self.error: LLMError | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            item = next(self.items)
        except LLMError as e:
            self.error = e
            raise StopIteration from None
        self.count += 1
        return item
