"""Checkpoints: a directory with model.safetensors, config.yaml and tokenizer.model, written atomically.

Every file is written to a temporary name and renamed into place, so a run killed at any moment leaves the previous
version of each file whole. Loading checks that the pieces agree before building anything.
"""

import os
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


def atomic_write(path: Path, write):
    """Call write(tmp_path), then rename tmp_path over path: readers see the old file or the new one, never half."""
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


def write_config(directory: Path, config: dict):
    text = yaml.safe_dump({"format": FORMAT, **config}, sort_keys=False)
    atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_model(directory: Path, model, metadata: dict | None = None, dtype=None):
    """Weights to directory/model.safetensors (optionally cast, e.g. to bfloat16 to halve the size)."""
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in model.state_dict().items()}
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(directory / MODEL_FILE, lambda tmp: save_file(state, str(tmp), metadata=metadata))


# safetensors' dtype names -> torch's (https://github.com/huggingface/safetensors, "Format")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class SafetensorsReader:
    """The tensors of a .safetensors file, each read with one read() into memory that becomes its final storage.

    The file is 8 bytes (little-endian length of the header), a JSON header {name: {"dtype", "shape",
    "data_offsets": [begin, end]}} and the data. safetensors' own safe_open maps the file and copies each tensor out
    of the mapping, so while a model loads its pages count twice in the process's memory; reading instead keeps
    only the copy that is used. Raises LLMError for a file that does not follow the format.
    """

    def __init__(self, path: Path):
        import json
        import struct

        self.path = Path(path)
        try:
            self.file = open(self.path, "rb", buffering=0)
            size = self.path.stat().st_size
            (length,) = struct.unpack("<Q", self.file.read(8))
            if not 2 <= length <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(self.file.read(length))
            self.data_start = 8 + length
            header.pop("__metadata__", None)
            self.entries = {name: (SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), *e["data_offsets"])
                            for name, e in header.items()}
            if any(self.data_start + end > size for _, _, _, end in self.entries.values()):
                raise ValueError("a tensor runs past the end of the file")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise LLMError(f"{self.path} is corrupt: {e}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple:
        return self.entries[name][1]

    def read(self, name: str, out=None):
        """Tensor `name` as float32 (the file's values converted), written into `out` when given (a contiguous
        float32 tensor of its shape, e.g. rows of a larger tensor), else into a new tensor."""
        import torch

        dtype, shape, begin, end = self.entries[name]
        dtype = getattr(torch, dtype)
        target = out if out is not None else torch.empty(shape, dtype=torch.float32)
        if tuple(target.shape) != shape or not target.is_contiguous():
            raise ValueError(f"{name}: cannot read {list(shape)} into {list(target.shape)}")
        direct = dtype == torch.float32
        raw = target if direct else torch.empty(shape, dtype=dtype)
        view = memoryview(raw.reshape(-1).view(torch.uint8).numpy()).cast("B") if raw.numel() else memoryview(b"")
        if len(view) != end - begin:
            raise LLMError(f"{self.path} is corrupt: {name} has {end - begin} bytes for shape {list(shape)}")
        self.file.seek(self.data_start + begin)
        done = 0
        while done < len(view):  # a raw read may return less than asked
            n = self.file.readinto(view[done:])
            if not n:
                raise LLMError(f"{self.path} is corrupt: it ends inside {name}")
            done += n
        if not direct:
            target.copy_(raw)
        return target


def model_from_weights(model, read, quantize: str | None = None):
    """The model, built on the meta device (llmcli.model.meta_device), in eval mode with every weight from
    read(name): a float32 tensor of our layout that becomes the parameter's storage, so nothing is copied twice.

    quantize ("int8", "int4"): the token embedding and each linear layer the kernel takes are quantized as they are
    read, so the float32 model never exists whole (llmcli/quantize.py).
    """
    import torch.nn as nn

    if quantize is not None:
        from llmcli.quantize import quantizable, quantize_embedding, quantized_linear

        return_freed_memory()

        quantize_embedding(model, quantize, read("token_embedding.weight"))  # first: the largest temporary
        for prefix, module in list(model.named_modules()):
            for name, child in list(module.named_children()):
                if quantizable(child, quantize) and child.weight.is_meta:
                    path = f"{prefix}.{name}" if prefix else name
                    bias = read(f"{path}.bias") if child.bias is not None else None
                    setattr(module, name, quantized_linear(read(f"{path}.weight"), bias, quantize))
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name)._parameters[attr] = nn.Parameter(read(name))
    assert not any(b.is_meta for b in model.buffers())  # (the fixed tables are computed on the CPU)
    return model.eval()


def return_freed_memory():
    """Make glibc's malloc give every block of 1 MB or more back to the system when it is freed (mmap), for good.

    By default it raises that threshold after each such free (up to 32 MB), after which the float32 matrices that
    quantizing reads and drops one by one come from its heap and their memory stays with the process: the peak RSS
    of loading SmolLM2-135M as int8 was 750 MB against 420 MB with this. (Inference only: a training step that
    allocates large temporaries would pay a page fault for each page of each one, every step.)
    """
    import ctypes
    import sys

    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc
            pass


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
        from llmcli.quantize import check_mode

        check_mode(quantize)
        if device != "cpu":
            raise LLMError(f"--quantize {quantize} runs on the CPU only")
    from llmcli.config import ModelConfig

    directory = Path(path) if path is not None else default_model_path()
    if not directory.exists():
        raise LLMError(f"checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise LLMError(f"{directory} is not a checkpoint directory")
    from llmcli.hf import is_hf_folder, load_hf_folder

    if is_hf_folder(directory):
        return load_hf_folder(directory, device, quantize)
    config = read_config(directory)
    if "adapter" in config:  # LoRA weights alone: they name their base
        from llmcli.lora import load_adapter

        model, tokenizer, config = load_adapter(directory, config, device)
        if quantize is not None:  # merged into its base first
            from llmcli.quantize import quantize as quantize_model

            model = quantize_model(model, quantize)
        return model, tokenizer, config
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
    if numpy_if_small and device == "cpu" and quantize is None:
        from llmcli.numpy_model import load_small_checkpoint

        model = load_small_checkpoint(directory, config)
        if model is not None:
            return model, tokenizer, config

    from llmcli.model import Transformer, meta_device

    model_class, extra = Transformer, {}
    if config.get("task") == "classify":  # a classifier: the Transformer with a head over its labels
        from llmcli.classify import Classifier

        model_class, extra = Classifier, {"n_labels": len(config["labels"])}
    with meta_device():
        model = model_class(model_config, **extra)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with SafetensorsReader(directory / MODEL_FILE) as f:
        found = {k: f.shape(k) for k in f.keys()}
        if found != expected:
            raise LLMError(f"checkpoint {directory}: {_describe_mismatch(expected, found)}; "
                           f"{MODEL_FILE} does not match {CONFIG_FILE}")
        model = model_from_weights(model, f.read, quantize)
    return model.to(device), tokenizer, config


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
    from safetensors import SafetensorError, safe_open

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
    dtypes = set()
    try:
        for file in weight_paths:
            with safe_open(file, framework="pt") as f:
                dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LLMError(f"a weights file in {directory} is corrupt: {e}") from None
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
