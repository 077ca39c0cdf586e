"""One row of a batch as it decodes: its prompt, random generator, seen tokens, text stream, limits and why it ended.

A row's random numbers come from row_rng(seed, prompt, sample), so the same seed gives the same text whatever else is
in the batch. Text is streamed as it is produced: the bytes of a character split across tokens, and any text that
could be the start of a stop string, are held back until they are known to be printable. Finish reasons are OpenAI's:
"stop" (an end token or a stop string) or "length" (the token limit or the end of the context).
"""

import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from llmcli.errors import LLMError
from llmcli.infer.sampler import bias_vector
from llmcli.text.tokenizer import Tokenizer


def row_rng(seed: int, prompt: list[int], sample: int) -> np.random.Generator:
    """The random numbers of sample number `sample` of a prompt: the same whatever the batch around it."""
    key = zlib.crc32(np.asarray(prompt, dtype=np.int64).tobytes())
    return np.random.default_rng(np.random.SeedSequence([seed, key, sample]))



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
class Row:
    """A sample being decoded. accept(token) takes each sampled token and returns its printable text; once the row
    is finished, finish_reason is set and accept() must not be called again."""
    ids: list[int]  # the prompt
    rng: np.random.Generator
    stream: TextStream | None  # None: token ids only, no text (a model without a tokenizer: tests, benchmarks)
    limit: int  # most new tokens, the end of the context included
    stop_tokens: frozenset[int]  # ids that end the row (the tokenizer's end tokens, a chat turn's end)
    seen: np.ndarray | None = None  # (vocab,) bool: tokens of the prompt and the sample, for the repetition penalty
    counts: np.ndarray | None = None  # (vocab,) times each token was generated: presence and frequency penalties
    bias: np.ndarray | None = None  # (vocab,) added to the logits: logit_bias, -inf at the end tokens (ignore_eos)
    tokens: list[int] = field(default_factory=list)  # the new tokens (an end token not among them)
    last: int = 0  # the token the next decode step feeds
    finish_reason: str | None = None  # "stop" or "length" once finished
    joined_at: float = field(default_factory=time.perf_counter)  # when its first token was sampled
    finished_at: float = 0.0
    scores: list = field(default_factory=list)  # (token, log-probability, alternatives) of the new tokens, if asked
    reported: int = 0  # of them, those already reported
    job: object = None  # what the row belongs to, and which of its rows it is (the engine's)
    choice: int = 0

    @classmethod
    def start(cls, ids: list[int], cfg, tokenizer: Tokenizer | None, seed: int, sample: int, context: int,
              vocab_size: int) -> "Row":
        """Sample number `sample` of prompt ids, decoded with SamplingConfig cfg in a model of `context` tokens.
        cfg.ignore_eos: the end tokens are never sampled, no token ends the row (fixed-length runs); stop strings
        still do. tokenizer None: ids only. Raises LLMError for a logit_bias token outside the vocabulary."""
        seen = counts = None
        if cfg.repetition_penalty != 1.0:
            seen = np.zeros(vocab_size, dtype=bool)
            seen[ids] = True
        if cfg.presence_penalty != 0 or cfg.frequency_penalty != 0:
            counts = np.zeros(vocab_size, dtype=np.int64)
        ends = tuple(tokenizer.stop_tokens) if tokenizer is not None else ()
        stops = frozenset() if cfg.ignore_eos else frozenset(ends + tuple(cfg.stop_tokens))
        stream = TextStream(tokenizer, tuple(cfg.stop), after=ids[-1]) if tokenizer is not None else None
        return cls(ids, row_rng(seed, ids, sample), stream, min(cfg.max_new_tokens, context - len(ids)), stops, seen,
                   counts, bias_vector(cfg, vocab_size, ends + tuple(cfg.stop_tokens)))

    def accept(self, token: int, scored: tuple | None = None) -> str:
        """Add a sampled token (and its log-probabilities, `scored`): its printable text (maybe none yet); finishes
        the row at a stop token, a stop string or the limit."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if token in self.stop_tokens:
            return self.finish("stop")
        self.tokens.append(token)
        if scored is not None:
            self.scores.append(scored)
        self.last = token
        text = self.stream.push(token) if self.stream is not None else ""
        if self.stream is not None and self.stream.stopped:
            return text + self.finish("stop")
        if len(self.tokens) >= self.limit:
            return text + self.finish("length")
        return text

    def finish(self, reason: str) -> str:
        """End the row (reason "stop" or "length"); returns the text held back until now."""
        self.finish_reason, self.finished_at = reason, time.perf_counter()
        return self.stream.flush() if self.stream is not None else ""

    def new_scores(self) -> list:
        """The log-probabilities of the tokens added since the last call."""
        new, self.reported = self.scores[self.reported:], len(self.scores)
        return new

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    def text(self) -> str:
        """The text of the sample so far (what was returned, never what a stop string cut)."""
        return self.stream.text()[:self.stream.emitted] if self.stream is not None else ""
