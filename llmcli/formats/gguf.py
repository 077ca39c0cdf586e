"""GGUF files, llama.cpp's and ollama's format: read llama, qwen2 and gpt2 models into our Transformer, write ours.

A GGUF file is one file: key/value metadata (the model's shape under `{architecture}.*` keys, the tokenizer under
`tokenizer.ggml.*`, the chat template under `tokenizer.chat_template`), then the tensors, each in its own type (float
or one of ggml's block quantizations). Read and written with the `gguf` package, llama.cpp's own Python library
(a dependency); format: github.com/ggml-org/ggml/blob/master/docs/gguf.md.

Three differences of layout from our Transformer, as in Hugging Face folders (llmcli/formats/hf.py): Llama's and
Qwen2's q/k/v and gate/up are separate tensors, which we concatenate; llama.cpp's converter reorders the rows of
Llama's query and key weights so that rotary pairs are adjacent (Qwen2's are left as they are), which we undo on
reading and redo on writing; GPT-2's tensors are plain (out, in) matrices here, as ours.
"""

from functools import partial
from pathlib import Path

from llmcli.errors import LLMError

ARCHITECTURES = ("llama", "qwen2", "gpt2")  # Mistral and SmolLM files say llama
# Tensor types we read (dequantized by gguf.quants) and the --type choices we write
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
WRITE_TYPES = ("f32", "f16", "bf16", "q8_0")

# Where each of our tensors lives in a GGUF file: a block's parts (concatenated along dim 0), then the rest
BLOCK_PARTS = {
    "gpt2": {"norm_1": ["attn_norm"], "attn.qkv": ["attn_qkv"], "attn.proj": ["attn_output"], "norm_2": ["ffn_norm"],
             "mlp.fc": ["ffn_up"], "mlp.proj": ["ffn_down"]},
    "llama": {"norm_1": ["attn_norm"], "attn.qkv": ["attn_q", "attn_k", "attn_v"], "attn.proj": ["attn_output"],
              "norm_2": ["ffn_norm"], "mlp.fc": ["ffn_gate", "ffn_up"], "mlp.proj": ["ffn_down"]},
}
OUTSIDE_BLOCKS = {"token_embedding": "token_embd", "position_embedding": "position_embd", "norm_f": "output_norm",
                  "lm_head": "output"}

# tokenizer.ggml.pre names the regex that splits text before byte-level BPE (llama.cpp's llama-vocab.cpp; the same
# table as transformers' GGUF loader). Any other name gets GPT-2's split, which ByteLevel does by itself.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
                        "smaug-bpe": LLAMA3_SPLIT, "dbrx": LLAMA3_SPLIT, "falcon3": LLAMA3_SPLIT,
                        "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT, "megrez": QWEN2_SPLIT}
# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def is_gguf_file(path) -> bool:
    """A file named .gguf, or any file that starts with GGUF's magic bytes (ollama keeps its models as blobs named
    by their hash)."""
    if path is None or not Path(path).is_file():
        return False
    if Path(path).suffix == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LLMError("GGUF files need the `gguf` library: pip install gguf") from None
    return gguf


