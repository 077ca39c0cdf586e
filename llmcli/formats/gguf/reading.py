"""Reading GGUF files: the metadata, the tensors (dequantized, or as int4 groups) and the model they make.

Read with the `gguf` package, llama.cpp's own Python library; its reader is subclassed for speed on large
vocabularies (open_gguf), which reaches into its private methods: pyproject.toml pins the version that was tested
(tests/test_gguf.py reads every field back as the plain reader does).
"""

from functools import partial
from pathlib import Path

from llmcli.errors import LLMError
from llmcli.formats.gguf.layout import (architecture_of, gguf_parts, model_settings, part_rows, rotary_heads,
                                        unpermute)
from llmcli.formats.gguf.tokenizer import gguf_tokenizer


# Tensor types we read (dequantized by gguf.quants or dequantize)
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


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
    from struct import error as StructError

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LLMError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise LLMError(f"{path} is not a GGUF file: it does not start with the bytes GGUF")
    try:
        return _reader_class()(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            import re

            number = re.search(r"(\d+)\)? is not a valid", str(e))  # "np.uint32(99) is not a valid ..."
            raise LLMError(f"{path}: unknown tensor type {number.group(1) if number else '?'} (not a ggml type this "
                           "gguf library knows)") from None
        raise LLMError(f"{path} is truncated or corrupt: {e}") from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError, StructError) as e:
        raise LLMError(f"{path} is truncated or corrupt: {e}") from None


def _reader_class():
    """gguf.GGUFReader made faster on large vocabularies (it overrides private methods: pyproject.toml pins gguf)."""
    from struct import Struct

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

    return Reader


def read_metadata(reader, path: Path) -> dict:
    """The key/value metadata: numbers, strings and lists as Python values."""
    try:
        return {name: reader.value(field) for name, field in reader.fields.items()}
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise LLMError(f"{path}: corrupt GGUF metadata: {e}") from None


def tensor_shape(tensor) -> tuple[int, ...]:
    """A tensor's shape in PyTorch's order: GGUF lists dimensions innermost first."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


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
    if _copied_output(tensors):  # a gpt2 file's output.weight that repeats the embedding: tied again
        del tensors["output.weight"], shapes["output.weight"]
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


def _copied_output(tensors: dict) -> bool:
    """Whether output.weight holds the very bytes of token_embd.weight (llama.cpp's converter and our export write
    such a copy for tied GPT-2 models)."""
    import numpy as np

    out, embedding = tensors.get("output.weight"), tensors.get("token_embd.weight")
    return (out is not None and embedding is not None and out.tensor_type == embedding.tensor_type
            and out.data.shape == embedding.data.shape and np.array_equal(out.data, embedding.data))


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


def gguf_info(path: Path) -> dict:
    """What `llm info` shows of a .gguf file, from its metadata and tensor headers; nothing is dequantized."""
    from collections import Counter

    from llmcli.config import ModelConfig
    from llmcli.model.transformer import Transformer, meta_device

    reader = open_gguf(path)
    metadata = read_metadata(reader, path)
    shapes = {t.name: tensor_shape(t) for t in reader.tensors}
    if _copied_output({t.name: t for t in reader.tensors}):
        del shapes["output.weight"]
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
