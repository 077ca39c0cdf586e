"""Sampling from a model: prefill the prompts into the KV cache, then one decode step per new token.

Several prompts and samples decode together as the rows of one batch: prompts of different lengths are left-padded,
their positions start after the padding and no token attends to padding, so each row gives what it would alone.
Every row draws from its own random generator, seeded by (seed, prompt, sample number), so the same seed gives the same text
whatever else is in the batch.

Logits processing is a few pure functions (repetition penalty, temperature, top-k, top-p, min-p) that can be tested
alone. Text is streamed as it is produced: the bytes of a character split across tokens, and any text that could be
the start of a stop string, are held back until they are known to be printable.
"""

import itertools
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TextIO

import numpy as np

from llmcli.errors import LLMError
from llmcli.model.batching import distinct_rows, left_pad
from llmcli.text.tokenizer import Tokenizer

SEPARATOR = "<|endoftext|>"  # the line after each sample when there are several


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
    batch_size: int = 8  # rows (prompts x samples) decoded together
    ignore_eos: bool = False  # decode past the end-of-text token (fixed-length runs, for measuring speed)

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
        if any(s == "" for s in self.stop):
            raise LLMError("--stop must not be empty")
        if self.num_samples < 1:
            raise LLMError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise LLMError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 0:
            raise LLMError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")


def sampling_settings(checkpoint_config: dict, **options) -> tuple[SamplingConfig, str]:
    """Sampling settings and prompt template: the options given, else the checkpoint's stored defaults."""
    stored = checkpoint_config.get("generation") or {}
    template = stored.get("prompt_template", "{prompt}")
    defaults = {k: v for k, v in stored.items() if k in SamplingConfig.__dataclass_fields__}
    cfg = SamplingConfig(**(defaults | {k: v for k, v in options.items() if v is not None}))
    cfg.stop = tuple(cfg.stop)
    return cfg, template


def apply_template(template: str, prompt: str) -> str:
    """The prompt wrapped in the model's template; an empty prompt stays empty (the start of a document)."""
    return template.replace("{prompt}", prompt) if prompt else prompt


# --- logits processing (NumPy: the same for every backend) ----------------------------------------------------------

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
    # most likely first, ties in token order (a stable sort); quicksort is 4x faster and gives the same order in the
    # rows without ties, which are most rows: they keep it
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
                seen: np.ndarray | None = None) -> np.ndarray:
    """One token id per row of logits (B, vocab), row b drawing from rngs[b].

    Computed in float64 with one uniform number a row (inverse CDF), so that any backend whose logits agree to
    float32 precision draws the same tokens from the same seed.
    """
    logits = logits.astype(np.float64)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
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


def row_rng(seed: int, prompt: list[int], sample: int) -> np.random.Generator:
    """The random numbers of sample number `sample` of a prompt: the same whatever the batch around it."""
    key = zlib.crc32(np.asarray(prompt, dtype=np.int64).tobytes())
    return np.random.default_rng(np.random.SeedSequence([seed, key, sample]))


# --- decoding ------------------------------------------------------------------------------------------------------

def decoding_layout(model):
    """Store every weight matrix transposed in memory (same values, same shapes, other strides), for inference.

    A decode step multiplies one row per sequence by each matrix; on CPU, x @ W with W laid out (in, out) streams
    the weights faster than F.linear's x @ W.T over the (out, in) layout (about 1.2x a decode step here, see
    benchmarks/generate.py). F.linear sees a transposed view and takes the faster path; nothing else changes.
    Not for training: the optimizer and checkpoint saving expect contiguous parameters.
    """
    looked_up = ("position_embedding",) + (() if model.config.tie_embeddings else ("token_embedding",))
    for name, p in model.named_parameters():  # (a table only looked up is better left in rows)
        if p.ndim == 2 and p.is_contiguous() and not name.startswith(looked_up):
            p.data = p.data.t().contiguous().t()
    return model


