"""Writing files safely and reading safetensors headers: the ground floor under every format.

What we write follows one mode policy: files 0666 and directories 0777 less the umask (0644 and 0755 with the usual
umask 022), set on the descriptor as it is created, so that another user of a shared file system can read a run.
"""

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

from llmcli.errors import LLMError


def file_mode(directory: bool = False) -> int:
    """The mode of what we create: 0666 (files) or 0777 (directories) less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(path: Path, content: bytes | str):
    """Write content to path through a temporary file in the same directory, renamed over path: readers see the old
    file or the new one, never half. The temporary name is unpredictable and created exclusively (mkstemp), so a
    symlink planted in the directory is never followed; rename replaces a link at path itself, not its target."""
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    existed = path.exists()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise LLMError(f"could not write {path}: {os_error_reason(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise LLMError(f"could not write {path}: {os_error_reason(e)}"
                       + ("; the previous version is intact" if existed else "")) from None


def os_error_reason(e: OSError) -> str:
    import errno

    return "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)


def make_output_dir(path: Path, exist_ok: bool = True) -> Path:
    """Create the directory a command writes to (and its parents), or say in one line why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=exist_ok, mode=file_mode(directory=True) | 0o700)
    except FileExistsError:
        raise LLMError(f"{path} already exists; choose a new directory") from None
    except OSError as e:
        raise LLMError(f"cannot create the output directory {path}: {os_error_reason(e)}") from None
    if not path.is_dir():
        raise LLMError(f"{path} exists and is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise LLMError(f"cannot write to the output directory {path}: "
                       + ("read-only file system" if _read_only(path) else "permission denied"))
    return path


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


MAX_HEADER_BYTES = 100_000_000  # as the safetensors library allows


