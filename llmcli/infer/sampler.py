"""Sampling settings and logits -> token: logit bias, repetition/presence/frequency penalties, temperature, top-k,
top-p, min-p; and the log-probabilities the model gives.

Pure functions on NumPy arrays, the same for every backend, each testable alone. sample_next computes in float64 with
one uniform number a row (inverse CDF), so that any backend whose logits agree to float32 precision draws the same
tokens from the same seed. sampling_settings is the one place where a checkpoint's stored defaults, the caller's
options and a chat template's stops become one SamplingConfig, for every caller (generate, chat, serve, the API).
"""

from dataclasses import dataclass

import numpy as np

from llmcli.errors import LLMError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; keep tokens at least min_p times as likely as the most likely one
    repetition_penalty: float = 1.0  # 1 = off; > 1 makes tokens already in the text less likely (CTRL, as HF)
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    stop_tokens: tuple[int, ...] = ()  # and at these ids, besides the tokenizer's end tokens (a chat turn's end)
    num_samples: int = 1
    seed: int | None = None
    batch_size: int = 8  # rows (prompts x samples) decoded together at most
    ignore_eos: bool = False  # the end tokens are never sampled (as llama.cpp): fixed-length runs
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once for each time a token was generated
    logit_bias: dict | None = None  # token id -> added to its logit (OpenAI's, -100..100)

    def check(self):
        if not 0 <= self.temperature < float("inf"):
            raise LLMError(f"--temperature must be a number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LLMError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LLMError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise LLMError(f"--min-p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise LLMError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise LLMError(f"--{name.replace('_', '-')} must be in [-2, 2], got {getattr(self, name)}")
        for token, bias in (self.logit_bias or {}).items():
            if not -100 <= bias <= 100:
                raise LLMError(f"--logit-bias: the bias of token {token} must be in [-100, 100], got {bias}")
        if any(s == "" for s in self.stop):
            raise LLMError("--stop must not be empty")
        if self.num_samples < 1:
            raise LLMError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise LLMError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 0:
            raise LLMError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")


def sampling_settings(checkpoint_config: dict, chat=None, tokenizer=None, **options) -> tuple[SamplingConfig, str]:
    """Sampling settings and prompt template: the options given (None: unset), else the checkpoint's stored defaults.

    chat: the model's ChatTemplate (llmcli/text/chat_template.py) when the prompts are conversations; its turn-ending
    strings and tokens (of `tokenizer`) are added to the stops. Raises LLMError for settings out of range.
    """
    stored = checkpoint_config.get("generation") or {}
    template = stored.get("prompt_template", "{prompt}")
    defaults = {k: v for k, v in stored.items() if k in SamplingConfig.__dataclass_fields__}
    cfg = SamplingConfig(**(defaults | {k: v for k, v in options.items() if v is not None}))
    cfg.stop, cfg.stop_tokens = tuple(cfg.stop), tuple(cfg.stop_tokens)
    if chat is not None:
        cfg.stop, cfg.stop_tokens = cfg.stop + chat.stops(), cfg.stop_tokens + chat.stop_tokens(tokenizer)
    cfg.check()
    return cfg, template


def sampling_key(cfg: SamplingConfig) -> tuple:
    """The settings sample_next reads: rows that agree on them are sampled together."""
    return (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repetition_penalty, cfg.presence_penalty,
            cfg.frequency_penalty)


def bias_vector(cfg: SamplingConfig, vocab_size: int, end_tokens=()) -> np.ndarray | None:
    """The (vocab,) logit bias of a row: cfg.logit_bias, and -inf at the end tokens under cfg.ignore_eos (llama.cpp's
    way: they are never sampled). None when there is none. Raises LLMError for a token id outside the vocabulary."""
    ends = tuple(end_tokens) if cfg.ignore_eos else ()
    if not cfg.logit_bias and not ends:
        return None
    bias = np.zeros(vocab_size)
    for token, value in (cfg.logit_bias or {}).items():
        if not 0 <= int(token) < vocab_size:
            raise LLMError(f"--logit-bias: token {token} is not in the vocabulary (0..{vocab_size - 1})")
        bias[int(token)] = value
    bias[list(ends)] = -np.inf
    return bias


def apply_logit_bias(logits: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """logits + bias, the (B, vocab) or (vocab,) bias of OpenAI's logit_bias (-inf: never sampled)."""
    return logits if bias is None else logits + bias


def apply_presence_frequency(logits: np.ndarray, counts: np.ndarray | None, presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI's penalties (platform.openai.com/docs/advanced-usage#frequency-and-presence-penalties):
    logits[t] -= presence * (counts[t] > 0) + frequency * counts[t], counts (B, vocab) the generated tokens' counts."""
    if counts is None or (presence == 0 and frequency == 0):
        return logits
    return logits - presence * (counts > 0) - frequency * counts


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """The log-probabilities (float64) of logits (..., vocab): what the model gives, before any sampling setting."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Divide positive logits (multiply negative ones) of the tokens already seen (a (B, vocab) bool mask)."""
    if penalty == 1.0:
        return logits
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalized, logits)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits of each row; of equal ones the first, so that k = 1 is greedy (argmax)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    keep = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :k], True, axis=-1)
    return np.where(keep, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    # most likely first, ties in token order: quicksort (the faster) where a row has no ties, a stable sort where it has
    order = np.argsort(-logits, axis=-1)
    ordered = np.take_along_axis(logits, order, axis=-1)
    tied = (ordered[..., 1:] == ordered[..., :-1]).any(axis=-1)
    if tied.any():
        order[tied] = np.argsort(-logits[tied], axis=-1, kind="stable")
        ordered = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(ordered)
    drop_sorted = np.cumsum(probs, axis=-1) - probs >= p  # tokens past the first that reaches p
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep the tokens whose probability is at least min_p times the largest (p >= min_p * p_max)."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max(axis=-1, keepdims=True) + np.log(min_p)  # in log space: no softmax needed
    return np.where(logits < threshold, -np.inf, logits)


def sample_next(logits: np.ndarray, cfg: SamplingConfig, rngs: list[np.random.Generator],
                seen: np.ndarray | None = None, counts: np.ndarray | None = None,
                bias: np.ndarray | None = None) -> np.ndarray:
    """One token id per row of logits (B, vocab), row b drawing from rngs[b]. seen: (B, vocab) bool, the tokens of
    the text (repetition penalty); counts: (B, vocab) the generated tokens' counts (presence and frequency
    penalties); bias: (B, vocab) added first (logit_bias, ignore_eos).

    Computed in float64 with one uniform number a row (inverse CDF), so that any backend whose logits agree to
    float32 precision draws the same tokens from the same seed.
    """
    logits = apply_logit_bias(logits.astype(np.float64), bias)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    logits = apply_presence_frequency(logits, counts, cfg.presence_penalty, cfg.frequency_penalty)
    if cfg.temperature == 0:
        return logits.argmax(axis=-1)
    # scaled after taking away the largest: every logit <= 0 before dividing, so a tiny temperature gives -inf
    # (probability 0), never inf - inf = nan
    logits = (logits - logits.max(axis=-1, keepdims=True)) / cfg.temperature
    logits = apply_min_p(apply_top_p(apply_top_k(logits, cfg.top_k), cfg.top_p), cfg.min_p)
    cumulative = np.cumsum(softmax(logits), axis=-1)
    # the token whose interval holds the draw; side="right" passes over tokens of probability 0, and a draw rounded
    # up to the total falls to the last token of positive probability
    return np.array([min(np.searchsorted(row, rng.random() * row[-1], side="right"),
                         np.searchsorted(row, row[-1], side="left")) for row, rng in zip(cumulative, rngs)])