class TorchDecoder:
    """The torch Transformer as decode_rows drives it: the logits (B, vocab) of the prompts' last positions, then of
    each new token, as NumPy arrays. Rows are left-padded; their positions start after the padding and no token
    attends to padding."""

    def __init__(self, model, rows: list[list[int]], max_len: int, use_cache: bool = True):
        import torch

        self.torch, self.model, self.use_cache, self.max_len = torch, decoding_layout(model), use_cache, max_len
        self.device = model.norm_f.weight.device
        tokens, pad = left_pad(rows)
        self.rows, self.pos = rows, tokens.shape[1]
        self.tokens = torch.from_numpy(tokens).to(self.device)
        self.pad = torch.from_numpy(pad).to(self.device) if pad.any() else None
        self.steps = None  # TorchKernels once the prompts are in the KV cache, where it can take the model

    def first(self) -> np.ndarray:
        if not self.use_cache:
            with self.torch.no_grad():
                return self._numpy(self.model(self.tokens, pad=self.pad, last_only=True))
        # each distinct prompt is prefilled once: the samples of a prompt share its keys and values
        distinct, copies = distinct_rows(self.rows)
        tokens, pad = self.tokens[distinct], None if self.pad is None else self.pad[distinct]
        self.model.setup_kv_cache(len(distinct), self.max_len)
        with self.torch.no_grad():
            logits = self.model(tokens, pad=pad, last_only=True)
        self.model.select_kv_cache_rows(self.torch.from_numpy(copies).to(self.device))
        from llmcli.model.numpy_steps import TorchKernels, kv_cache_arrays, runs_on_numpy  # (imports torch)

        if runs_on_numpy(self.model):  # new tokens: NumPy between torch's modules, while that is the faster
            self.steps, self.cache = TorchKernels(self.model), kv_cache_arrays(self.model.kv_caches())
            self.pad_array = None if self.pad is None else self.pad.numpy()
        return self._numpy(logits)[copies]

    def next(self, tokens: np.ndarray) -> np.ndarray:
        if self.steps is not None and self.steps.faster(len(self.rows), self.pos + 1):
            logits = self.steps.forward(np.asarray(tokens, dtype=np.int64)[:, None], self.pos, self.cache,
                                        self.pad_array)
        else:
            new = self.torch.from_numpy(tokens).to(self.device)[:, None]
            with self.torch.no_grad():
                if self.use_cache:
                    logits = self.model(new, pos=self.pos, pad=self.pad)
                else:
                    self.tokens = self.torch.cat([self.tokens, new], dim=1)
                    logits = self.model(self.tokens, pad=self.pad, last_only=True)
            logits = self._numpy(logits)
        self.pos += 1
        return logits

    def close(self):
        self.steps = self.cache = None
        self.model.clear_kv_cache()

    @staticmethod
    def _numpy(logits) -> np.ndarray:
        return logits[:, -1].float().cpu().numpy()


def decode_rows(model, rows: list[list[int]], cfg: SamplingConfig, rngs: list[np.random.Generator] | None = None,
                stop_tokens: tuple[int, ...] = (), finished: np.ndarray | None = None, use_cache: bool = True
                ) -> Iterator[np.ndarray]:
    """Yield the next token of every row (a (B,) array) per step, the rows decoded as one batch.

    model: the torch Transformer, or a NumpyTransformer. rngs: one random generator a row
    (None: fresh ones). Row b stops after cfg.max_new_tokens, at the end of the context, at any of stop_tokens, or when
    the caller sets finished[b]; a finished row keeps yielding the first stop token (or its last token). Ends when every row is
    finished.
    """
    context = model.config.context
    lengths = [len(r) for r in rows]
    if not all(0 < n < context for n in lengths):
        raise ValueError(f"prompts of {lengths} tokens must be 1..{context - 1}")
    limits = np.array([min(cfg.max_new_tokens, context - n) for n in lengths])
    steps = int(limits.max())
    B = len(rows)
    rngs = rngs if rngs is not None else [np.random.default_rng() for _ in rows]
    finished = finished if finished is not None else np.zeros(B, dtype=bool)
    finished |= limits == 0
    if steps == 0:
        return
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = np.zeros((B, model.config.vocab_size), dtype=bool)
        for b, r in enumerate(rows):
            seen[b, r] = True
    max_len = max(lengths) + steps
    decoder = model.decoder(rows, max_len) if hasattr(model, "decoder") else TorchDecoder(model, rows, max_len,
                                                                                          use_cache)
    try:
        logits = decoder.first()
        for step in range(steps):
            next_token = sample_next(logits, cfg, rngs, seen)
            if stop_tokens:
                next_token[finished] = stop_tokens[0]
                finished |= np.isin(next_token, stop_tokens)
            finished |= limits <= step + 1
            yield next_token
            if finished.all():
                break
            if seen is not None:
                seen[np.arange(B), next_token] = True
            logits = decoder.next(next_token)
    finally:
        decoder.close()


