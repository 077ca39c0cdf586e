"""SentencePiece tokenizers: train one on a corpus, load it, encode and decode losslessly.

Hugging Face folders may bring a `tokenizers` tokenizer instead (tokenizer.json, or GPT-2's vocab.json + merges.txt),
read by HF's `tokenizers` library (a dependency), behind the same interface; their
special tokens come from the folder's generation_config.json, config.json and tokenizer_config.json.

Trained tokenizers use byte fallback and no normalisation, so any UTF-8 text round-trips exactly; the end-of-text
token `<|endoftext|>` separates documents and is matched wherever that string appears in text. SentencePiece writes a
space as U+2581 (▁) and turns every ▁ back into a space when decoding; so that a literal ▁ in the text survives, it
is encoded as its three UTF-8 byte tokens, which decode to ▁ itself.
"""

import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from llmcli.errors import LLMError

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.model"
MODEL_TYPES = ("bpe", "unigram", "char")  # char: a token per character of the corpus (as nanoGPT's char-level data)
SPACE_MARK = "\u2581"  # SentencePiece's sign for a space in its pieces
MAX_SENTENCE_BYTES = 4096  # training text is cut into pieces of at most this (SentencePiece skips longer sentences)


class Tokenizer:
    """A SentencePiece model (ours, or a Hugging Face folder's tokenizer.model) with the operations the workbench needs.

    The special tokens every tokenizer of the workbench names (HFTokenizer has the same attributes):
    - start_of_text: the id every text starts with, as the model's own files say (add_bos_token, the tokenizer's
      post-processor, tokenizer.ggml.add_bos_token), else None: ours `<|endoftext|>` (stated in special_tokens.json;
      a checkpoint from before that file starts with it too), a SentencePiece model without the setting its `<s>`.
      add_bos: whether there is one.
    - stop_tokens: the ids that end a sample (a model may have several: Llama 3's `<|eot_id|>` and
      `<|end_of_text|>`); `<|endoftext|>` for ours.
    - end_of_text: the id that separates documents in training data: `<|endoftext|>`, else the model's own end token.
    - special_ids: control tokens, never printed as generated text.
    """

    def __init__(self, path: str | Path, specials_from: Path | None = None):
        """path: a tokenizer.model or a directory holding one; specials_from: a folder whose files name the special
        tokens (read_special_tokens), else the model's own <s> and </s>. Raises LLMError."""
        self.path = resolve_tokenizer_path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise LLMError(f"{self.path} is not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.files = [self.path]
        self.pieces_size = self.sp.GetPieceSize()
        eot = self._piece_id(END_OF_TEXT)  # a tokenizer from elsewhere may have no end-of-text token
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        specials = read_special_tokens(specials_from, self._piece_id) if specials_from else {}
        # tokens a folder adds on top of the SentencePiece vocabulary (tokenizer_config.json's added_tokens_decoder)
        self.added = {i: text for i, (text, _) in specials.get("added", {}).items() if i >= self.pieces_size}
        if self.added:
            if sorted(self.added) != list(range(self.pieces_size, self.pieces_size + len(self.added))):
                raise LLMError(f"{specials_from}: the added tokens' ids do not follow the {self.pieces_size} of "
                               f"{self.path.name}")
            self.vocab_size += len(self.added)
            specials = read_special_tokens(specials_from, self._piece_id)  # (their names now resolve)
        self.chat_template = specials.get("chat_template")
        control = {i for i in range(self.pieces_size) if self.sp.IsControl(i)}
        control |= {i for i, (_, special) in specials.get("added", {}).items() if special and i >= self.pieces_size}
        _set_specials(self, eot, specials.get("bos", bos if bos >= 0 else None),
                      specials.get("eos") or ([eos] if eos >= 0 else []), control, specials.get("add_bos"))
        # text of special tokens becomes the token, as transformers and llama.cpp do for templates and prompts: the
        # control and unknown pieces (<s>, </s>, <unk>), user-defined ones and the added tokens, longest first
        named = {self.sp.IdToPiece(i): i for i in range(self.pieces_size)
                 if self.sp.IsControl(i) or self.sp.IsUnknown(i)} | {v: k for k, v in self.added.items()}
        self.special_text = {text: i for text, i in named.items() if text}
        self._special_split = re.compile("(" + "|".join(map(re.escape, sorted(self.special_text, key=len,
                                                                               reverse=True))) + ")").split
        # characters SentencePiece would encode alike, encoded as their byte tokens instead: a literal ▁ (its sign
        # for a space), and a space itself when the model has no ▁ piece (one trained on text without spaces
        # spells a space with ▁'s bytes). A tokenizer without byte pieces, or one that puts a space before every
        # text (Llama's), cannot encode pieces of a text separately: a literal ▁ reads as a space there, as in
        # SentencePiece itself
        byte_ids = {c: [self.sp.PieceToId(f"<0x{b:02X}>") for b in c.encode("utf-8")] for c in (SPACE_MARK, " ")}
        dummy_prefix = self.sp.EncodeAsPieces("a")[:1] != ["a"]
        self.escaped = {}
        if all(self.sp.IsByte(i) for ids in byte_ids.values() for i in ids) and not dummy_prefix:
            self.escaped = byte_ids if self._piece_id(SPACE_MARK) is None else {SPACE_MARK: byte_ids[SPACE_MARK]}
        self._escaped_split = re.compile("(" + "|".join(map(re.escape, self.escaped)) + ")").split

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.PieceToId(piece)
        if self.sp.IdToPiece(i) == piece:
            return i
        return next((k for k, text in getattr(self, "added", {}).items() if text == piece), None)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not any(s in t for t in texts for s in self.special_text):
            return self._encode_plain(texts)
        # the text between special tokens' text encoded as a text of its own (so it gets SentencePiece's space prefix
        # where the model has one, as after a special token in llama.cpp and transformers' Llama tokenizers)
        out = []
        for text in texts:
            parts = self._special_split(text)
            plain = self._encode_plain([p for p in parts[::2] if p])[::-1]
            out.append([i for k, p in enumerate(parts) if p
                        for i in ([self.special_text[p]] if k % 2 else plain.pop())])
        return out

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        if not any(c in t for c in self.escaped for t in texts):
            return self.sp.Encode(texts, out_type=int)
        # the parts between escaped characters encoded as usual, each escaped character as its byte tokens
        out = []
        for text in texts:
            ids = []
            for i, part in enumerate(self._escaped_split(text)):
                ids += self.escaped[part] if i % 2 else self.sp.Encode(part, out_type=int) if part else []
            out.append(ids)
        return out

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """The text of ids; skip_special leaves out special tokens (for generated text). Raises LLMError for an id
        outside the vocabulary."""
        _check_ids(ids, self.vocab_size)
        ids = [i for i in ids if i not in self.special_ids] if skip_special else ids
        if not self.added:
            return self.sp.DecodeIds(ids)
        runs, text = [], ""  # SentencePiece decodes its own ids; an added token is its text
        for i in ids + [None]:
            if i is None or i in self.added:
                text += self.sp.DecodeIds(runs) + (self.added[i] if i is not None else "")
                runs = []
            else:
                runs.append(i)
        return text

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.token(i) for i in ids]

    def token(self, i: int | None) -> str:
        return "" if i is None else self.added[i] if i in self.added else self.sp.IdToPiece(i)

    def save(self, directory: Path):
        """Write what load_tokenizer(directory) reads back as this tokenizer."""
        from llmcli.files import atomic_write

        atomic_write(directory / TOKENIZER_FILE, self.path.read_bytes())
        _save_specials(self, directory)


