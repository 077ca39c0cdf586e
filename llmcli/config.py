"""Run settings: built-in presets, a YAML file, then command-line overrides, in that order of precedence.

A run's settings are two dataclasses, the model's shape (`ModelConfig`) and how it is trained (`TrainConfig`). The YAML
file has the same two sections, and optionally a third, `generation`: sampling defaults that suit the model, stored
in its checkpoint for `llm generate`.
"""

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmcli.errors import LLMError


@dataclass
class ModelConfig:
    """The shape of the Transformer of llmcli/model.py; plain data here, so that reading settings, checkpoints and
    decoding with NumPy (llmcli/numpy_model.py) need no torch."""

    vocab_size: int = 2048
    context: int = 256  # the longest sequence the model sees; sets the size of the position table
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and LayerNorms, as GPT-2 has
    norm_eps: float = 1e-5
    norm: str = "layernorm"  # or "rmsnorm" (Llama)
    positions: str = "learned"  # or "rope" (rotary, Llama) or "sinusoidal" (the original Transformer's fixed table)
    mlp: str = "gelu"  # or "swiglu" (Llama)
    intermediate_size: int = 0  # width of the MLP's hidden layer; 0 = 4 * n_embd
    n_kv_head: int = 0  # key/value heads: 0 = n_head (multi-head), fewer = grouped-query, 1 = multi-query
    qkv_bias: bool = False  # biases on the query/key/value projection even when bias is off (Qwen2)
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    rope_theta: float = 10000.0  # base of the rotary frequencies
    rope_scaling: float = 1.0  # "linear": positions are divided by this; "llama3": the low frequencies are
    rope_type: str = "linear"  # or "llama3" (Llama 3.1/3.2's frequency-band scaling, with the three fields below)
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192  # the context the model was pretrained with before scaling

    def __post_init__(self):
        for field in dataclasses.fields(self):  # settings come from YAML and JSON files: check what they hold
            value = getattr(self, field.name)
            if field.type is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, field.name, float(value))
            elif not isinstance(value, field.type) or (field.type is int and isinstance(value, bool)):
                raise ValueError(f"{field.name} must be {field.type.__name__}, not {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        choices = {"norm": ("layernorm", "rmsnorm"), "positions": ("learned", "rope", "sinusoidal"),
                   "mlp": ("gelu", "swiglu"), "rope_type": ("linear", "llama3")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, not {self.head_dim}")
        if self.rope_scaling <= 0:
            raise ValueError(f"rope_scaling must be > 0, not {self.rope_scaling}")

    def rope_frequencies(self) -> tuple[list[float], float]:
        """(inverse frequencies (head_dim / 2), divisor of the positions) of the rotary angles.

        llama3: frequencies whose wavelength exceeds rope_original_context / low_freq_factor are divided by
        rope_scaling, those shorter than rope_original_context / high_freq_factor kept, and those between
        interpolated (Meta's Llama 3.1 reference code; transformers' `_compute_llama3_parameters`)."""
        dim = self.head_dim
        inv_freq = [1.0 / self.rope_theta ** (i / dim) for i in range(0, dim, 2)]
        if self.rope_type == "linear":
            return inv_freq, self.rope_scaling
        factor, low, high = self.rope_scaling, self.rope_low_freq_factor, self.rope_high_freq_factor
        scaled = []
        for f in inv_freq:
            wavelength = 2 * math.pi / f
            if wavelength < self.rope_original_context / high:
                scaled.append(f)
            elif wavelength > self.rope_original_context / low:
                scaled.append(f / factor)
            else:
                smooth = (self.rope_original_context / wavelength - low) / (high - low)
                scaled.append((1 - smooth) * f / factor + smooth * f)
        return scaled, 1.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self) -> int:
        return self.intermediate_size or 4 * self.n_embd


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 200  # steps between validation (and checkpoint saves)
    eval_batches: int = 20
    seed: int = 1337
    val_fraction: float = 0.05  # share of the tokenized corpus held out for validation
    tokenizer_type: str = "bpe"  # of the tokenizer trained when none is given (bpe, unigram or char)
    threads: int = 0  # torch threads; 0 = all cores
    save_dtype: str = "float32"  # of the weights on disk; bfloat16 halves a checkpoint, and loading casts back
    micro_batch_size: int = 0  # sequences per forward pass; batch_size / (micro * processes) are accumulated; 0 = all
    schedule: str = "cosine"  # after warmup: cosine or linear decay to min_lr_ratio, or wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: the last share of the steps that decays the learning rate
    # fp32, bf16-mixed (bfloat16 autocast, fp32 weights and optimizer), or auto: bf16-mixed where it is faster (the
    # device multiplies bfloat16 natively and the model is wide enough for matmuls to dominate), else fp32
    precision: str = "auto"
    compile: bool = False  # torch.compile the model
    strategy: str = "ddp"  # with several processes: ddp (replicas) or fsdp (parameters, gradients, optimizer sharded)
    save_interval: int = 0  # steps between checkpoints; 0 = at every validation
    keep_last: int = 2  # checkpoints kept, besides the best by validation loss
    text_field: str = "text"  # of the records of .jsonl, .csv and .parquet corpus files
    doc_separator: str = "<|endoftext|>"  # a line holding only this ends a document in text files