def open_gguf(path: Path):
    """A gguf.GGUFReader on path (memory-mapped: tensors are read when touched). Raises LLMError for a file that is
    not GGUF, is truncated, or holds a tensor type ggml does not know."""
    from struct import Struct
    from struct import error as StructError

    import numpy as np

    gguf = _gguf()
    STRING, ARRAY = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY

    class Reader(gguf.GGUFReader):
        """GGUFReader, faster on large vocabularies: it slices its memory map as np.memmap (3x the cost of a plain
        array's slice) twice per string of the vocabulary and merges, and contents() decodes each string alone; here
        the map is read as a plain array, and an array of strings is decoded all at once into one part, a list of
        str, which value() reads (contents() cannot): SmolLM2's 100,000 strings 7.7 s -> 0.3 s on a busy machine,
        then 0.19 -> 0.06 s on a quiet one."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value
            self._bytes = memoryview(self._data).cast("B")

        def value(self, field):
            """A field's value: field.contents(), or the list of an array of strings."""
            return field.parts[-1] if field.types == [ARRAY, STRING] and isinstance(field.parts[-1], list) \
                else field.contents()

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            item_type, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            scalar = self.gguf_scalar_to_np.get(gguf.GGUFValueType(item_type[0]))
            if scalar is not None:  # one part for all numbers (token types, scores), as contents() reads it
                values = self._get(orig_offs + 12, scalar, length[0])
                if len(values) != length[0]:
                    raise IndexError("an array runs past the end of the file")
                return 12 + values.nbytes, [item_type, length, values], [2], [ARRAY, gguf.GGUFValueType(item_type[0])]
            if item_type[0] != STRING:
                return super()._get_field_parts(orig_offs, raw_type)
            strings, end = self._strings(orig_offs + 12, int(length[0]))
            return end - orig_offs, [item_type, length, strings], [2], [ARRAY, STRING]

        def _strings(self, offs: int, count: int) -> tuple[list[str], int]:
            """`count` strings from byte offs on (each a uint64 size, then its UTF-8 bytes), and the offset after them.
            Only the sizes are walked in Python; the bytes are decoded in one piece with a zero byte between strings
            (the highest byte of each size), then split, unless a string holds a zero byte itself."""
            size, starts, end = Struct("<Q").unpack_from, [], len(self._bytes)
            for _ in range(count):
                starts.append(offs)
                offs += 8 + size(self._bytes, offs)[0]
            if offs > end:
                raise IndexError(f"an array of strings runs past the end of the file (byte {end})")
            if not starts:
                return [], offs
            at = np.array(starts) - starts[0]
            region = self._data[starts[0]:offs].copy()
            region[at + 7] = 0  # (so for any size below 2^56)
            keep = np.ones(len(region), dtype=bool)
            keep[(at[:, None] + np.arange(7)).ravel()] = False
            text = region[keep]
            if np.count_nonzero(text == 0) != count:
                return [str(self._bytes[a + 8:b], "utf-8") for a, b in zip(starts, [*starts[1:], offs])], offs
            return text.tobytes().decode("utf-8").split("\x00")[1:], offs

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LLMError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise LLMError(f"{path} is not a GGUF file: it does not start with the bytes GGUF")
    try:
        return Reader(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            import re

            number = re.search(r"(\d+)\)? is not a valid", str(e))  # "np.uint32(99) is not a valid ..."
            raise LLMError(f"{path}: unknown tensor type {number.group(1) if number else '?'} (not a ggml type this "
                           "gguf library knows)") from None
        raise LLMError(f"{path} is truncated or corrupt: {e}") from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError, StructError) as e:
        raise LLMError(f"{path} is truncated or corrupt: {e}") from None


def read_metadata(reader, path: Path) -> dict:
    """The key/value metadata: numbers, strings and lists as Python values."""
    try:
        return {name: reader.value(field) for name, field in reader.fields.items()}
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise LLMError(f"{path}: corrupt GGUF metadata: {e}") from None