class HFTokenizer:
    """Any Hugging Face `tokenizers` tokenizer (tokenizer.json: GPT-2, Llama 3, Qwen2 and SmolLM byte-level BPE,
    SentencePiece-style BPE or Unigram), with the special tokens the model's own files name. Same interface as
    Tokenizer."""

    def __init__(self, tok, files: list[Path], bos_id: int | None = None, eos_ids: list[int] = (),
                 pad_id: int | None = None, chat_template: str | None = None, add_bos: bool | None = None):
        """add_bos: the model's setting; None takes it from the tokenizer's post-processor (a template that puts a
        token before the text: that token)."""
        self.tok, self.files, self.path = tok, [Path(f) for f in files], Path(files[0])
        self.vocab_size = tok.get_vocab_size()
        self.chat_template, self.pad_id = chat_template, pad_id
        added = tok.get_added_tokens_decoder()  # id -> AddedToken
        if add_bos is None:
            start = _post_processor_start(tok)
            add_bos, bos_id = start is not None, start if start is not None else bos_id
        _set_specials(self, tok.token_to_id(END_OF_TEXT), bos_id, list(eos_ids),
                      {i for i, a in added.items() if a.special}, add_bos)

    @classmethod
    def from_folder(cls, directory: Path) -> "HFTokenizer":
        tokenizers = _import_tokenizers(directory)
        json_file, vocab, merges = directory / "tokenizer.json", directory / "vocab.json", directory / "merges.txt"
        try:
            if json_file.is_file():
                files = [json_file]
                tok = tokenizers.Tokenizer.from_file(str(json_file))
            else:  # GPT-2's original files
                files = [vocab, merges]
                tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab), str(merges)))
                tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
                tok.decoder = tokenizers.decoders.ByteLevel()
                if tok.token_to_id(END_OF_TEXT) is not None:
                    tok.add_special_tokens([END_OF_TEXT])  # matched whole, never split into pieces
        except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
            raise LLMError(f"the tokenizer in {directory} cannot be read: {e}") from None
        specials = read_special_tokens(directory, tok.token_to_id)
        add_bos = specials.get("add_bos", None if json_file.is_file() else False)  # (GPT2Tokenizer's default)
        return cls(tok, files, specials.get("bos"), specials.get("eos", []), specials.get("pad"),
                   specials.get("chat_template"), add_bos)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        _check_ids(ids, self.vocab_size)
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.tok.id_to_token(i) for i in ids]

    def token(self, i: int | None) -> str:
        return "" if i is None else self.tok.id_to_token(i)

    def save(self, directory: Path):
        """Write tokenizer.json (and the special tokens) so that load_tokenizer(directory) reads this back."""
        from llmcli.files import atomic_write

        atomic_write(directory / "tokenizer.json", self.tok.to_str())
        _save_specials(self, directory)


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best score first
    (transformers' generate_merges, so that our merges, and so our tokens, equal its)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def llama_tokenizer(directory: Path) -> "HFTokenizer":
    """The tokenizer transformers' LlamaTokenizer builds from a folder's tokenizer.model alone: BPE over the
    SentencePiece pieces (merges from their scores), byte fallback, "▁" put before the text by a Metaspace
    pre-tokenizer (only at its very start unless tokenizer_config.json says legacy: true; never with
    add_prefix_space: false), the control pieces and added tokens matched whole in text."""
    import json

    tokenizers = _import_tokenizers(directory)
    from tokenizers import AddedToken, decoders, pre_tokenizers

    sp = spm.SentencePieceProcessor()
    sp.Load(str(directory / TOKENIZER_FILE))
    settings = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    pieces = [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    scores = [sp.GetScore(i) for i in range(len(pieces))]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={p: i for i, p in enumerate(pieces)}, merges=merges_from_scores(pieces, scores), fuse_unk=True,
        byte_fallback=True, dropout=None, unk_token=sp.IdToPiece(sp.unk_id()) if sp.unk_id() >= 0 else None))
    prefix = settings.get("add_prefix_space", True) is not False
    scheme = ("always" if settings.get("legacy") else "first") if prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme=scheme, split=False)
    steps = [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    special = [p for i, p in enumerate(pieces) if sp.IsControl(i) or sp.IsUnknown(i)]
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in special])
    added = read_special_tokens(directory, tok.token_to_id).get("added", {})
    for i, (text, is_special) in sorted(added.items()):
        if i >= len(pieces):
            tok.add_tokens([AddedToken(text, normalized=False, special=is_special)])
    specials = read_special_tokens(directory, tok.token_to_id)
    return HFTokenizer(tok, [directory / TOKENIZER_FILE], specials.get("bos", sp.bos_id() if sp.bos_id() >= 0 else None),
                       specials.get("eos") or ([sp.eos_id()] if sp.eos_id() >= 0 else []), specials.get("pad"),
                       specials.get("chat_template"), specials.get("add_bos", True))