def safetensors_header(path: Path) -> dict[str, dict]:
    """The header of a .safetensors file, checked: {tensor name: {"dtype", "shape", "data_offsets"}} (the
    `__metadata__` entry left out). The format: a little-endian u64 header length, that many bytes of JSON, then the
    tensors' bytes (https://github.com/huggingface/safetensors). Raises LLMError naming the file when it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"its header length ({length} bytes) does not fit the file ({size} bytes)")
            header = json.loads(f.read(length))
    except OSError as e:
        raise LLMError(f"cannot read {path}: {os_error_reason(e)}") from None
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting deeper than Python's stack
        message = "its header is nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise LLMError(f"{path} is corrupt: {message}") from None
    if not isinstance(header, dict):
        raise LLMError(f"{path} is corrupt: its header is a JSON {type(header).__name__}, not an object")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
              and all(isinstance(n, int) and n >= 0 for n in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(n, int) and 0 <= n <= size for n in info["data_offsets"])
              and info["data_offsets"][0] <= info["data_offsets"][1])
        if not ok:
            raise LLMError(f"{path} is corrupt: the header's entry for {str(name)[:80]!r} is not a tensor's "
                           "dtype, shape and data offsets")
        tensors[name] = info
    return tensors


def read_safetensors(path: Path) -> dict:
    """The tensors of a .safetensors file as float32 arrays; read by hand because NumPy has no bfloat16, which the
    default checkpoint is stored in. Raises ValueError on anything else."""
    import numpy as np

    header = safetensors_header(path)
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        body = memoryview(f.read())
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        raw, dtype = body[start:end], info["dtype"]
        if dtype == "BF16":  # the upper half of a float32
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype in ("F16", "F32"):
            array = np.frombuffer(raw, np.float16 if dtype == "F16" else np.float32).astype(np.float32)
        else:
            raise ValueError(f"{name}: dtype {dtype}")
        tensors[name] = array.reshape(info["shape"])
    return tensors


def read_exactly(file, offset: int, view: memoryview) -> bool:
    """Fill view with the bytes of an unbuffered file from offset on; False when the file ends first (a raw read may
    return less than asked, so it reads until the view is full)."""
    file.seek(offset)
    done = 0
    while done < len(view):
        n = file.readinto(view[done:])
        if not n:
            return False
        done += n
    return True


# safetensors' dtype names -> torch's (https://github.com/huggingface/safetensors, "Format")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class SafetensorsFile:
    """The tensors of one .safetensors file as float32 torch tensors, each read when asked for and copied at most once.

    `tensor(name)` of a float32 matrix is a copy-on-write map of its pages of the file (as llama.cpp maps its files):
    no copy, writing to it (training) leaves the file as it is, and the pages leave the process's memory when the
    tensor is freed (each matrix maps its own pages, so that a model that replaces a matrix by another copy, as
    decoding's transposed layout does, holds no stale pages). `read(name, rows)` reads rows of a tensor with one read()
    into the memory that keeps them (converted to float32 when stored otherwise): the parts of a fused matrix, and a
    block of rows at a time for quantizing. safetensors' own safe_open copies each tensor out of a map of the whole
    file, so the weights passed through memory twice and the map's pages stayed. Raises LLMError naming the file when
    it is corrupt. (A file rewritten in place while a model maps it would crash the process; ours are renamed into
    place.)
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header = safetensors_header(self.path)  # checked
        try:
            self.file = open(self.path, "rb", buffering=0)
            size = os.fstat(self.file.fileno()).st_size
            self.data_start = 8 + int.from_bytes(self.file.read(8), "little")
        except OSError as e:
            raise LLMError(f"cannot read {self.path}: {os_error_reason(e)}") from None
        for name, info in self.header.items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise LLMError(f"{self.path}: tensor {name} has dtype {info['dtype']}, which is not supported")
            begin, end = info["data_offsets"]
            if end - begin != self._row_bytes(name) * (info["shape"] or [1])[0] or self.data_start + end > size:
                raise LLMError(f"{self.path} is corrupt: tensor {name} has {end - begin} bytes at offset {begin}, "
                               f"which do not hold {info['dtype']} of shape {info['shape']} inside the file")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()  # (the maps stay while tensors use them)

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def _dtype(self, name: str):
        import torch

        return getattr(torch, SAFETENSORS_DTYPES[self.header[name]["dtype"]])

    def _row_bytes(self, name: str) -> int:
        itemsize = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(
            self.header[name]["dtype"], 1)
        return math.prod(self.header[name]["shape"][1:]) * itemsize

    def tensor(self, name: str):
        """The whole tensor as float32: a matrix stored as float32 is its pages of the file, mapped; anything else is
        read (a vector's copy is small)."""
        import mmap

        import torch

        begin, end = (self.data_start + offset for offset in self.header[name]["data_offsets"])
        if self._dtype(name) != torch.float32 or begin % 4 or len(self.shape(name)) < 2 or begin == end:
            return self.read(name)
        # a map of the tensor's own pages: one map of the whole file would count the pages of its neighbours too
        # (the kernel maps the whole large folio around a page that is touched) and keep them all while any is used
        start = begin - begin % mmap.ALLOCATIONGRANULARITY  # (a map starts at a page)
        try:
            pages = mmap.mmap(self.file.fileno(), end - start, offset=start, access=mmap.ACCESS_COPY)
        except OSError:  # (each map holds a file descriptor: out of them, the tensor is read instead)
            return self.read(name)
        # the tensor keeps the map open; it is unmapped when the tensor is freed
        return torch.frombuffer(pages, dtype=torch.float32, count=(end - begin) // 4, offset=begin - start).view(
            self.shape(name))

    def read(self, name: str, rows: slice | None = None, out=None):
        """Rows `rows` (of the first dimension; all when None) of the tensor as float32, read into `out` when given (a
        contiguous float32 tensor of that shape, e.g. rows of a larger tensor), else into a new tensor."""
        import torch

        shape = self.shape(name)
        start, stop, _ = (rows or slice(None)).indices(shape[0] if shape else 1)
        shape = (stop - start, *shape[1:]) if shape else ()
        target = out if out is not None else torch.empty(shape, dtype=torch.float32)
        if tuple(target.shape) != shape or target.dtype != torch.float32 or not target.is_contiguous():
            raise ValueError(f"{name}: cannot read {list(shape)} into {list(target.shape)}")
        dtype = self._dtype(name)
        raw = target if dtype == torch.float32 else torch.empty(shape, dtype=dtype)
        view = memoryview(raw.view(torch.uint8).numpy()).cast("B") if raw.numel() else memoryview(b"")
        try:
            offset = self.data_start + self.header[name]["data_offsets"][0] + start * self._row_bytes(name)
            if not read_exactly(self.file, offset, view):
                raise LLMError(f"{self.path} is corrupt: it ends inside {name}")
        except OSError as e:
            raise LLMError(f"cannot read {self.path}: {os_error_reason(e)}") from None
        if raw is not target:
            target.copy_(raw)
        return target