def tensor_shape(tensor) -> tuple[int, ...]:
    """A tensor's shape in PyTorch's order: GGUF lists dimensions innermost first."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def architecture_of(metadata: dict, path: Path) -> str:
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise LLMError(f"{path}: unsupported GGUF architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    return architecture


def model_settings(metadata: dict, shapes: dict[str, tuple], path: Path, rope_factors=None) -> dict:
    """ModelConfig fields from the metadata, the tensors' shapes and the rope_freqs tensor's values if the file has
    one; refuses what our Transformer would not compute exactly (partial rotary, a rope scaling other than linear or
    Llama 3's, ...)."""
    arch = architecture_of(metadata, path)

    def need(key):
        if f"{arch}.{key}" not in metadata:
            raise LLMError(f"{path}: the GGUF metadata has no {arch}.{key}, which a {arch} model needs")
        return metadata[f"{arch}.{key}"]

    def refuse(reason):
        raise LLMError(f"{path}: {reason}; this {arch} model cannot be run exactly, so it is refused")

    if "token_embd.weight" not in shapes:
        raise LLMError(f"{path}: weight token_embd.weight is missing")
    vocab_size = shapes["token_embd.weight"][0]
    n_embd, n_head = need("embedding_length"), need("attention.head_count")
    settings = dict(vocab_size=vocab_size, context=need("context_length"), n_layer=need("block_count"),
                    n_head=n_head, n_embd=n_embd, intermediate_size=need("feed_forward_length"),
                    tie_embeddings="output.weight" not in shapes)
    if arch == "gpt2":
        return settings | dict(norm_eps=float(metadata.get("gpt2.attention.layer_norm_epsilon", 1e-5)))

    head_dim = n_embd // n_head
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if metadata.get(f"{arch}.{key}", head_dim) != head_dim:
            refuse(f"{arch}.{key} is {metadata[f'{arch}.{key}']}, not the head size {head_dim}")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = float(metadata.get(f"{arch}.rope.scaling.factor", metadata.get(f"{arch}.rope.scale_linear", 1.0)))
    if "rope_freqs.weight" in shapes:
        llama3 = llama3_rope(rope_factors, float(metadata.get(f"{arch}.rope.freq_base", 10000.0)), head_dim)
        if llama3 is None:
            refuse("its rope_freqs tensor is not Llama 3's rope scaling")
        return model_settings({k: v for k, v in metadata.items() if "rope.scaling" not in k},
                              {k: v for k, v in shapes.items() if k != "rope_freqs.weight"}, path) | llama3
    if scaling not in ("none", "linear"):
        refuse(f"rope scaling of type {scaling!r} (only linear is supported)")
    # biases: Qwen2 has them on q/k/v only; a Llama file may have them everywhere (attention_bias and mlp_bias)
    bias = "blk.0.attn_output.bias" in shapes
    qkv_bias = "blk.0.attn_q.bias" in shapes and not bias
    return settings | dict(
        n_kv_head=metadata.get(f"{arch}.attention.head_count_kv", n_head), norm="rmsnorm", positions="rope",
        mlp="swiglu", bias=bias, qkv_bias=qkv_bias,
        norm_eps=float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=factor if scaling == "linear" or f"{arch}.rope.scale_linear" in metadata else 1.0)


def llama3_factors(config) -> list[float]:
    """llama.cpp's rope_freqs for a Llama 3 rope: how much each rotary frequency is divided by."""
    dim = config.head_dim
    scaled, _ = config.rope_frequencies()
    return [1.0 / config.rope_theta ** (i / dim) / f for i, f in zip(range(0, dim, 2), scaled)]


def llama3_rope(factors, theta: float, head_dim: int) -> dict | None:
    """ModelConfig's Llama 3 rope fields that give these rope_freqs (convert_hf_to_gguf.py writes the factors, not
    the settings), or None if none do. The factors are 1 for short wavelengths w, `factor` for long ones, and
    1 / ((1 - s) / factor + s) between, with s = (original_context / w - low) / (high - low): linear in 1 / w, so
    two points between give the settings up to scale, fixed here by low = 1 (Meta's value), rounded to 4 decimals
    (the factors are float32); checked by recomputing."""
    import math

    from llmcli.config import ModelConfig

    if factors is None or len(factors) != head_dim // 2:
        return None
    factor = max(factors)
    between = [(i, f) for i, f in enumerate(factors) if 1 + 1e-6 < f < factor * (1 - 1e-6)]
    if factor <= 1 or len(between) < 2:
        return None
    points = [(theta ** (-2 * i / head_dim) / (2 * math.pi), (1 / f - 1 / factor) / (1 - 1 / factor))
              for i, f in (between[0], between[-1])]
    (x0, s0), (x1, s1) = points
    slope = (s1 - s0) / (x1 - x0)
    intercept = s0 - slope * x0  # = -low / (high - low)
    if intercept >= 0:
        return None
    settings = dict(rope_type="llama3", rope_scaling=round(factor, 4), rope_low_freq_factor=1.0,
                    rope_high_freq_factor=round(1.0 - 1.0 / intercept, 4), rope_original_context=round(-slope / intercept))
    config = ModelConfig(n_embd=head_dim, n_head=1, positions="rope", rope_theta=theta, **settings)
    if not all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(llama3_factors(config), factors)):
        return None
    return settings


def gguf_parts(arch: str, name: str) -> list[str]:
    """The GGUF tensor names that make up our tensor `name`, in the order they are concatenated."""
    module, param = name.rsplit(".", 1)
    if module.startswith("blocks."):
        _, i, part = module.split(".", 2)
        return [f"blk.{i}.{p}.{param}" for p in BLOCK_PARTS["gpt2" if arch == "gpt2" else "llama"][part]]
    return [f"{OUTSIDE_BLOCKS[module]}.{param}"]