def _post_processor_start(tok) -> int | None:
    """The id a `tokenizers` post-processor puts before a text (a TemplateProcessing "<s> $A"), or None."""
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    starts = [k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare]
    return full[0] if starts and starts[0] == 1 else None


def _import_tokenizers(where):
    try:
        import tokenizers
    except ImportError:
        raise LLMError(f"{where} has a Hugging Face tokenizer, which needs the `tokenizers` library: "
                       "pip install tokenizers") from None
    return tokenizers


def _set_specials(tok, eot: int | None, bos: int | None, eos: list[int], control: set[int],
                  add_bos: bool | None = None):
    """The attributes of the Tokenizer docstring, from the end-of-text, beginning and end ids a model names and its
    add_bos_token setting (None where its files have none: <|endoftext|> where the vocabulary has it, as our
    checkpoints from before the setting, else the beginning token, as transformers' LlamaTokenizer)."""
    if add_bos is None:
        tok.start_of_text = eot if eot is not None else bos
    else:
        tok.start_of_text = bos if add_bos else None
    tok.add_bos = tok.start_of_text is not None
    tok.stop_tokens = tuple(dict.fromkeys(([eot] if eot is not None else []) + [i for i in eos if i is not None]))
    tok.end_of_text = eot if eot is not None else (tok.stop_tokens[0] if tok.stop_tokens else None)
    tok.bos_id = bos
    tok.eos_ids = tuple(i for i in eos if i is not None)
    tok.special_ids = frozenset(control) | set(tok.stop_tokens) | ({bos} if bos is not None else set())


