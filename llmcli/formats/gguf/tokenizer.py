"""GGUF tokenizers: tokenizer.ggml.* metadata built into a `tokenizers` tokenizer as llama.cpp builds its own
(src/llama-vocab.cpp), and our tokenizers written back as such metadata."""

from pathlib import Path

from llmcli.errors import LLMError
from llmcli.text.tokenizer import merges_from_scores


# tokenizer.ggml.pre names the regexes that split text before byte-level BPE, applied one after another, each
# splitting the pieces of the one before (llama.cpp's src/llama-vocab.cpp, llm_tokenizer_bpe and load). The regexes
# of tokenizer.json as llama.cpp writes them (its (?:'[sS]|...) for (?i:'s|...))
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
                r"|\s+")
QWEN2_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_HF_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # (tokenizer.json's form of _CONTRACTIONS)
_SPLITS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt-2": [GPT2_SPLIT], "llama3": [LLAMA3_SPLIT], "qwen2": [QWEN2_SPLIT], "smollm": [r"\p{N}", GPT2_SPLIT],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]"],
    "bloom": [r" ?[^(\s|.,!?…。，、।۔،)]+"],
    "seed-coder": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"],
}
# each name llama.cpp implements with one of those splits
PRE_TOKENIZERS = {name: split for split, names in {
    "default": ["default"],
    "gpt-2": ["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
              "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"],
    "llama3": ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
               "jina-v5-nano", "dbrx", "smaug-bpe"],
    "qwen2": ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "megrez", "hunyuan", "solar-open"],
    "smollm": ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"],
    "falcon": ["falcon"], "bloom": ["poro-chat", "bloom", "gpt3-finnish"], "seed-coder": ["seed-coder"],
}.items() for name in names}
# llama.cpp takes a word that is one token whole (ignore_merges), and starts texts with BOS unless the file says
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                 "jina-v5-nano"}
ADD_BOS = IGNORE_MERGES
# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def byte_spelling() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes, in which byte-level BPE vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def build_tokenizer(metadata: dict, path: Path):
    """A tokenizers.Tokenizer from tokenizer.ggml.* metadata, built as transformers' GGUF converters build theirs:
    "gpt2" is byte-level BPE (tokens + merges; tokenizer.ggml.pre picks the split regex), "llama" is SentencePiece
    style BPE (tokens + scores, merges derived from the scores, byte fallback, "▁" for spaces). Tokens of type
    CONTROL or UNKNOWN and those named beginning, end, unknown or padding become special tokens, USER_DEFINED ones added
    tokens, all matched whole in text."""
    import numpy as np
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise LLMError(f"{path}: the GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    types = np.asarray(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))[:len(tokens)]
    control = [tokens[i] for i in np.flatnonzero((types == CONTROL) | (types == UNKNOWN))]  # (llama.cpp matches both)
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    try:
        if kind == "gpt2":
            spelling = byte_spelling()
            alphabet = set(spelling.values())
            if set("".join(tokens)) <= alphabet:  # (spelled so, as llama.cpp's converter writes them)
                vocab = dict(zip(tokens, range(len(tokens))))
            else:
                vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): i
                         for i, token in enumerate(tokens)}
            pre = metadata.get("tokenizer.ggml.pre") or "default"
            if pre not in PRE_TOKENIZERS:
                raise LLMError(f"{path}: tokenizer.ggml.pre {pre!r} is a pre-tokenizer llmcli does not implement; "
                               f"implemented: {', '.join(sorted(PRE_TOKENIZERS))}")
            tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False, ignore_merges=pre in IGNORE_MERGES))
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in _SPLITS[PRE_TOKENIZERS[pre]]]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            tok.decoder = decoders.ByteLevel()
            control = [t for t in control if set(t) <= alphabet]
        elif kind == "llama":
            vocab = dict(zip(tokens, range(len(tokens))))
            scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            tok = Tokenizer(BPE(vocab=vocab, merges=merges or merges_from_scores(tokens, scores), fuse_unk=True,
                                byte_fallback=True, dropout=None))
            # llama.cpp puts a space before the text and before whatever follows a special token, even text that
            # starts with a space (its tokenize(), LLAMA_VOCAB_TYPE_SPM): a normalizer runs on each piece between
            # special tokens, as transformers' legacy Llama tokenizer does
            prefix_space = metadata.get("tokenizer.ggml.add_space_prefix", True)
            tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix_space else [])
                                                  + [normalizers.Replace(" ", "▁")])
            steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix_space else []))
        else:
            raise LLMError(f"{path}: unsupported GGUF tokenizer {kind!r}; supported: gpt2 (byte-level BPE) and llama "
                           "(SentencePiece)")
    except LLMError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions for inconsistent vocabularies and merges
        raise LLMError(f"{path}: the GGUF tokenizer cannot be built: {e}") from None
    # the tokens the metadata names (beginning, end, unknown, padding) are special too, whatever their type
    named = [metadata.get(f"tokenizer.ggml.{key}") for key in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                                               "padding_token_id")]
    control += [tokens[i] for i in named if isinstance(i, int) and 0 <= i < len(tokens) and tokens[i] not in control]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user_defined = [t for i in np.flatnonzero(types == USER_DEFINED) if (t := tokens[i]) in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    return tok


def gguf_tokenizer(metadata: dict, path: Path, vocab_size: int):
    """Our tokenizer (llmcli/text/tokenizer.py's HFTokenizer) for the file, with its special ids and chat template."""
    from llmcli.text.tokenizer import HFTokenizer

    tokens = metadata.get("tokenizer.ggml.tokens") or []
    if len(tokens) != vocab_size:
        raise LLMError(f"{path}: the tokenizer has {len(tokens)} tokens but the model's embedding {vocab_size}; "
                       "they do not belong together")

    def token_id(key):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None and not 0 <= value < len(tokens):
            raise LLMError(f"{path}: tokenizer.ggml.{key} {value} is outside the vocabulary (0..{len(tokens) - 1})")
        return value

    ends = [token_id(key) for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    template = metadata.get("tokenizer.chat_template")
    add_bos = add_bos_token(metadata)
    bos = token_id("bos_token_id")
    if bos is None and metadata.get("tokenizer.ggml.model") == "llama" and len(tokens) > 1:
        bos = 1  # llama.cpp's default for SentencePiece vocabularies
    if add_bos and bos is None:
        raise LLMError(f"{path}: tokenizer.ggml.add_bos_token is true but the file names no beginning token "
                       "(tokenizer.ggml.bos_token_id)")
    return HFTokenizer(build_tokenizer(metadata, path), files=[path], bos_id=bos,
                       eos_ids=list(dict.fromkeys(i for i in ends if i is not None)),
                       pad_id=token_id("padding_token_id"), chat_template=template if isinstance(template, str) else None,
                       add_bos=add_bos)


def add_bos_token(metadata: dict) -> bool:
    """Whether llama.cpp starts a text with the beginning token: tokenizer.ggml.add_bos_token, else its default for
    the tokenizer (SentencePiece's yes; for byte-level BPE only Llama 3's pre-tokenizers)."""
    value = metadata.get("tokenizer.ggml.add_bos_token")
    if isinstance(value, bool):
        return value
    return metadata.get("tokenizer.ggml.model") == "llama" or metadata.get("tokenizer.ggml.pre") in ADD_BOS


def tokenizer_metadata(tokenizer) -> dict:
    """tokenizer.ggml.* metadata for our tokenizers: a SentencePiece model becomes GGUF's "llama" tokenizer (tokens,
    scores, token types), a `tokenizers` byte-level BPE its "gpt2" one (tokens, merges, the split it uses), as
    llama.cpp's convert_hf_to_gguf.py writes them. Raises LLMError for any other kind."""
    if hasattr(tokenizer, "sp"):
        sp = tokenizer.sp
        tokens = [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
        scores = [sp.GetScore(i) for i in range(sp.GetPieceSize())]
        types = sentencepiece_types(sp.serialized_model_proto())
        prefix_space = sp.EncodeAsPieces("x")[0].startswith("▁")  # SentencePiece's add_dummy_prefix
        meta = {"model": "llama", "tokens": tokens, "scores": scores, "token_type": types,
                "add_space_prefix": prefix_space}
    elif hasattr(tokenizer, "tok"):
        meta = _tokenizers_metadata(tokenizer.tok)
    else:
        raise LLMError(f"a {type(tokenizer).__name__} cannot be written to GGUF")
    # what our commands do: texts start with start_of_text where the model says so, samples end at its stop_tokens
    start, ends = tokenizer.start_of_text, list(dict.fromkeys([*tokenizer.eos_ids, *tokenizer.stop_tokens]))
    meta |= {"bos_token_id": start if tokenizer.add_bos else tokenizer.bos_id, "add_bos_token": tokenizer.add_bos,
             "eos_token_id": ends[0] if ends else None,
             "eot_token_id": ends[1] if len(ends) > 1 else None, "padding_token_id": getattr(tokenizer, "pad_id", None),
             "chat_template": tokenizer.chat_template}
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "padding_token_id"):
        if meta.get(key) is not None:  # llama.cpp expects its special tokens to be CONTROL (ours: user-defined)
            meta["token_type"][meta[key]] = CONTROL
    return {k: v for k, v in meta.items() if v is not None}


def sentencepiece_types(proto: bytes) -> list[int]:
    """The type of every piece of a serialized SentencePiece ModelProto (sentencepiece_model.proto: field 1, the
    pieces; in each, field 3 the type, numbered as GGUF's token types, NORMAL when absent). The Python API tells
    control, unknown, unused and byte pieces apart but not user-defined ones (our <|endoftext|>), which GGUF
    readers must match whole."""
    return [next((v for f, v in proto_fields(piece) if f == 3), NORMAL)
            for f, piece in proto_fields(proto) if f == 1]


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if byte < 0x80:
            return value, i


def proto_fields(data: bytes):
    """(field number, value or bytes) of one serialized protobuf message, in order."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        kind = key & 7
        if kind == 0:
            value, i = _varint(data, i)
        elif kind == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        else:  # 1: 64-bit, 5: 32-bit
            size = 8 if kind == 1 else 4
            value, i = data[i:i + size], i + size
        yield key >> 3, value


def _pre_tokenizer_name(spec: dict) -> str:
    """The tokenizer.ggml.pre of a byte-level BPE's pre-tokenizer (tokenizer.json's form), as llama.cpp's converter
    names it. Raises LLMError for a split none of PRE_TOKENIZERS makes."""
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds[-1:] == ["ByteLevel"] and not steps[-1].get("use_regex", True) and set(kinds[:-1]) == {"Split"}:
        patterns = [(s.get("pattern") or {}).get("Regex") for s in steps[:-1]]
        patterns = [_CONTRACTIONS + p[len(_HF_CONTRACTIONS):] if p and p.startswith(_HF_CONTRACTIONS) else p
                    for p in patterns]
        name = next((name for name, splits in _SPLITS.items() if splits == patterns), None)
        if name is not None:
            return {"llama3": "llama-bpe"}.get(name, name)
    raise LLMError("this byte-level BPE tokenizer splits text in a way no llama.cpp pre-tokenizer llmcli knows does; "
                   "it cannot be written to GGUF")


def _tokenizers_metadata(tok) -> dict:
    import json

    spec = json.loads(tok.to_str())
    model = spec["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        if i >= len(tokens):
            raise LLMError(f"the tokenizer's ids are not 0..{len(vocab) - 1}; it cannot be written to GGUF")
        tokens[i] = token
    added = tok.get_added_tokens_decoder()
    types = [CONTROL if i in added and added[i].special else USER_DEFINED if i in added else NORMAL
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre_tokenizer, normalizer = json.dumps(spec.get("pre_tokenizer")), json.dumps(spec.get("normalizer"))
    if model.get("type") == "BPE" and '"ByteLevel"' in pre_tokenizer:
        pre = _pre_tokenizer_name(spec["pre_tokenizer"])
        return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges}
    sentencepiece = '"Metaspace"' in pre_tokenizer or r'"\u2581"' in normalizer  # (JSON's escape of ▁)
    if model.get("type") == "BPE" and model.get("byte_fallback") and sentencepiece:
        # SentencePiece-style BPE: llama.cpp merges by score, so a token made by merge r scores -r
        rank = {m.replace(" ", ""): -r for r, m in reversed(list(enumerate(merges)))}
        byte = [len(t) == 6 and t.startswith("<0x") and t.endswith(">") for t in tokens]
        types = [BYTE if b else UNKNOWN if t == model.get("unk_token") else k for t, b, k in zip(tokens, byte, types)]
        prefix = '"Prepend"' in normalizer or ('"Metaspace"' in pre_tokenizer
                                               and '"prepend_scheme": "never"' not in pre_tokenizer)
        return {"model": "llama", "tokens": tokens, "scores": [float(rank.get(t, 0)) for t in tokens],
                "token_type": types, "merges": merges, "add_space_prefix": prefix}
    raise LLMError("only SentencePiece and byte-level BPE tokenizers can be written to GGUF, not this "
                   f"{model.get('type')} tokenizer")