def part_rows(arch: str, config, name: str) -> list[int]:
    """Rows of each GGUF part of our tensor `name` (a fused q/k/v or gate/up tensor); [] for a single part."""
    if arch == "gpt2":
        return []
    if ".attn.qkv." in name:
        return [config.n_head * config.head_dim] + [config.kv_heads * config.head_dim] * 2
    if ".mlp.fc." in name:
        return [config.hidden_size] * 2
    return []


def rotary_heads(arch: str, config, gguf_name: str) -> int:
    """How many heads llama.cpp's converter reordered the rows of in this tensor: Llama's queries and keys only."""
    if arch != "llama":
        return 0
    if ".attn_q." in gguf_name:
        return config.n_head
    if ".attn_k." in gguf_name:
        return config.kv_heads
    return 0


def permute(w, n_head: int):
    """convert_hf_to_gguf.py's permute of query/key rows (weights or biases): within each head, the rotary pairs
    (i, i + head_dim/2) of Hugging Face's and our layout become adjacent rows (2i, 2i + 1), as llama.cpp rotates."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head: int):
    """The inverse of permute (transformers' GGUF loader does the same)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path, device: str = "cpu", quantize: str | None = None):
    """(model in eval mode, tokenizer, config dict) from a .gguf file; quantize as load_model's (each matrix quantized
    a block of rows at a time as it is dequantized; for int4, a matrix of Q4_0 or Q4_1 blocks is taken as its groups
    without dequantizing: q4_groups). Raises LLMError for a truncated or corrupt file, an architecture
    or tensor type outside ARCHITECTURES and READ_TYPES, missing or misshapen tensors, or a tokenizer that does not
    match the embedding."""
    import numpy as np

    from llmcli.config import ModelConfig
    from llmcli.formats.hf import read_parts, split_rows
    from llmcli.model.quantize import StoredGroups, materialize
    from llmcli.model.transformer import Transformer, meta_device

    gguf = _gguf()
    path = Path(path)
    reader = open_gguf(path)
    metadata = read_metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    del reader  # (its fields, as Python objects, weigh tens of MB for a large vocabulary: gone before the weights)
    shapes = {name: tensor_shape(t) for name, t in tensors.items()}
    arch = architecture_of(metadata, path)
    settings = model_settings(metadata, shapes, path, rope_factors(gguf, tensors))
    try:
        config = ModelConfig(**settings)
    except (TypeError, ValueError) as e:
        raise LLMError(f"{path}: bad model settings in the GGUF metadata: {e}") from None
    for name, t in tensors.items():
        if t.tensor_type.name not in READ_TYPES:
            raise LLMError(f"{path}: tensor {name} has type {t.tensor_type.name}, which is not supported; supported: "
                           f"{', '.join(READ_TYPES)}")
    tokenizer = gguf_tokenizer(metadata, path, config.vocab_size)
    del metadata

    with meta_device():
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_tensors(path, arch, config, expected, shapes)

    file = open(path, "rb", buffering=0)  # (read, not mapped: the pages of a map would stay in our memory)

    def read_raw(gguf_name: str, rows: slice | None = None):
        """A tensor's rows as read_rows gives them, llama.cpp's reordered query and key rows put back in order within
        each head (a row is whole blocks of any type, so rows reorder before dequantizing): whole heads are read."""
        t = tensors[gguf_name]
        heads = rotary_heads(arch, config, gguf_name)
        try:
            data = read_rows(file, t, None if heads else rows)
        except ValueError as e:  # a tensor cut short by a truncated file
            raise LLMError(f"{path}: tensor {gguf_name} is corrupt or truncated: {e}") from None
        return np.ascontiguousarray(unpermute(data, heads)[rows or slice(None)]) if heads else data

    def read_part(gguf_name: str, rows: slice | None = None, out=None):
        return dequantize(gguf, read_raw(gguf_name, rows), tensors[gguf_name].tensor_type, out)

    def read(name: str, rows: slice | None = None, out=None):
        names = gguf_parts(arch, name)
        if len(names) == 1:
            return read_part(names[0], rows, out)
        return read_parts([(shapes[n][0], partial(read_part, n)) for n in names], expected[name], rows, out)

    def read_groups(name: str, scratch: list):
        """Our matrix `name` as int4's groups (StoredGroups) when its parts are all Q4_0 or all Q4_1, else None."""
        names = gguf_parts(arch, name)
        types = {tensors[n].tensor_type for n in names}
        if len(types) > 1 or types.pop().name not in INT4_TYPES:
            return None

        def read_blocks(rows: slice, out):
            pieces = [read_raw(names[i], part) for i, part, _ in split_rows([shapes[n][0] for n in names], rows)]
            data = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            return q4_groups(data, tensors[names[0]].tensor_type, out)

        return StoredGroups(expected[name], read_blocks, scratch)

    with file:
        model = materialize(model, read, quantize, read_groups)
    about = {"format": "gguf", "family": arch, "architecture": arch, "model": settings}
    return model.to(device), tokenizer, about


def read_rows(file, tensor, rows: slice | None = None):
    """The bytes of rows `rows` (all when None) of a GGUF tensor (a gguf.ReaderTensor), read from the open file into
    a new array shaped as the reader's tensor.data[rows]: (rows, bytes a row) for block types. Raises ValueError when
    the file ends early."""
    import numpy as np

    from llmcli.files import read_exactly

    shape = tensor.data.shape
    n_rows = shape[0] if len(shape) > 1 else 1
    start, stop, _ = (rows or slice(None)).indices(n_rows)
    row_bytes = int(tensor.n_bytes) // n_rows
    data = np.empty((stop - start) * row_bytes, dtype=np.uint8)
    if not read_exactly(file, int(tensor.data_offset) + start * row_bytes, memoryview(data)):
        raise ValueError(f"the file ends inside {tensor.name}")
    return data.view(tensor.data.dtype).reshape((stop - start, *shape[1:]) if len(shape) > 1 else shape)


def dequantize(gguf, data, tensor_type, out=None):
    """A GGUF tensor's data (as read_rows gives it) as a float32 torch tensor of its shape, (rows, values a row) or a
    vector, written into `out` when given. F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are computed by torch a few MB at a
    time, several times faster than gguf.quants' numpy (which gives the same values: tests/test_gguf.py); other types
    by gguf.quants."""
    import numpy as np
    import torch

    name = tensor_type.name
    shape = (data.shape[0], -1) if data.ndim > 1 else (-1,)
    raw = torch.from_numpy(data.view(np.uint8).reshape(-1))
    if name in ("Q8_0", "Q4_0", "Q4_1"):
        block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        blocks = raw.view(-1, type_size)
        w = torch.empty(blocks.size(0), block_size) if out is None else out.view(-1, block_size)
        for part in range(0, blocks.size(0), 1 << 15):  # a few MB of temporaries at a time
            b, values = blocks[part:part + (1 << 15)], w[part:part + (1 << 15)]
            if name == "Q8_0":  # value = d * q: d a float16, then 32 int8
                torch.mul(b[:, 2:].contiguous().view(torch.int8), b[:, :2].contiguous().view(torch.float16).float(),
                          out=values)
                continue
            # Q4_1: d, m (float16), 16 bytes of 4-bit q; Q4_0: d, 16 bytes. Low nibbles are values 0-15, high 16-31
            header = 4 if name == "Q4_1" else 2
            scales = b[:, :header].contiguous().view(torch.float16).float()  # (blocks, 2 or 1)
            packed = b[:, header:]
            values[:, :16], values[:, 16:] = packed & 0x0F, packed >> 4
            if name == "Q4_1":  # value = d * q + m
                values.mul_(scales[:, :1]).add_(scales[:, 1:])
            else:  # value = d * (q - 8)
                values.sub_(8).mul_(scales)
    else:
        if name in ("F32", "F16", "BF16"):
            w = raw.view({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name])
        else:
            w = torch.from_numpy(gguf.quants.dequantize(data, tensor_type))
        if out is None:
            w = w.float()  # (F32: the array read, kept)
        else:
            w = out.view_as(w).copy_(w)
    return w.view(shape) if out is None else out


INT4_TYPES = ("Q4_0", "Q4_1")  # blocks of 32 4-bit values with a scale (and an offset): int4's groups as they are


def q4_groups(data, tensor_type, out=None):
    """The Q4_0 or Q4_1 data of rows (as read_rows gives it) as llmcli.model.quantize.int4_groups' (q, scales, zeros)
    of the same values: q int32 (rows, values a row) in 0..15 (written into `out` when given), scales and zeros
    float32 (rows, blocks a row), each value (q - 8) * scale + zero. ggml's blocks (ggml-common.h): Q4_1 is float16 d and m, then 16 bytes of 4-bit q,
    value d * q + m, so scale = d and zero = m + 8 * d; Q4_0 is d then the q, value d * (q - 8), so zero = 0. A
    block's low nibbles are its values 0-15, the high ones 16-31."""
    import numpy as np
    import torch

    header = 4 if tensor_type.name == "Q4_1" else 2
    blocks = torch.from_numpy(data.view(np.uint8)).view(data.shape[0], -1, header + 16)  # (rows, blocks, bytes)
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(2).float()
    packed = blocks[..., header:].contiguous()
    # int32: what torch's int4 packing takes
    q = torch.empty(data.shape[0], packed.size(1) * 32, dtype=torch.int32) if out is None else out
    nibbles = q.view(*packed.shape[:2], 2, 16)
    torch.bitwise_and(packed, 0x0F, out=nibbles[:, :, 0])
    torch.bitwise_right_shift(packed, 4, out=nibbles[:, :, 1])
    if header == 2:
        return q, d, torch.zeros_like(d)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(2).float()
    return q, d, m.add_(d, alpha=8)


def rope_factors(gguf, tensors: dict):
    """The values of the rope_freqs tensor (Llama 3's rope scaling, as llama.cpp stores it), or None."""
    t = tensors.get("rope_freqs.weight")
    if t is None or t.tensor_type.name not in ("F32", "F16"):
        return None
    return gguf.quants.dequantize(t.data, t.tensor_type).ravel().tolist()


def _check_tensors(path: Path, arch: str, config, expected: dict, shapes: dict):
    """Every tensor present with the shape the metadata implies, and none we would silently drop."""
    used = set()
    for name, shape in expected.items():
        rows = part_rows(arch, config, name) or [shape[0]]
        for gguf_name, r in zip(gguf_parts(arch, name), rows):
            if gguf_name not in shapes:
                raise LLMError(f"{path}: weight {gguf_name} is missing")
            if shapes[gguf_name] != (r, *shape[1:]):
                raise LLMError(f"{path}: weight {gguf_name} has shape {list(shapes[gguf_name])}, the metadata implies "
                               f"{[r, *shape[1:]]}")
            used.add(gguf_name)
    unexpected = sorted(set(shapes) - used - {"rope_freqs.weight"})  # rope_freqs: read into the config
    if unexpected:
        raise LLMError(f"{path}: {len(unexpected)} weights that a {arch} model of this shape does not have "
                       f"(first: {unexpected[0]})")


# ---- tokenizer ----

def byte_spelling() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes, in which byte-level BPE vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


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


def build_tokenizer(metadata: dict, path: Path):
    """A tokenizers.Tokenizer from tokenizer.ggml.* metadata, built as transformers' GGUF converters build theirs:
    "gpt2" is byte-level BPE (tokens + merges; tokenizer.ggml.pre picks the split regex), "llama" is SentencePiece
    style BPE (tokens + scores, merges derived from the scores, byte fallback, "▁" for spaces). Tokens of type
    CONTROL and those named beginning, end, unknown or padding become special tokens, USER_DEFINED ones added
    tokens, all matched whole in text."""
    import numpy as np
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise LLMError(f"{path}: the GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    types = np.asarray(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))[:len(tokens)]
    control = [tokens[i] for i in np.flatnonzero(types == CONTROL)]
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
            tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False))
            split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
            if metadata.get("tokenizer.ggml.pre") == "smollm":  # its tokenizer.json: digits one by one, then GPT-2's
                tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                             pre_tokenizers.ByteLevel(add_prefix_space=False)])
            elif split is not None:
                tok.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            else:
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            control = [t for t in control if set(t) <= alphabet]
        elif kind == "llama":
            vocab = dict(zip(tokens, range(len(tokens))))
            scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            tok = Tokenizer(BPE(vocab=vocab, merges=merges or merges_from_scores(tokens, scores), fuse_unk=True,
                                byte_fallback=True, dropout=None))
            # llama.cpp (and SentencePiece) put "▁" before the text unless the file says not to
            prefix_space = metadata.get("tokenizer.ggml.add_space_prefix", True)
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", split=False,
                                                         prepend_scheme="first" if prefix_space else "never")
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
    return HFTokenizer(build_tokenizer(metadata, path), files=[path], bos_id=token_id("bos_token_id"),
                       eos_ids=list(dict.fromkeys(i for i in ends if i is not None)),
                       pad_id=token_id("padding_token_id"), chat_template=template if isinstance(template, str) else None)


