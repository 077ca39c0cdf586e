"""`llm generate`: prompts in, samples out, through the one decoder (llmcli/infer/engine.py).

Prompts and samples decode together as the rows of one batch, cfg.batch_size at most; a prompt read from a pipe joins
the running batch as soon as it arrives. Every row draws from its own random generator, seeded by (seed, prompt,
sample number), so the same seed gives the same text whatever else is in the batch.
"""

import itertools
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TextIO

from llmcli.infer.engine import Engine, Job
from llmcli.infer.rows import Row, encode_prompt
from llmcli.infer.sampler import SamplingConfig
from llmcli.text.tokenizer import Tokenizer

SEPARATOR = "<|endoftext|>"  # the line after each sample when there are several


def apply_template(template: str, prompt: str) -> str:
    """The prompt wrapped in the model's template; an empty prompt stays empty (the start of a document)."""
    return template.replace("{prompt}", prompt) if prompt else prompt


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
    finish_reason: str = "length"  # "stop" (an end token or a stop string) or "length"
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0  # from the first token to the last
    tokens: list[int] = field(default_factory=list, repr=False)  # the new tokens
    started: float = field(default_factory=time.perf_counter, repr=False)
    done: bool = field(default=False, repr=False)

    def finish(self, row: Row):
        self.text, self.tokens, self.finish_reason = row.text(), row.tokens, row.finish_reason
        self.new_tokens, self.done = row.new_tokens, True
        self.time_to_first_token_s = row.joined_at - self.started
        self.decode_s = row.finished_at - row.joined_at

    def record(self, load_s: float | None = None) -> dict:
        rate = (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else None
        return {"prompt": self.prompt, "templated_prompt": self.templated_prompt, "index": self.index,
                "sample": self.sample, "text": self.text,
                "prompt_tokens": len(self.ids), "new_tokens": self.new_tokens, "finish_reason": self.finish_reason,
                "load_s": None if load_s is None else round(load_s, 4),
                "time_to_first_token_s": round(self.time_to_first_token_s, 4),
                "tokens_per_s": None if rate is None else round(rate, 2)}


def generate_samples(model, tokenizer: Tokenizer | None, prompts: Iterable[str | list[int]], cfg: SamplingConfig,
                     truncate: bool = False, log=None, on_text: Callable[[Sample, str], None] | None = None,
                     template: Callable[[str], str] | None = None, ready: Callable[[], bool] | None = None,
                     engine: Engine | None = None) -> Iterator[Sample]:
    """Every sample of every prompt, finished, in input order, each as soon as it and those before it are done.

    model: a loaded model (or None with `engine`: an Engine of it, kept between calls). prompts: texts, or token ids
    (then as they are: no template, no start token). Prompts are read lazily, only when a row is free for them: an
    endless input streams. template(prompt): the text the model continues (default: the prompt). ready(): whether
    another prompt can be read without waiting (see Engine.run). on_text(sample, text) is called with each piece of
    text as soon as it is safe to print. Raises LLMError for settings out of range or a prompt that does not fit.
    """
    cfg.check()
    seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little")
    engine = engine or Engine(model, tokenizer, max_batch=cfg.batch_size, preallocate=False)
    context, warned = engine.context, False
    pending: deque[Sample] = deque()  # in input order, until yielded

    def events(sample: Sample, new: list):
        for event in new:
            if event[0] == "text" and on_text:
                on_text(sample, event[2])
            elif event[0] == "finish":
                sample.finish(event[4])

    def jobs() -> Iterator[Job]:
        nonlocal warned
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                text = template(prompt) if template else prompt
                ids = encode_prompt(tokenizer, text, context, truncate, log)
            else:
                text, ids = "", list(prompt)
            if log and not warned and len(ids) + cfg.max_new_tokens > context:
                room = context - len(ids)
                log(f"the context ({context} tokens) leaves room for {room} new token{'s' * (room != 1)}")
                warned = True
            for k in range(cfg.num_samples):
                sample = Sample(prompt, index, k, ids, text)
                pending.append(sample)
                yield Job([ids], cfg, lambda new, sample=sample: events(sample, new), seed=seed, first_sample=k)

    for _ in engine.run(jobs(), ready):
        while pending and pending[0].done:
            yield pending.popleft()


def decode(model, rows: list[list[int]], cfg: SamplingConfig, tokenizer: Tokenizer | None = None) -> list[list[int]]:
    """The new token ids of each row of prompt ids (sample k of a prompt that comes k + 1-th times), decoded
    together through the engine; cfg.seed (default 0) seeds them. tokenizer None: no end token, no text."""
    cfg = SamplingConfig(**{**vars(cfg), "num_samples": 1, "seed": 0 if cfg.seed is None else cfg.seed,
                            "batch_size": max(cfg.batch_size, len(rows))})
    seen: dict[tuple, int] = {}
    jobs, out = [], {}
    for b, ids in enumerate(rows):
        k = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
        jobs.append(Job([list(ids)], cfg, lambda new, b=b: out.update({b: e[4].tokens for e in new
                                                                            if e[0] == "finish"}),
                        seed=cfg.seed, first_sample=k))
    for _ in Engine(model, tokenizer, max_batch=len(rows), preallocate=False).run(jobs):
        pass
    return [out[b] for b in range(len(rows))]


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
