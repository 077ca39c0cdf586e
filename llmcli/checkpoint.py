"""Checkpoints: a directory with model.safetensors, config.yaml and tokenizer.model, written atomically.

Every file is written to a temporary name and renamed into place, so a run killed at any moment leaves the previous
version of each file whole. Loading checks that the pieces agree before building anything.

What we write follows one mode policy: files 0666 and directories 0777 less the umask (0644 and 0755 with the usual
umask 022), set on the descriptor as it is created, so that another user of a shared file system can read a run.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path

import yaml

from llmcli.errors import LLMError
from llmcli.tokenizer import TOKENIZER_FILE, Tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
FORMAT = "llmcli-checkpoint/1"
# The shipped default model: used when a command gets no --model. LLM_MODEL overrides it.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "tinystories"


def default_model_path() -> Path:
    return Path(os.environ.get("LLM_MODEL", DEFAULT_MODEL))


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


def write_config(directory: Path, config: dict):
    atomic_write(directory / CONFIG_FILE, yaml.safe_dump({"format": FORMAT, **config}, sort_keys=False))


def save_model(directory: Path, model, metadata: dict | None = None, dtype=None):
    """Weights to directory/model.safetensors (optionally cast, e.g. to bfloat16 to halve the size)."""
    from safetensors.torch import save

    state = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in model.state_dict().items()}
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(directory / MODEL_FILE, save(state, metadata=metadata))


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise LLMError(f"{directory} is not a checkpoint: it has no {CONFIG_FILE} (nor a Hugging Face config.json)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LLMError(f"{path} is corrupt: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise LLMError(f"{path} is corrupt: it has no 'model' section")
    return config


def load_checkpoint(path: str | Path | None = None, device: str = "cpu", numpy_if_small: bool = False,
                    quantize: str | None = None):
    """(model in eval mode, tokenizer, config dict) from a checkpoint directory; the shipped default when None.

    numpy_if_small: a small plain language model comes as a NumpyTransformer (llmcli/numpy_model.py), which decodes
    without importing torch; anything else as the torch model. quantize: "int8" stores the torch model's weights as
    int8 for faster decoding (llmcli/quantize.py).
    """
    if quantize is not None:
        from llmcli.quantize import check_mode, quantize as quantize_model

        check_mode(quantize)
        model, tokenizer, config = load_checkpoint(path, device)
        return quantize_model(model, quantize), tokenizer, config
    from llmcli.config import ModelConfig

    directory = Path(path) if path is not None else default_model_path()
    if not directory.exists():
        raise LLMError(f"checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise LLMError(f"{directory} is not a checkpoint directory")
    from llmcli.hf import is_hf_folder, load_hf_folder

    if is_hf_folder(directory):
        return load_hf_folder(directory, device)
    config = read_config(directory)
    if "adapter" in config:  # LoRA weights alone: they name their base
        from llmcli.lora import load_adapter

        return load_adapter(directory, config, device)
    for name in (MODEL_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise LLMError(f"checkpoint {directory} is incomplete: {name} is missing")
    try:
        model_config = ModelConfig(**config["model"])
    except (TypeError, ValueError) as e:
        raise LLMError(f"{directory / CONFIG_FILE}: bad model settings: {e}") from None
    tokenizer = Tokenizer(directory / TOKENIZER_FILE)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise LLMError(f"checkpoint {directory}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                       f"{model_config.vocab_size}; the files come from different runs")
    if numpy_if_small and device == "cpu":
        from llmcli.numpy_model import load_small_checkpoint

        model = load_small_checkpoint(directory, config)
        if model is not None:
            return model, tokenizer, config

    from safetensors import SafetensorError, safe_open

    from llmcli.model import Transformer, meta_device

    model_class, extra = Transformer, {}
    if config.get("task") == "classify":  # a classifier: the Transformer with a head over its labels
        from llmcli.classify import Classifier

        model_class, extra = Classifier, {"n_labels": len(config["labels"])}
    with meta_device():
        expected = {k: tuple(v.shape) for k, v in model_class(model_config, **extra).state_dict().items()}
    found = {k: tuple(v["shape"]) for k, v in safetensors_header(directory / MODEL_FILE).items()}
    if found == expected:
        try:
            with safe_open(directory / MODEL_FILE, framework="pt") as f:
                state = {k: f.get_tensor(k).float() for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise LLMError(f"{directory / MODEL_FILE} is corrupt: {e}") from None
    else:
        raise LLMError(f"checkpoint {directory}: {_describe_mismatch(expected, found)}; "
                       f"{MODEL_FILE} does not match {CONFIG_FILE}")
    model = model_class.empty(model_config, **extra)
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer, config


def _describe_mismatch(expected: dict, found: dict) -> str:
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"{len(missing)} tensors missing (first: {missing[0]})"
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        return f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})"
    name = next(k for k in expected if expected[k] != found[k])
    return f"tensor {name} has shape {list(found[name])}, the config implies {list(expected[name])}"


def checkpoint_info(path: str | Path | None = None) -> dict:
    """What a checkpoint (ours or a Hugging Face folder) holds, read from its headers without loading the weights."""
    from llmcli.hf import is_hf_folder, model_settings_from_hf, read_hf_config, weight_files
    from llmcli.model import ModelConfig, Transformer, meta_device
    from llmcli.tokenizer import load_tokenizer

    directory = Path(path) if path is not None else default_model_path()
    if not directory.is_dir():
        raise LLMError(f"checkpoint {directory} does not exist" if not directory.exists()
                       else f"{directory} is not a checkpoint directory")
    if is_hf_folder(directory):
        hf = read_hf_config(directory)
        family, settings = model_settings_from_hf(hf, directory)
        architecture, weight_paths = (hf.get("architectures") or [family])[0], set(weight_files(directory).values())
        task, labels = "language model", []
    else:
        ours = read_config(directory)
        settings, architecture = ours["model"], "llmcli Transformer"
        weight_paths = {directory / MODEL_FILE}
        labels = (ours.get("labels") or []) if ours.get("task") == "classify" else []
        task = f"classifier ({', '.join(map(str, labels))})" if labels else "language model"
        if "adapter" in ours:
            adapter = ours["adapter"]
            task = (f"LoRA adapter (rank {adapter.get('rank')} on {', '.join(adapter.get('targets') or [])}) for "
                    f"{adapter.get('base')}, a {task}")
    try:
        config = ModelConfig(**settings)
    except (TypeError, ValueError) as e:
        raise LLMError(f"{directory}: bad model settings: {e}") from None
    with meta_device():
        parameters = Transformer(config).num_params() + (config.n_embd + 1) * len(labels)  # + a classifier's head
    dtypes = {info["dtype"] for file in weight_paths for info in safetensors_header(file).values()}
    tokenizer = load_tokenizer(directory)
    attention = ("multi-head" if config.kv_heads == config.n_head else "multi-query" if config.kv_heads == 1
                 else f"grouped-query ({config.kv_heads} key/value heads)")
    return {
        "path": str(directory),
        "architecture": architecture,
        "task": task,
        "parts": f"{config.norm}, {config.positions} positions, {config.mlp} MLP, {attention} attention, "
                 f"{'tied' if config.tie_embeddings else 'untied'} output head",
        "parameters": parameters,
        "layers": config.n_layer,
        "heads": config.n_head,
        "width": config.n_embd,
        "context": config.context,
        "vocab_size": config.vocab_size,
        "tokenizer": f"{'SentencePiece' if isinstance(tokenizer, Tokenizer) else 'byte-level BPE'} "
                     f"({tokenizer.vocab_size} tokens)",
        "dtype": ", ".join(sorted(dtypes)),
        "size_bytes": sum(f.stat().st_size for f in directory.iterdir() if f.is_file()),
    }
