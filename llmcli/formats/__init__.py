"""Model formats: what a path is, and the module that reads (and writes) it.

`load_model` is the one entry point for every command that takes `-m`: our checkpoint directories
(llmcli/formats/ours.py), LoRA adapters on any base (adapter.py), Hugging Face folders (hf.py) and .gguf files
(gguf/), each also by Hugging Face Hub id (hub.py: ORG/NAME, ORG/NAME:FILE.gguf, ORG/NAME:Q4_K_M). Each format
module reads its files into our Transformer (llmcli/model/) and a tokenizer (llmcli/text/); nothing here trains or
decodes.
"""

import os
from pathlib import Path

from llmcli.errors import LLMError
from llmcli.formats.hub import is_hub_id

# The shipped default model, package data (so every kind of install has it): used when a command gets no --model.
# LLM_MODEL overrides it.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "tinystories"


def default_model_path() -> Path:
    return Path(os.environ.get("LLM_MODEL", DEFAULT_MODEL))


def resolve_model(path: str | Path | None) -> Path:
    """The local path of a model: path itself when it exists, else the files of a Hugging Face Hub id
    (llmcli/formats/hub.py: from the cache, or downloaded); the default model ($LLM_MODEL, else the shipped one) for
    None. A path that is neither is returned as it is, for the loader to say it is missing."""
    path = Path(path) if path is not None else default_model_path()
    if path.exists() or not is_hub_id(str(path)):
        return path
    from llmcli.formats import hub

    return hub.resolve(str(path))


