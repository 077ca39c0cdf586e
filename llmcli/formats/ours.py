"""Our checkpoint format: a directory with model.safetensors, config.yaml and tokenizer.model, written atomically.

Every file is written to a temporary name and renamed into place, so a run killed at any moment leaves the previous
version of each file whole. Loading checks that the pieces agree before building anything. A config.yaml with an
`adapter` section is a LoRA adapter instead (llmcli/formats/adapter.py).
"""

from pathlib import Path

import yaml

from llmcli.errors import LLMError
from llmcli.files import atomic_write, safetensors_header
from llmcli.text.tokenizer import SPECIALS_FILE, TOKENIZER_FILE, load_tokenizer, tokenizer_files

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
FORMAT = "llmcli-checkpoint/1"

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


def load_ours(directory: Path, config: dict, device: str = "cpu", numpy_if_small: bool = False,
              quantize: str | None = None):
    """(model in eval mode, tokenizer, config) from one of our checkpoint directories, whose config.yaml is config.

    numpy_if_small: a small plain language model comes as a NumpyTransformer (llmcli/model/numpy_model.py), which
    decodes without importing torch. quantize: as load_model's, each matrix quantized as it is read. Raises LLMError
    when the files are missing, corrupt or disagree.
    """
    from llmcli.config import ModelConfig

    if not (directory / MODEL_FILE).is_file():
        raise LLMError(f"checkpoint {directory} is incomplete: {MODEL_FILE} is missing")
    if not any(f.name != SPECIALS_FILE for f in tokenizer_files(directory)):  # (the special tokens alone)
        raise LLMError(f"checkpoint {directory} is incomplete: {TOKENIZER_FILE} is missing")
    try:
        model_config = ModelConfig(**config["model"])
    except (TypeError, ValueError) as e:
        raise LLMError(f"{directory / CONFIG_FILE}: bad model settings: {e}") from None
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > model_config.vocab_size:  # (fewer is fine: embeddings padded to a round size)
        raise LLMError(f"checkpoint {directory}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                       f"{model_config.vocab_size} embeddings; the files come from different runs")
    if numpy_if_small and device == "cpu" and quantize is None:
        model = _load_small(directory, config)
        if model is not None:
            return model, tokenizer, config

    from llmcli.files import SafetensorsFile
    from llmcli.model.quantize import materialize
    from llmcli.model.transformer import Transformer, meta_device

    model_class, extra = Transformer, {}
    if config.get("task") == "classify":  # a classifier: the Transformer with a head over its labels
        from llmcli.model.heads import Classifier

        model_class, extra = Classifier, {"n_labels": len(config["labels"])}
    with meta_device():
        model = model_class(model_config, **extra)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with SafetensorsFile(directory / MODEL_FILE) as f:
        found = {k: f.shape(k) for k in f.keys()}
        if found != expected:
            raise LLMError(f"checkpoint {directory}: {_describe_mismatch(expected, found)}; "
                           f"{MODEL_FILE} does not match {CONFIG_FILE}")
        model = materialize(model, lambda name, rows=None, out=None: f.tensor(name) if rows is None and out is None
                            else f.read(name, rows, out), quantize)
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


def _load_small(directory: Path, config: dict):
    """The checkpoint's model as a NumpyTransformer if it is a plain language model of at most SMALL_MODEL
    parameters whose tensors are all there; None otherwise (the torch loader then loads it, or says what is wrong)."""
    import math

    from llmcli.config import ModelConfig
    from llmcli.files import read_safetensors
    from llmcli.model.numpy_model import NumpyTransformer, tensor_shapes
    from llmcli.runtime import SMALL_MODEL

    path = directory / MODEL_FILE
    try:
        model_config = ModelConfig(**config["model"])
        header = safetensors_header(path)  # shapes from the header first: a large model is not read at all
        shapes = {name: tuple(info["shape"]) for name, info in header.items()}
        if config.get("task") or shapes != tensor_shapes(model_config):
            return None
        if sum(math.prod(shape) for shape in shapes.values()) > SMALL_MODEL:
            return None
        return NumpyTransformer(model_config, read_safetensors(path))
    except (TypeError, ValueError, KeyError, OSError):
        return None