PRESETS: dict[str, dict[str, dict]] = {
    "nano": {  # for tests: trains in seconds
        "model": dict(n_layer=2, n_head=2, n_embd=64, context=64, vocab_size=512),
        "train": dict(max_steps=200, batch_size=16, lr=3e-3, warmup_steps=20, eval_interval=50, eval_batches=4),
    },
    "tiny": {  # ~1M parameters
        "model": dict(n_layer=4, n_head=4, n_embd=128, context=256, vocab_size=2048),
        "train": dict(max_steps=2000, batch_size=32, lr=2e-3, warmup_steps=100),
    },
    "small": {  # ~10M parameters
        "model": dict(n_layer=6, n_head=6, n_embd=384, context=256, vocab_size=4096),
        "train": dict(max_steps=5000, batch_size=32, lr=1e-3, warmup_steps=200),
    },
    "gpt2": {  # the GPT-2 124M shape
        "model": dict(n_layer=12, n_head=12, n_embd=768, context=1024, vocab_size=50257),
        "train": dict(max_steps=20000, batch_size=16, lr=6e-4, warmup_steps=1000),
    },
}
DEFAULT_PRESET = "tiny"
# model.vocab_size is the size of the tokenizer trained for the run; a given tokenizer brings its own.
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
# prompt_template wraps a user's prompt before encoding, "{prompt}" standing for it (e.g. for a model trained on
# instruction lines followed by a story); chat_template is a Jinja chat template (llmcli/text/chat_template.py)
GENERATION_FIELD_TYPES = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
                          "min_p": float, "repetition_penalty": float, "stop": list, "prompt_template": str,
                          "chat_template": str}


def resolve_run_config(preset: str | None, config_file: str | Path | None, overrides: dict) -> dict:
    """Merge preset < YAML file < overrides into {"model": {...}, "train": {...}}, checking every key and type."""
    if config_file is not None:
        from_file = read_config_file(config_file)
        preset = preset or from_file.pop("preset", None)
    else:
        from_file = {}
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise LLMError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    model = dict(PRESETS[preset]["model"])
    train = dataclasses.asdict(TrainConfig()) | PRESETS[preset]["train"]
    model |= from_file.get("model", {})
    train |= from_file.get("train", {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key in MODEL_FIELDS:
            model[key] = value
        else:
            train[key] = value
    return {"preset": preset, "model": model, "train": train, "generation": from_file.get("generation", {})}


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LLMError(f"config file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LLMError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise LLMError(f"{path}: expected a mapping with 'model' and 'train' sections")
    sections = {"preset": str, "model": dict, "train": dict, "generation": dict}
    for key, value in data.items():
        _check_key(path, "", key, sections)
        if not isinstance(value, sections[key]):
            raise LLMError(f"{path}: '{key}' must be a {sections[key].__name__}, not {type(value).__name__}")
    for section, types in (("model", _field_types(ModelConfig)), ("train", _field_types(TrainConfig)),
                           ("generation", GENERATION_FIELD_TYPES)):
        for key, value in data.get(section, {}).items():
            _check_key(path, f"{section}.", key, types)
            data[section][key] = _check_type(path, f"{section}.{key}", value, types[key])
    return data


def _field_types(cls) -> dict[str, type]:
    return {f.name: f.type for f in dataclasses.fields(cls)}


def _check_key(path, prefix: str, key, known: dict):
    if key not in known:
        hint = difflib.get_close_matches(str(key), list(known), n=1)
        suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else f"; known keys: {', '.join(known)}"
        raise LLMError(f"{path}: unknown key '{prefix}{key}'{suggestion}")


def _check_type(path, name: str, value, expected: type):
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:  # PyYAML reads 2e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise LLMError(f"{path}: '{name}' must be {expected.__name__}, got {value!r}")