def gguf_info(path: Path) -> dict:
    """What `llm info` shows of a .gguf file, from its metadata and tensor headers; nothing is dequantized."""
    from collections import Counter

    from llmcli.config import ModelConfig
    from llmcli.model.transformer import Transformer, meta_device

    reader = open_gguf(path)
    metadata = read_metadata(reader, path)
    shapes = {t.name: tensor_shape(t) for t in reader.tensors}
    try:
        config = ModelConfig(**model_settings(metadata, shapes, path,
                                              rope_factors(_gguf(), {t.name: t for t in reader.tensors})))
    except (TypeError, ValueError) as e:
        raise LLMError(f"{path}: bad model settings in the GGUF metadata: {e}") from None
    with meta_device():
        parameters = Transformer(config).num_params()
    kinds = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"config": config, "architecture": f"{metadata.get('general.architecture')} (GGUF)",
            "parameters": parameters,
            "tokenizer": f"{kinds.get(metadata.get('tokenizer.ggml.model'), metadata.get('tokenizer.ggml.model'))} "
                         f"({len(metadata.get('tokenizer.ggml.tokens') or [])} tokens)",
            "dtype": ", ".join(f"{name} ({n} tensors)" for name, n in types.most_common())}


# ---- writing ----

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
    # what our commands do: texts start with start_of_text, samples end at any of stop_tokens
    start, ends = tokenizer.start_of_text, list(dict.fromkeys([*tokenizer.eos_ids, *tokenizer.stop_tokens]))
    meta |= {"bos_token_id": start, "add_bos_token": start is not None, "eos_token_id": ends[0] if ends else None,
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

    def varint(data, i):
        value = shift = 0
        while True:
            byte = data[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if byte < 0x80:
                return value, i

    def fields(data):  # (field number, value or bytes) of one message
        i = 0
        while i < len(data):
            key, i = varint(data, i)
            kind = key & 7
            if kind == 0:
                value, i = varint(data, i)
            elif kind == 2:
                size, i = varint(data, i)
                value, i = data[i:i + size], i + size
            else:  # 1: 64-bit, 5: 32-bit
                size = 8 if kind == 1 else 4
                value, i = data[i:i + size], i + size
            yield key >> 3, value

    return [next((v for f, v in fields(piece) if f == 3), NORMAL) for f, piece in fields(proto) if f == 1]


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
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    if model.get("type") == "BPE" and '"ByteLevel"' in text:
        pre = next((name for name, split in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT))
                    if json.dumps(split) in text), "smollm" if '"individual_digits": true' in text else "gpt-2")
        return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges}
    if model.get("type") == "BPE" and model.get("byte_fallback") and '"Metaspace"' in text:
        # SentencePiece-style BPE: llama.cpp merges by score, so a token made by merge r scores -r
        rank = {m.replace(" ", ""): -r for r, m in reversed(list(enumerate(merges)))}
        byte = [len(t) == 6 and t.startswith("<0x") and t.endswith(">") for t in tokens]
        types = [BYTE if b else UNKNOWN if t == model.get("unk_token") else k for t, b, k in zip(tokens, byte, types)]
        return {"model": "llama", "tokens": tokens, "scores": [float(rank.get(t, 0)) for t in tokens],
                "token_type": types, "merges": merges,
                "add_space_prefix": '"prepend_scheme": "never"' not in text}
    raise LLMError("only SentencePiece and byte-level BPE tokenizers can be written to GGUF, not this "
                   f"{model.get('type')} tokenizer")


