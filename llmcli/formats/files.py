"""Writing files safely and reading safetensors headers: the ground floor of every format."""

import json
import os
from pathlib import Path

from llmcli.errors import LLMError


def atomic_write(path: Path, write):
    """Call write(tmp_path), then rename tmp_path over path: readers see the old file or the new one, never half.

    Raises LLMError (naming the file and the OS's reason) when it cannot be written; the previous file is intact.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LLMError(f"could not write {path}: {e.strerror or e}; the previous version is intact") from None


def read_header(file) -> dict:
    """The JSON header of an open .safetensors file: a little-endian u64 length, then per tensor its dtype, shape and
    byte offsets in the data that follows (`__metadata__` aside). Format: github.com/huggingface/safetensors."""
    return json.loads(file.read(int.from_bytes(file.read(8), "little")))


def read_safetensors(path: Path) -> dict:
    """The tensors of a .safetensors file as float32 arrays; read by hand because NumPy has no bfloat16, which the
    default checkpoint is stored in. Raises ValueError on anything else."""
    import numpy as np

    with open(path, "rb") as f:
        header = read_header(f)
        body = memoryview(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
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
