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


def _setting(default, help: str, low=None, high=None, positive: bool = False, choices: tuple = (),
             resume: bool = False):
    """A TrainConfig field: its help, its bounds (low <= value <= high; above low when positive), its choices, and
    whether a resumed run may change it (what changes no result: the length of the run, how often it saves, how the
    work is shared out)."""
    return dataclasses.field(default=default, metadata=dict(help=help, low=low, high=high, positive=positive,
                                                            choices=choices, resume=resume))


@dataclass
class TrainConfig:
    """How a run trains. A new setting is one field here: `--set train.NAME=VALUE`, config files, the checks and
    the resume rules all read these fields."""

    max_steps: int = _setting(2000, "training steps", low=1, resume=True)
    batch_size: int = _setting(32, "sequences per step, over all processes", low=1)
    lr: float = _setting(1e-3, "peak learning rate", low=0, positive=True)
    min_lr_ratio: float = _setting(0.1, "the schedule ends at lr * min_lr_ratio", low=0, high=1)
    warmup_steps: int = _setting(100, "steps of linear warmup; -1: warmup_fraction of max_steps", low=-1)
    warmup_fraction: float = _setting(0.0, "with warmup_steps -1: the share of the steps that warms up", low=0,
                                      high=1)
    optimizer: str = _setting("adamw", "adamw for every weight, or muon: Muon for the blocks' matrices, AdamW (at lr) "
                              "for embeddings, output head, norms and biases", choices=("adamw", "muon"))
    muon_lr: float = _setting(0.02, "muon: peak learning rate of the blocks' matrices (each scaled by "
                              "sqrt(max(1, rows / columns)), as nanochat's), following lr's schedule", low=0,
                              positive=True)
    weight_decay: float = _setting(0.1, "weight decay of the matrices (AdamW's, and Muon's with muon)", low=0)
    beta1: float = _setting(0.9, "AdamW beta1", low=0, high=1)
    beta2: float = _setting(0.95, "AdamW beta2", low=0, high=1)
    grad_clip: float = _setting(1.0, "largest gradient norm", low=0, positive=True)
    eval_interval: int = _setting(200, "steps between validations (and checkpoint saves)", low=1, resume=True)
    eval_batches: int = _setting(20, "batches of a validation", low=1)
    seed: int = _setting(1337, "random seed")
    val_fraction: float = _setting(0.05, "share of the tokenized corpus held out for validation", low=0, high=1,
                                   positive=True)
    tokenizer_type: str = _setting("bpe", "of the tokenizer trained when none is given",
                                   choices=("bpe", "unigram", "char"))
    threads: int = _setting(0, "torch threads; 0 = the cores this process may use", low=0, resume=True)
    save_dtype: str = _setting("float32", "of the weights on disk; bfloat16 halves a checkpoint, loading casts back",
                               choices=("float32", "bfloat16", "float16"))
    micro_batch_size: int = _setting(0, "sequences per forward pass; the rest of the batch is accumulated; 0 = all",
                                     low=0, resume=True)
    schedule: str = _setting("cosine", "after warmup: cosine or linear decay to min_lr_ratio, or wsd "
                             "(warmup-stable-decay)", choices=("cosine", "linear", "wsd"))
    decay_fraction: float = _setting(0.2, "wsd: the last share of the steps that decays the learning rate",
                                     low=0, high=1)
    precision: str = _setting("auto", "fp32, bf16-mixed (bfloat16 autocast, fp32 weights and optimizer), or auto: "
                              "bf16-mixed where it is faster", choices=("auto", "fp32", "bf16-mixed"))
    compile: bool = _setting(False, "torch.compile the model", resume=True)
    strategy: str = _setting("ddp", "with several processes: ddp (replicas) or fsdp (sharded)",
                             choices=("ddp", "fsdp"), resume=True)
    save_interval: int = _setting(0, "steps between checkpoints; 0 = at every validation", low=0, resume=True)
    keep_last: int = _setting(2, "checkpoints kept, besides the best by validation loss", low=0, resume=True)
    text_field: str = _setting("text", "of the records of .jsonl, .csv and .parquet corpus files")
    doc_separator: str = _setting("<|endoftext|>", "a line holding only this ends a document in text files")

    @property
    def warmup(self) -> int:
        """Steps of linear warmup: warmup_steps, or (-1) warmup_fraction of max_steps."""
        return self.warmup_steps if self.warmup_steps >= 0 else round(self.warmup_fraction * self.max_steps)

    def check(self):
        """Raise LLMError naming the first setting that is out of its bounds or choices (the one loop for all)."""
        for field in dataclasses.fields(self):
            value, meta = getattr(self, field.name), field.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise LLMError(f"{field.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
            low, high, positive = meta["low"], meta["high"], meta["positive"]
            if low is None and high is None:
                continue
            if (not math.isfinite(value) or value < low or (positive and value <= low)
                    or (high is not None and value > high)):
                bound = (f"between {low} and {high}" if high is not None else
                         f"above {low}" if positive else f"at least {low}")
                raise LLMError(f"{field.name} (--{field.name.replace('_', '-')}) must be {bound}, not {value}")


# what a resumed run may change: one list, for pretraining and fine-tuning alike
RESUMABLE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"])


# The recipe of a NEW run, under every preset and config file: Llama's block (RMSNorm, rotary positions, SwiGLU,
# an untied head), no dropout, warmup as a share of the run and warmup-stable-decay (measured: docs/perf.md,
# "Training recipe"). The dataclasses keep the earlier defaults, so that a checkpoint's config.yaml that does not
# name a setting reads it as the program that wrote it meant it.
RECIPE = {
    "model": dict(norm="rmsnorm", positions="rope", mlp="swiglu", tie_embeddings=False, dropout=0.0),
    "train": dict(warmup_steps=-1, warmup_fraction=0.05, schedule="wsd", decay_fraction=0.65, min_lr_ratio=0.05),
}

PRESETS: dict[str, dict[str, dict]] = {
    "nano": {  # for tests: trains in seconds
        "model": dict(n_layer=2, n_head=2, n_embd=64, context=64, vocab_size=512),
        "train": dict(max_steps=200, batch_size=16, lr=3e-3, eval_interval=50, eval_batches=4),
    },
    "tiny": {  # ~1M parameters
        "model": dict(n_layer=4, n_head=4, n_embd=128, context=256, vocab_size=2048),
        "train": dict(max_steps=2000, batch_size=32, lr=2e-3),
    },
    "small": {  # ~10M parameters
        "model": dict(n_layer=6, n_head=6, n_embd=384, context=256, vocab_size=4096),
        "train": dict(max_steps=5000, batch_size=32, lr=1e-3),
    },
    "gpt2": {  # the GPT-2 124M shape
        "model": dict(n_layer=12, n_head=12, n_embd=768, context=1024, vocab_size=50257),
        "train": dict(max_steps=20000, batch_size=16, lr=6e-4),
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
    """Merge preset < YAML file < overrides into {"model": {...}, "train": {...}}, checking every key and type.
    overrides: {"train.lr": 0.01, "context": 32, ...}, a bare name meaning the section that has it; None is unset."""
    if config_file is not None:
        from_file = read_config_file(config_file)
        preset = preset or from_file.pop("preset", None)
    else:
        from_file = {}
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise LLMError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    model = RECIPE["model"] | PRESETS[preset]["model"]
    train = dataclasses.asdict(TrainConfig()) | RECIPE["train"] | PRESETS[preset]["train"]
    model |= from_file.get("model", {})
    train |= from_file.get("train", {})
    for key, value in overrides.items():  # "train.lr" or "lr": the two sections share no field name
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        section = section or ("model" if name in MODEL_FIELDS else "train")
        (model if section == "model" else train)[name] = value
    return {"preset": preset, "model": model, "train": train, "generation": from_file.get("generation", {})}


def parse_settings(items: list[str], sections: tuple[str, ...] = ("model", "train")) -> dict[str, object]:
    """{"train.warmup_steps": 50, ...} of `--set SECTION.NAME=VALUE` items, each value read as YAML reads it and
    typed by its dataclass field (as a config file's are); LLMError names an unknown key or a bad value."""
    types = {f"{section}.{name}": t for section in sections
             for name, t in _field_types({"model": ModelConfig, "train": TrainConfig}[section]).items()}
    settings = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals:
            raise LLMError(f"--set {item}: expected SECTION.NAME=VALUE, e.g. --set train.warmup_steps=50")
        _check_key("--set", "", key.strip(), types)
        if types[key.strip()] is str:
            value = text
        else:
            try:
                value = yaml.safe_load(text) if text.strip() else text
            except yaml.YAMLError:
                value = text
        settings[key.strip()] = _check_type("--set", key.strip(), value, types[key.strip()])
    return settings


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