def _encode(gguf, w, type: str):
    """(array, ggml type) of a float32 tensor to store: vectors stay F32 (llama.cpp's converter does the same),
    matrices take the chosen type; Q8_0 needs rows of whole 32-value blocks, else F16."""
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if w.ndim == 1 or type == "f32":
        return w, Q.F32
    if type == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0
    if type == "bf16":
        return gguf.quants.quantize(w, Q.BF16), Q.BF16
    return w.astype(np.float16), Q.F16


def write_gguf(model, tokenizer, out: Path, type: str = "f16") -> Path:
    """Write a language model as one .gguf file that llama.cpp and transformers open: our default parts as GGUF's
    gpt2, Llama's parts as llama (qwen2 with q/k/v biases only), matrices in `type` (WRITE_TYPES), the tokenizer and
    its chat template in the metadata. Raises LLMError for parts no GGUF architecture has or an unknown type."""
    import os
    import tempfile

    import numpy as np
    import torch

    from llmcli.files import file_mode, make_output_dir, os_error_reason
    from llmcli.formats.hf import export_family

    gguf = _gguf()
    if type not in WRITE_TYPES:
        raise LLMError(f"unknown GGUF tensor type {type!r}; choose one of {', '.join(WRITE_TYPES)}")
    c = model.config
    arch = export_family(c)
    tokens = tokenizer_metadata(tokenizer)
    if len(tokens["tokens"]) != c.vocab_size:  # GGUF readers take the vocabulary's size from the tokenizer
        extra = c.vocab_size - len(tokens["tokens"])
        if extra < 0:
            raise LLMError(f"the tokenizer has {len(tokens['tokens'])} tokens but the model only {c.vocab_size}")
        tokens["tokens"] += [f"[PAD{i}]" for i in range(len(tokens["tokens"]), c.vocab_size)]
        tokens["token_type"] += [UNUSED] * extra
        if "scores" in tokens:
            tokens["scores"] += [-1e9] * extra

    def write(tmp: Path):
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(out.stem)
        writer.add_context_length(c.context)
        writer.add_embedding_length(c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_feed_forward_length(c.hidden_size)
        writer.add_head_count(c.n_head)
        writer.add_vocab_size(c.vocab_size)
        if arch == "gpt2":
            writer.add_layer_norm_eps(c.norm_eps)
        else:
            writer.add_head_count_kv(c.kv_heads)
            writer.add_layer_norm_rms_eps(c.norm_eps)
            writer.add_rope_freq_base(c.rope_theta)
            writer.add_rope_dimension_count(c.head_dim)
            if c.rope_type == "llama3":  # as llama.cpp's converter: the factors as a tensor, no scaling keys
                writer.add_tensor("rope_freqs.weight", np.array(llama3_factors(c), dtype=np.float32))
            elif c.rope_scaling != 1.0:
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(c.rope_scaling)
        file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
        writer.add_file_type(gguf.LlamaFileType[file_types[type]])
        writer.add_tokenizer_model(tokens["model"])
        writer.add_tokenizer_pre(tokens.get("pre", "default"))
        writer.add_token_list(tokens["tokens"])
        writer.add_token_types(tokens["token_type"])
        if "scores" in tokens:
            writer.add_token_scores(tokens["scores"])
        if tokens.get("merges"):
            writer.add_token_merges(tokens["merges"])
        if "add_space_prefix" in tokens:
            writer.add_add_space_prefix(tokens["add_space_prefix"])
        writer.add_add_bos_token(tokens["add_bos_token"])
        for key in ("bos_token_id", "eos_token_id", "eot_token_id", "padding_token_id"):
            if key in tokens:
                getattr(writer, {"padding_token_id": "add_pad_token_id"}.get(key, f"add_{key}"))(tokens[key])
        if "chat_template" in tokens:
            writer.add_chat_template(tokens["chat_template"])
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                rows = part_rows(arch, c, name) or [tensor.size(0)]
                for gguf_name, part in zip(gguf_parts(arch, name), tensor.float().split(rows)):
                    w = np.ascontiguousarray(part.numpy())
                    if heads := rotary_heads(arch, c, gguf_name):
                        w = np.ascontiguousarray(permute(w, heads))
                    data, ggml_type = _encode(gguf, w, type)
                    writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    # written whole to a temporary file beside out, then renamed: out is never half a file
    make_output_dir(out.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise LLMError(f"could not write {out}: {os_error_reason(e)}") from None
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, out)
    except OSError as e:
        raise LLMError(f"could not write {out}: {os_error_reason(e)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