def _check_ids(ids: list[int], vocab_size: int):
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise LLMError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


SPECIALS_FILE = "special_tokens.json"  # the special tokens a copied tokenizer came with (ours; not a HF file)


def tokenizer_files(directory: Path) -> list[Path]:
    """The files of the tokenizer Tokenizer.save or HFTokenizer.save wrote in directory (to copy them along)."""
    return [directory / n for n in (TOKENIZER_FILE, "tokenizer.json", SPECIALS_FILE) if (directory / n).is_file()]


def _save_specials(tok, directory: Path):
    import json

    from llmcli.files import atomic_write

    # the start token stated as the id it is (ours: <|endoftext|>, which no SentencePiece setting can name)
    record = {"bos_token_id": tok.start_of_text if tok.add_bos else tok.bos_id, "add_bos_token": tok.add_bos,
              "eos_token_id": list(tok.eos_ids)}
    if tok.chat_template:
        record["chat_template"] = tok.chat_template
    atomic_write(directory / SPECIALS_FILE, json.dumps(record, ensure_ascii=False, indent=1) + "\n")


def read_special_tokens(directory: Path, token_to_id) -> dict:
    """{"bos": id, "eos": [ids], "pad": id, "chat_template": str, "add_bos": bool, "added": {id: (text, special)}}
    as a Hugging Face folder names them:
    generation_config.json first (the ids generate() stops at), then config.json, then the token strings of
    tokenizer_config.json; our special_tokens.json before all. The chat template: chat_template.jinja, else
    tokenizer_config.json's `chat_template` (a string, or a list of named ones: "default"). A malformed file is an
    LLMError naming it."""
    import json

    found: dict = {}

    def ids(value) -> list[int]:
        if isinstance(value, dict):  # tokenizer_config.json's AddedToken form
            value = value.get("content")
        if isinstance(value, str):
            value = token_to_id(value)
        values = value if isinstance(value, list) else [value]
        return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]

    for name, keys in ((SPECIALS_FILE, ("bos_token_id", "eos_token_id", "pad_token_id")),
                       ("generation_config.json", ("bos_token_id", "eos_token_id", "pad_token_id")),
                       ("config.json", ("bos_token_id", "eos_token_id", "pad_token_id")),
                       ("tokenizer_config.json", ("bos_token", "eos_token", "pad_token"))):
        path = directory / name
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LLMError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(record, dict):
            raise LLMError(f"{path} is not a JSON object")
        for kind, key in zip(("bos", "eos", "pad"), keys):
            if kind in found or key not in record or record[key] is None:
                continue
            values = ids(record[key])
            if values:
                found[kind] = values if kind == "eos" else values[0]
        if isinstance(record.get("add_bos_token"), bool) and "add_bos" not in found:
            found["add_bos"] = record["add_bos_token"]
        added = record.get("added_tokens_decoder")
        if isinstance(added, dict) and "added" not in found:
            found["added"] = {int(i): (a["content"], bool(a.get("special"))) for i, a in added.items()
                              if isinstance(a, dict) and isinstance(a.get("content"), str) and str(i).isdigit()}
        template = record.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if isinstance(template, str) and "chat_template" not in found:
            found["chat_template"] = template
    if (directory / "chat_template.jinja").is_file():
        found["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return found


def load_tokenizer(path: str | Path):
    """The tokenizer of a directory (ours, a HF folder) or a tokenizer.model file: HF's tokenizer.json first (what
    transformers reads where a folder has both), then SentencePiece, then GPT-2's vocab.json + merges.txt; special
    tokens from the folder's files. Raises LLMError."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_folder(path)
        if (path / TOKENIZER_FILE).is_file():
            if _transformers_class(path) in ("LlamaTokenizer", "LlamaTokenizerFast"):
                return llama_tokenizer(path)  # (as transformers builds it; ours stay SentencePiece's own)
            return Tokenizer(path / TOKENIZER_FILE, specials_from=path)
        if (path / "vocab.json").is_file():
            return HFTokenizer.from_folder(path)
        raise LLMError(f"no tokenizer in {path}: expected {TOKENIZER_FILE}, tokenizer.json or vocab.json + merges.txt")
    return Tokenizer(path)


def _transformers_class(directory: Path) -> str | None:
    """tokenizer_config.json's tokenizer_class, or None."""
    import json

    try:
        return json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


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
    """Train a SentencePiece model on an iterable of texts (lines or whole documents) and write
    out_dir/tokenizer.model (atomically; the model records no path, so the same text and settings give the same
    bytes wherever they are written). A text longer than MAX_SENTENCE_BYTES is cut into pieces (SentencePiece
    would skip it). model_type "char" makes a token of each character the corpus uses: vocab_size is then an upper
    bound (a corpus with fewer characters gives fewer ids; rarer characters than it holds fall back to bytes).

    Raises LLMError when there is no text, when vocab_size is too small for the corpus's characters (naming the
    size needed), or when SentencePiece fails; nothing is left behind in out_dir then.
    """
    import io

    from llmcli.files import atomic_write, make_output_dir

    if model_type not in MODEL_TYPES:
        raise LLMError(f"unknown tokenizer type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 260 + len(special_tokens):
        # byte fallback alone takes 256 ids, plus unk and the special tokens
        raise LLMError(f"vocabulary size {vocab_size} is too small: byte fallback needs at least 260 ids")
    out_dir = Path(out_dir)
    made_dir = not out_dir.exists()
    make_output_dir(out_dir)
    model = io.BytesIO()
    seen = _CountingIterator(piece for text in sentences for piece in training_pieces(text))
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
            # char: every character a token while vocab_size allows (0.9995 sent a corpus's rarest ones, an 'é' in
            # an English text, to bytes: two or more tokens for one character)
            character_coverage=1.0 if model_type == "char" else 0.9995,
            user_defined_symbols=symbols,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            input_sentence_size=max_sentences,
            max_sentence_length=MAX_SENTENCE_BYTES + 1,
            shuffle_input_sentence=True,
            train_extremely_large_corpus=False,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        if seen.error is not None:
            raise seen.error
        if not seen.text:
            raise LLMError("the corpus has no text to train a tokenizer on (it is empty or blank)")
    except (RuntimeError, LLMError) as e:
        if made_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
        _raise_training_failure(e, seen, vocab_size)
    atomic_write(out_dir / TOKENIZER_FILE, model.getvalue())
    tokenizer = Tokenizer(out_dir / TOKENIZER_FILE)
    _save_specials(tokenizer, out_dir)  # texts start with <|endoftext|>, said in special_tokens.json
    return tokenizer


def _raise_training_failure(e: Exception, seen, vocab_size: int):
    """The LLMError for SentencePiece's failure to train (its message without its source location)."""
    if isinstance(e, LLMError):
        raise e
    if seen.error is not None:
        raise seen.error from None
    if not seen.text:
        raise LLMError("the corpus has no text to train a tokenizer on (it is empty or blank)") from None
    message = str(e).strip().splitlines()[-1].rsplit("] ", 1)[-1]  # drop SentencePiece's source location
    needed = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message)
    if needed:
        raise LLMError(f"--vocab-size {vocab_size} is too small for this corpus: it needs at least "
                       f"{needed.group(1)} (a token for each of its characters, besides the 256 bytes and the "
                       "special tokens)") from None
    if "Vocabulary size" in message:
        message += " Use a smaller --vocab-size or a larger corpus."
    raise LLMError(f"tokenizer training failed: {message}") from None


def training_pieces(text: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """The text cut into pieces of at most max_bytes UTF-8 bytes, each cut after the last newline or space before
    the limit (or at a character boundary when there is none); an empty text gives nothing."""
    data = text.encode("utf-8")
    while len(data) > max_bytes:
        cut = max(data.rfind(b"\n", 0, max_bytes), data.rfind(b" ", 0, max_bytes)) + 1
        if cut <= max_bytes // 2:  # no break in the second half: cut between characters
            cut = max_bytes
            while data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
                cut -= 1
        yield data[:cut].decode("utf-8")
        data = data[cut:]
    if data:
        yield data.decode("utf-8")


class _CountingIterator:
    """Counts the lines SentencePiece reads, and keeps an error from reading them (SentencePiece would hide it)."""

    def __init__(self, items: Iterable[str]):
        self.items = iter(items)
        self.count = 0
        self.text = False  # whether any item had more than whitespace
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
        self.text = self.text or not item.isspace()
        return item