def available_models() -> list[dict]:
    """What -m can take on this machine without naming a path: the shipped model, $LLM_MODEL when set, and the
    models in the Hugging Face cache; each {model, format, size_bytes, path}."""
    from llmcli.formats import hub

    found = [{"model": str(DEFAULT_MODEL), "format": "llmcli checkpoint (the shipped model)",
              "size_bytes": _size_on_disk(DEFAULT_MODEL), "path": str(DEFAULT_MODEL)}]
    if os.environ.get("LLM_MODEL"):
        chosen = os.environ["LLM_MODEL"]
        local = Path(chosen).exists()
        found.append({"model": chosen, "format": "$LLM_MODEL, the default" + ("" if local else " (a Hub id)"),
                      "size_bytes": _size_on_disk(Path(chosen)) if local else None, "path": chosen})
    return found + hub.cached_models()


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _directory(path) -> Path:
    directory = Path(path) if path is not None else default_model_path()
    if not directory.exists():
        raise LLMError(f"checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise LLMError(f"{directory} is not a checkpoint directory")
    return directory


def load_model(path: str | Path | None = None, device: str = "cpu", numpy_if_small: bool = False,
               quantize: str | None = None):
    """(model in eval mode, tokenizer, config dict) from any model path; the shipped default when None.

    numpy_if_small: a small plain language model of ours comes as a NumpyTransformer (llmcli/model/numpy_model.py),
    which decodes without importing torch; anything else as the torch model. quantize: "int8" or "int4" stores the
    weights quantized for faster decoding (llmcli/model/quantize.py), each matrix as it is read, so that the float32
    model never exists whole (a LoRA adapter is merged into its float32 base first). Raises LLMError for a path that is
    not a model or whose files are missing, corrupt or disagree.
    """
    from llmcli.formats import gguf, hf, ours

    path = resolve_model(path)
    if quantize is not None:
        from llmcli.model.quantize import check_mode

        check_mode(quantize)
        if device != "cpu":
            raise LLMError(f"--quantize {quantize} runs on the CPU only")
        import torch  # noqa: F401  (quantizing is long parallel work: on the cores other processes leave idle)

        from llmcli import runtime

        runtime.return_freed_memory()
        runtime.follow_load()
    if gguf.is_gguf_file(path):
        return gguf.load_gguf(Path(path), device, quantize)
    directory = _directory(path)
    if hf.is_hf_folder(directory):
        return hf.load_hf_folder(directory, device, quantize)
    config = ours.read_config(directory)
    if "adapter" in config:  # LoRA weights alone: they name their base
        from llmcli.formats.adapter import base_path, load_adapter

        base_model, tokenizer, _ = load_model(base_path(directory, config), device)
        model = load_adapter(directory, config, base_model, device)
        if quantize is not None:
            from llmcli.model.lora import merge_lora
            from llmcli.model.quantize import quantize as quantize_model

            model = quantize_model(merge_lora(model), quantize)
        return model, tokenizer, config
    return ours.load_ours(directory, config, device, numpy_if_small, quantize)


def load_model_tokenizer(path: str | Path | None = None):
    """The tokenizer of any model path (or of a tokenizer directory or tokenizer.model file) without its weights."""
    from llmcli.formats import gguf
    from llmcli.text.tokenizer import load_tokenizer

    path = resolve_model(path)
    if gguf.is_gguf_file(path):
        metadata = gguf.read_metadata(gguf.open_gguf(path), path)
        return gguf.gguf_tokenizer(metadata, path, len(metadata.get("tokenizer.ggml.tokens") or []))
    return load_tokenizer(path)


def model_info(path: str | Path | None = None) -> dict:
    """What a model path holds (architecture, task, parameters, shape, tokenizer, dtype, size on disk), read from
    its headers without loading the weights."""
    from llmcli.config import ModelConfig
    from llmcli.files import safetensors_header
    from llmcli.formats import gguf, hf, ours
    from llmcli.model.transformer import Transformer, meta_device
    from llmcli.text.tokenizer import Tokenizer, load_tokenizer

    path = resolve_model(path)
    if gguf.is_gguf_file(path):
        about = gguf.gguf_info(Path(path))
        return _describe(Path(path), about["architecture"], "language model", about["config"], about["parameters"],
                         about["tokenizer"], about["dtype"], Path(path).stat().st_size)
    directory = _directory(path)
    labels = []
    if hf.is_hf_folder(directory):
        settings, architecture, weight_paths = hf.hf_info(directory)
        task = "language model"
    else:
        config = ours.read_config(directory)
        settings, architecture = config["model"], "llmcli Transformer"
        weight_paths = {directory / ours.MODEL_FILE}
        labels = (config.get("labels") or []) if config.get("task") == "classify" else []
        task = f"classifier ({', '.join(map(str, labels))})" if labels else "language model"
        if "adapter" in config:
            adapter = config["adapter"]
            task = (f"LoRA adapter (rank {adapter.get('rank')} on {', '.join(adapter.get('targets') or [])}) for "
                    f"{adapter.get('base')}, a {task}")
    try:
        model_config = ModelConfig(**settings)
    except (TypeError, ValueError) as e:
        raise LLMError(f"{directory}: bad model settings: {e}") from None
    with meta_device():  # + a classifier's head
        parameters = Transformer(model_config).num_params() + (model_config.n_embd + 1) * len(labels)
    dtypes = {info["dtype"] for file in weight_paths for info in safetensors_header(file).values()}
    tokenizer = load_tokenizer(directory)
    return _describe(directory, architecture, task, model_config, parameters,
                     f"{'SentencePiece' if isinstance(tokenizer, Tokenizer) else 'byte-level BPE'} "
                     f"({tokenizer.vocab_size} tokens)", ", ".join(sorted(dtypes)),
                     sum(f.stat().st_size for f in directory.iterdir() if f.is_file()))


def _describe(path: Path, architecture: str, task: str, c, parameters: int, tokenizer: str, dtype: str,
              size: int) -> dict:
    attention = ("multi-head" if c.kv_heads == c.n_head else "multi-query" if c.kv_heads == 1
                 else f"grouped-query ({c.kv_heads} key/value heads)")
    return {
        "path": str(path),
        "architecture": architecture,
        "task": task,
        "parts": f"{c.norm}, {c.positions} positions, {c.mlp} MLP, {attention} attention, "
                 f"{'tied' if c.tie_embeddings else 'untied'} output head",
        "parameters": parameters,
        "layers": c.n_layer,
        "heads": c.n_head,
        "width": c.n_embd,
        "context": c.context,
        "vocab_size": c.vocab_size,
        "tokenizer": tokenizer,
        "dtype": dtype,
        "size_bytes": size,
    }


def export_model(path: str | Path | None, out: str | Path, format: str = "hf", type: str | None = None) -> Path:
    """Write the model at path (any format; an adapter merged into its base) to `out`: a new directory for "hf", a
    new .gguf file for "gguf" with its matrices in `type` (f32, f16 (default), bf16 or q8_0).

    Raises LLMError for an unknown format or type, a classifier (no exported family has its head) or an `out` that
    exists (a directory may exist if empty)."""
    from llmcli.formats import gguf, hf
    from llmcli.model.lora import merge_lora

    if format not in ("hf", "gguf"):
        raise LLMError(f"unknown export format {format!r}; choose hf or gguf")
    if format == "hf" and type is not None:
        raise LLMError("--type is for --format gguf; a Hugging Face folder keeps the model's float32 weights")
    if format == "gguf" and (type or "f16") not in gguf.WRITE_TYPES:
        raise LLMError(f"unknown GGUF tensor type {type!r}; choose one of {', '.join(gguf.WRITE_TYPES)}")
    out = Path(out)
    if format == "gguf" and out.exists():
        raise LLMError(f"{out} already exists; choose a new file name")
    if format == "hf" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LLMError(f"{out} already exists and is not an empty directory; choose a new one")
    model, tokenizer, settings = load_model(path)
    if settings.get("task") == "classify":
        raise LLMError(f"{path or default_model_path()} is a classifier; export writes language models")
    template = (settings.get("generation") or {}).get("chat_template")
    if isinstance(template, str):  # the template it was fine-tuned with (config.yaml) over its tokenizer's own
        tokenizer.chat_template = template
    if format == "gguf":
        return gguf.write_gguf(merge_lora(model), tokenizer, out, type or "f16")
    return hf.write_hf(merge_lora(model), tokenizer, out)