def generate_tokens(model, prompt: list[int], cfg: SamplingConfig, stop_tokens: tuple[int, ...] = (),
                    use_cache: bool = True) -> Iterator[np.ndarray]:
    """cfg.num_samples samples of one prompt: the next token of each (a (B,) array) per step."""
    seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little")
    rngs = [row_rng(seed, prompt, k) for k in range(cfg.num_samples)]
    yield from decode_rows(model, [prompt] * cfg.num_samples, cfg, rngs, stop_tokens, use_cache=use_cache)


# --- text ----------------------------------------------------------------------------------------------------------

class TextStream:
    """Turns token ids arriving one at a time into text that is safe to print.

    Never splits a UTF-8 character, and holds back text that could be the start of a stop string; `stopped` is set
    once a stop string appears (it and what follows are never returned). Special tokens (a chat template's
    <|im_start|>, ...) are never text. `after`: the token before the first one pushed (the prompt's last), so that
    the first word keeps its leading space.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), after: int | None = None):
        self.tokenizer, self.stop = tokenizer, stop
        self.prefix = [after] if after is not None else []
        self.skip = len(tokenizer.decode(self.prefix, skip_special=True))
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already returned
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.prefix + self.ids, skip_special=True)[self.skip:]

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd"):  # an incomplete byte sequence; wait for the rest of the character
            return ""
        end = len(text)
        for s in self.stop:
            found = text.find(s, max(0, self.emitted - len(s)))
            if found != -1 and found < end:
                end, self.stopped = found, True
        if not self.stopped:  # hold back the longest end of the text that begins a stop string
            held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            end = len(text) - held
        new, self.emitted = text[self.emitted:end], max(self.emitted, end)
        return new

    def flush(self) -> str:
        """The rest of the text at the end of generation (nothing more once a stop string was seen)."""
        if self.stopped:
            return ""
        text = self.text()
        new, self.emitted = text[self.emitted:], len(text)
        return new


def encode_prompt(tokenizer: Tokenizer, prompt: str, context: int, truncate: bool, log=None,
                  add_start: bool = True) -> list[int]:
    """The prompt's ids after the tokenizer's start-of-text token (unless add_start is False, or the prompt starts
    with it: a chat template writes its own), fitted into the context. Raises LLMError when it does not fit and
    truncate is False."""
    ids = tokenizer.encode(prompt)
    start = tokenizer.start_of_text
    ids = ([start] if add_start and start is not None and ids[:1] != [start] else []) + ids
    if not ids:
        raise LLMError("the prompt is empty and the tokenizer has no token to start a text from (<|endoftext|> or <s>)")
    if len(ids) >= context:
        if not truncate:
            raise LLMError(f"the prompt is {len(ids)} tokens but the model's context is {context}; "
                           f"shorten it or pass --truncate to keep its last {context - 1} tokens")
        if log:
            log(f"the prompt is {len(ids)} tokens; keeping its last {context - 1} (the context is {context})")
        ids = ids[-(context - 1):]
    return ids


@dataclass
class Sample:
    """One sample of one prompt, and what happened while it was generated."""
    prompt: str  # as given
    index: int  # of the prompt in the input
    sample: int  # number of the sample of this prompt
    ids: list[int]  # the tokens of the templated prompt
    templated_prompt: str = ""  # the text the model continued: the prompt in the model's template
    text: str = ""
    new_tokens: int = 0
    finish_reason: str = "length"  # stop, length or eos
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0  # from the first token to the last
    stream: TextStream | None = field(default=None, repr=False)

    def record(self, load_s: float | None = None) -> dict:
        rate = (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else None
        return {"prompt": self.prompt, "templated_prompt": self.templated_prompt, "index": self.index,
                "sample": self.sample, "text": self.text,
                "prompt_tokens": len(self.ids), "new_tokens": self.new_tokens, "finish_reason": self.finish_reason,
                "load_s": None if load_s is None else round(load_s, 4),
                "time_to_first_token_s": round(self.time_to_first_token_s, 4),
                "tokens_per_s": None if rate is None else round(rate, 2)}


def generate_samples(model, tokenizer: Tokenizer, prompts: Iterable[str], cfg: SamplingConfig,
                     truncate: bool = False, log=None, on_text: Callable[[Sample, str], None] | None = None,
                     template: Callable[[str], str] | None = None, ready: Callable[[], bool] | None = None
                     ) -> Iterator[Sample]:
    """Every sample of every prompt, finished, in input order; prompts x samples decode cfg.batch_size at a time.

    Prompts are read lazily, at most a batch ahead: an endless input streams. template(prompt): the text the model
    continues (default: the prompt). ready(): whether another prompt can be read without waiting; when it says no,
    the batch decodes with the prompts it has, so that a prompt arriving by a pipe is answered without waiting for
    the next. on_text(sample, text) is called with each piece of text as soon as it is safe to print.
    """
    cfg.check()
    seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little")
    context = model.config.context
    warned = False

    def rows() -> Iterator[Sample]:
        nonlocal warned
        for index, prompt in enumerate(prompts):
            text = template(prompt) if template else prompt
            ids = encode_prompt(tokenizer, text, context, truncate, log)
            if log and not warned and len(ids) + cfg.max_new_tokens > context:
                room = context - len(ids)
                log(f"the context ({context} tokens) leaves room for {room} new token{'s' * (room != 1)}")
                warned = True
            for k in range(cfg.num_samples):
                yield Sample(prompt, index, k, ids, text)

    batch: list[Sample] = []
    for sample in rows():
        batch.append(sample)
        # the last sample of a prompt, and no next prompt to be had now: decode what there is
        waiting = sample.sample == cfg.num_samples - 1 and ready is not None and not ready()
        if len(batch) == cfg.batch_size or waiting:
            yield from _generate_batch(model, tokenizer, batch, cfg, seed, on_text)
            batch = []
    if batch:
        yield from _generate_batch(model, tokenizer, batch, cfg, seed, on_text)


def _generate_batch(model, tokenizer, batch: list[Sample], cfg: SamplingConfig, seed: int, on_text):
    # --ignore-eos: no token ends a sample (fixed-length runs); the stop strings still do
    stops = () if cfg.ignore_eos else tuple(dict.fromkeys(tokenizer.stop_tokens + tuple(cfg.stop_tokens)))
    for s in batch:
        s.stream = TextStream(tokenizer, cfg.stop, after=s.ids[-1])
    rngs = [row_rng(seed, s.ids, s.sample) for s in batch]
    finished = np.zeros(len(batch), dtype=bool)
    done = [False] * len(batch)
    start = time.perf_counter()
    first = None
    for tokens in decode_rows(model, [s.ids for s in batch], cfg, rngs, stops, finished):
        now = time.perf_counter()
        if first is None:
            first = now
        for b, token in enumerate(tokens.tolist()):
            if done[b]:
                continue
            s = batch[b]
            if token in stops:
                s.finish_reason, done[b] = "eos", True
            else:
                s.new_tokens += 1
                text = s.stream.push(token)
                if text and on_text:
                    on_text(s, text)
                if s.stream.stopped:
                    s.finish_reason, done[b] = "stop", True
                    finished[b] = True  # tell the decoder to stop this row
                elif finished[b]:
                    done[b] = True  # its length limit
            if done[b]:
                s.time_to_first_token_s, s.decode_s = first - start, now - first
    for b, s in enumerate(batch):
        if not done[b]:  # no new tokens at all (no room in the context, or --max-new-tokens 0)
            s.time_to_first_token_s = (first or time.perf_counter()) - start
        rest = s.stream.flush()
        if rest and on_text:
            on_text(s, rest)
        s.text = s.stream.text()[:s.stream.emitted]
        yield s


def generate_text(model, tokenizer: Tokenizer, prompts: Iterable[str], cfg: SamplingConfig,
                  truncate: bool = False, out: TextIO = sys.stdout, log=None, as_json: bool = False,
                  load_s: float | None = None, template: Callable[[str], str] | None = None,
                  ready: Callable[[], bool] | None = None, several: bool | None = None):
    """Write the samples of the prompts to out, each batch's as soon as it is done (see generate_samples).

    One prompt and one sample: the text streamed as it is produced, then a newline. Several prompts (or samples),
    or `several` (a stream of prompts, however many come): each sample's text followed by a line `<|endoftext|>`, in
    input order. as_json: one JSON object a sample.
    """
    prompts = iter(prompts)
    if several is None:  # one prompt or more: known by reading a second one, not the whole input
        ahead = list(itertools.islice(prompts, 2))
        several = len(ahead) > 1
        prompts = itertools.chain(ahead, prompts)
    stream = not several and cfg.num_samples == 1 and not as_json

    def write(sample, text):
        out.write(text)
        out.flush()

    empty = True
    for sample in generate_samples(model, tokenizer, prompts, cfg, truncate, log, write if stream else None,
                                   template, ready):
        empty = False
        if as_json:
            out.write(json.dumps(sample.record(load_s), ensure_ascii=False) + "\n")
        elif stream:
            out.write("\n")
        else:
            out.write(sample.text + "\n" + SEPARATOR + "\n")
        out.flush()
    if empty and log:  # the rule for empty input (README): no output, said on stderr, exit 0
        log("the input is empty: no prompts, no samples")
