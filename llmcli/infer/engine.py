"""Continuous batching: concurrent requests share the model's decode steps, each joining and leaving on its own.

One thread runs the model. Each turn of its loop prefills one chunk of the waiting prompts, then runs one decode
step of every row of the batch. A request's prompts are prefilled into a cache of their own, a chunk a turn, so that
the rows already decoding wait at most one chunk for a long prompt; once prefilled, their keys and values are
copied into rows of the batch's cache and they decode with the others from the next step on. A row leaves the batch
as soon as it is finished (end-of-text token, a stop string, its token limit) or its client is gone.

Each row keeps what `llm generate` gives it (llmcli/generate.py): its sampling settings, its random generator
row_rng(seed, prompt, sample), its repetition-penalty mask and its TextStream (UTF-8 and stop strings), so the same
seed gives the same text, and greedy decoding the same tokens, whatever else is in the batch.

The layout of the batch's cache (model.py's KVCache, allocated once for max_batch rows of max_len slots): rows are
the first B rows of the cache, and share one axis of slots. Row b holds its tokens in slots pad[b]..P-1, P being the
slot the next step writes: each row is a left-padded row of model.py's batch, whose positions start after its
padding and whose tokens never attend to padding (nor to what earlier rows left in those slots). A prompt of L tokens
joins at slots P-L..P-1. When the slots run out, all rows move left by the smallest padding; when a new prompt is
longer than P, right. A row that leaves is overwritten by the last row (a copy of one row).
"""

import os
import threading
import traceback
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from llmcli.infer.generate import (
    SamplingConfig,
    TextStream,
    decoding_layout,
    distinct_rows,
    left_pad,
    row_rng,
    sample_next,
)
from llmcli.model.numpy_steps import TorchKernels, kv_cache_arrays, runs_on_numpy

PREFILL_TOKENS = 512  # prompt tokens (padding included) prefilled per turn of the loop, between two decode steps


def sampling_key(cfg: SamplingConfig) -> tuple:
    """The settings sample_next reads: rows that agree on them are sampled together."""
    return cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repetition_penalty


class QueueFull(Exception):
    """More requests are waiting than the engine's max_queue."""


@dataclass
class Job:
    """One request: its prompts (token ids) times n choices, decoded with one sampling config.

    emit(events) is called from the engine's thread with a list of events at a time:
    ("text", choice, text), ("finish", choice, finish_reason, completion_tokens) and, if the request failed,
    ("error", message). Choice i is sample i % n of prompt i // n; finish_reason is "stop" (end-of-text token or
    stop string) or "length" (max_new_tokens or the end of the context).
    """
    prompts: list[list[int]]
    cfg: SamplingConfig
    emit: Callable[[list], None]
    n: int = 1
    seed: int | None = None
    cancelled: bool = False  # its client is gone, or it failed: its rows leave at the next step

    def __post_init__(self):
        if self.seed is None:
            self.seed = int.from_bytes(os.urandom(4), "little")

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class Row:
    """One choice of a job while it decodes: a row of the batch."""
    job: Job
    choice: int
    ids: list[int]  # the prompt
    rng: np.random.Generator
    stream: TextStream
    limit: int  # most new tokens, the end of the context included
    seen: np.ndarray | None  # (vocab,) tokens of the prompt and the sample, for the repetition penalty
    new_tokens: int = 0
    last: int = 0  # the token the next decode step feeds


@dataclass
class Prefill:
    """The prompts of some waiting jobs going through the model together, a chunk of columns a turn."""
    jobs: list[Job]
    prompts: list[list[int]]  # distinct prompts, in the order of the rows of tokens
    tokens: torch.Tensor  # (N, T) left-padded
    pad: torch.Tensor  # (N,)
    caches: list = field(default_factory=list)
    done: int = 0  # columns prefilled
    logits: np.ndarray | None = None  # (N, vocab) at the last position, once done


class Engine:
    """Runs a torch Transformer on all requests at once in a thread of its own (start(), stop()).

    max_batch: most rows decoding together (their keys and values are allocated up front). max_queue: most jobs
    waiting for a row when none is free; submit() raises QueueFull past it.
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, log=None):
        self.model, self.tokenizer = decoding_layout(model), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.log = log or (lambda message: None)
        self.context = model.config.context
        # slots beyond the context: the rows move left once every max_len - context steps at most
        self.max_len = self.context + max(16, self.context // 4)
        self.device = model.token_embedding.weight.device
        self.caches = model.setup_kv_cache(max_batch, self.max_len)
        # decode steps of a few rows run NumPy between the model's torch modules (llmcli/model/numpy_steps.py)
        self.steps, self.cache_arrays = None, None
        if runs_on_numpy(model):  # (NumPy views need a float32 cache in CPU memory)
            self.steps, self.cache_arrays = TorchKernels(model), kv_cache_arrays(self.caches)
        self.rows: list[Row] = []
        self.pad: list[int] = []  # of each row: its first slot
        self.P = 0  # the slot the next decode step writes
        self.waiting: deque[Job] = deque()
        self.prefill: Prefill | None = None
        self.calls: deque[tuple[Callable, Future]] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)

    # --- the other threads' side ----------------------------------------------------------------------------------

    def start(self):
        self.thread.start()

    def stop(self):
        """Finish the work in hand, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    def submit(self, job: Job):
        """Queue a job; raises QueueFull when max_queue jobs already wait, ValueError when it can never fit."""
        if job.rows > self.max_batch:
            raise ValueError(f"{job.rows} choices (prompts x n) are more than the server's --max-batch "
                             f"{self.max_batch}")
        with self.cond:
            prefill = self.prefill  # (the engine's thread changes it without the lock)
            taken = len(self.rows) + (sum(j.rows for j in prefill.jobs) if prefill else 0)
            if len(self.waiting) - max(0, self.max_batch - taken) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job):
        """Forget a job (its client is gone): its rows leave the batch at the next step."""
        with self.cond:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
            self.cond.notify()

    def call(self, fn: Callable) -> Future:
        """Run fn() on the engine's thread between two steps, with the model to itself (no cache attached)."""
        future = Future()
        with self.cond:
            self.calls.append((fn, future))
            self.cond.notify()
        return future

    def busy(self) -> dict:
        return {"decoding": len(self.rows), "waiting": len(self.waiting)}

    # --- the engine's thread --------------------------------------------------------------------------------------

    def _loop(self):
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not (self.stopping or self.waiting or self.rows or self.prefill or self.calls):
                        self.cond.wait()
                    if self.stopping and not (self.waiting or self.rows or self.prefill or self.calls):
                        return
                    calls = list(self.calls)
                    self.calls.clear()
                for fn, future in calls:
                    self._call(fn, future)
                try:
                    self._prefill_chunk()
                except Exception:  # a prefill that fails fails its requests only
                    self._fail(self.prefill.jobs if self.prefill else [])
                    self.prefill = None
                self._leave([b for b, row in enumerate(self.rows) if row.job.cancelled])
                if self.rows:
                    try:
                        self._step()
                    except Exception:  # a failed forward pass: every row's request fails, the server goes on
                        self._fail(list({id(r.job): r.job for r in self.rows}.values()))
                        self._leave(list(range(len(self.rows))))

    def _call(self, fn, future: Future):
        if not future.set_running_or_notify_cancel():
            return
        self.model.use_kv_caches([None] * len(self.caches))
        try:
            future.set_result(fn())
        except Exception as e:
            future.set_exception(e)
        finally:
            self.model.use_kv_caches(self.caches)

    def _fail(self, jobs: list[Job]):
        """Log the exception being handled and tell each job it failed; their rows leave at the next step."""
        self.log(traceback.format_exc().rstrip())
        for job in jobs:
            if not job.cancelled:
                job.cancelled = True
                self._emit(job, [("error", "the server failed on this request (logged)")])

    def _emit(self, job: Job, events: list):
        try:
            job.emit(events)
        except Exception:  # nobody listens any more (its event loop closed)
            job.cancelled = True

    def _next_prefill(self) -> Prefill | None:
        """The waiting jobs at the head of the queue that fit into the free rows and one prefill batch."""
        jobs, prompts, free = [], [], self.max_batch - len(self.rows)
        with self.cond:
            while self.waiting:
                job = self.waiting[0]
                longest = max(map(len, prompts + job.prompts))
                if job.rows > free or (jobs and len(set(map(tuple, prompts + job.prompts))) * longest > PREFILL_TOKENS):
                    break
                jobs.append(self.waiting.popleft())
                prompts += job.prompts
                free -= job.rows
        if not jobs:
            return None
        first, _ = distinct_rows(prompts)
        prompts = [prompts[i] for i in first]
        tokens, pad = left_pad(prompts)
        return Prefill(jobs, prompts, torch.from_numpy(tokens).to(self.device), torch.from_numpy(pad).to(self.device))

    def _prefill_chunk(self):
        """Prefill the next chunk of columns of the prompts in hand; when they are done, their rows join."""
        if self.prefill is None:
            self.prefill = self._next_prefill()
            if self.prefill is None:
                return
        p = self.prefill
        if all(job.cancelled for job in p.jobs):
            self.prefill = None
            return
        N, T = p.tokens.shape
        if not p.caches:
            p.caches = self.model.setup_kv_cache(N, T)
        columns = max(1, PREFILL_TOKENS // N)
        self.model.use_kv_caches(p.caches)
        try:
            logits = self.model(p.tokens[:, p.done:p.done + columns], pos=p.done, pad=p.pad, last_only=True)
        finally:
            self.model.use_kv_caches(self.caches)
        p.done += columns
        if p.done >= T:
            p.logits = logits[:, -1].float().cpu().numpy()
            self.prefill = None
            self._join(p)

    def _join(self, p: Prefill):
        """The first token of every choice of the prefilled jobs; the choices that go on take rows of the batch."""
        number = {tuple(ids): i for i, ids in enumerate(p.prompts)}
        T = p.tokens.size(1)
        for job in p.jobs:
            if job.cancelled:
                continue
            try:
                rows = [self._new_row(job, choice) for choice in range(job.rows)]
                logits = p.logits[[number[tuple(row.ids)] for row in rows]]
                events, going_on = [], []
                for row, token in zip(rows, self._sample(rows, logits)):
                    if row.limit == 0:
                        self._finish(row, "length", events)
                    elif self._accept(row, int(token), events):
                        going_on.append(row)
                self._emit(job, events)
                for row in going_on if not job.cancelled else []:
                    if self.P < len(row.ids):
                        self._move(len(row.ids) - self.P)
                    b, L, d = len(self.rows), len(row.ids), number[tuple(row.ids)]
                    for cache, prefilled in zip(self.caches, p.caches):
                        cache.k[b, :, self.P - L:self.P] = prefilled.k[d, :, T - L:T]
                        cache.v[b, :, self.P - L:self.P] = prefilled.v[d, :, T - L:T]
                    self.rows.append(row)
                    self.pad.append(self.P - L)
            except Exception:
                self._fail([job])

    def _new_row(self, job: Job, choice: int) -> Row:
        ids, sample = job.prompts[choice // job.n], choice % job.n
        seen = None
        if job.cfg.repetition_penalty != 1.0:
            seen = np.zeros(self.model.config.vocab_size, dtype=bool)
            seen[ids] = True
        return Row(job, choice, ids, row_rng(job.seed, ids, sample),
                   TextStream(self.tokenizer, tuple(job.cfg.stop), after=ids[-1]),
                   min(job.cfg.max_new_tokens, self.context - len(ids)), seen)

    @staticmethod
    def _sample(rows: list[Row], logits: np.ndarray) -> np.ndarray:
        """The next token of each row (as llm generate's decode_rows draws it); the rows' jobs have the same
        sampling settings (sample_next's work is per row, but its calls cost too)."""
        seen = np.stack([row.seen for row in rows]) if rows[0].seen is not None else None
        tokens = sample_next(logits, rows[0].job.cfg, [row.rng for row in rows], seen)
        if seen is not None:
            for row, token in zip(rows, tokens):
                row.seen[token] = True
        return tokens

    def _accept(self, row: Row, token: int, events: list) -> bool:
        """Add a sampled token to a row's text (events get its printable text); False once the row is finished."""
        if token in self.tokenizer.stop_tokens or token in row.job.cfg.stop_tokens:
            self._finish(row, "stop", events)
            return False
        row.new_tokens += 1
        row.last = token
        text = row.stream.push(token)
        if text:
            events.append(("text", row.choice, text))
        if row.stream.stopped:
            self._finish(row, "stop", events)
            return False
        if row.new_tokens >= row.limit:
            self._finish(row, "length", events)
            return False
        return True

    @staticmethod
    def _finish(row: Row, reason: str, events: list):
        rest = row.stream.flush()
        if rest:
            events.append(("text", row.choice, rest))
        events.append(("finish", row.choice, reason, row.new_tokens))

    def _step(self):
        """One decode step of every row; finished rows leave."""
        if self.P == self.max_len:
            self._move(-min(self.pad))
        tokens = np.array([[row.last] for row in self.rows], dtype=np.int64)
        B = len(self.rows)
        if self.steps is not None and self.steps.faster(B, self.P + 1):
            cache = [(k[:B], v[:B]) for k, v in self.cache_arrays]
            logits = self.steps.forward(tokens, self.P, cache, np.array(self.pad, dtype=np.int64))
        else:
            pad = torch.tensor(self.pad, device=self.device)
            logits = self.model(torch.from_numpy(tokens).to(self.device), pos=self.P, pad=pad)
            logits = logits[:, -1].float().cpu().numpy()
        self.P += 1
        groups: dict[tuple, list[int]] = {}  # rows by sampling settings
        for b, row in enumerate(self.rows):
            groups.setdefault(sampling_key(row.job.cfg), []).append(b)
        tokens = np.zeros(len(self.rows), dtype=np.int64)
        for indices in groups.values():
            rows = [self.rows[b] for b in indices]
            try:
                tokens[indices] = self._sample(rows, logits[indices])
            except Exception:  # these requests fail; the others go on
                self._fail(list({id(row.job): row.job for row in rows}.values()))
        events: dict[int, tuple[Job, list]] = {}
        done = []
        for b, row in enumerate(self.rows):
            if row.job.cancelled:
                continue
            try:
                if not self._accept(row, int(tokens[b]), events.setdefault(id(row.job), (row.job, []))[1]):
                    done.append(b)
            except Exception:  # this request fails; the others go on
                self._fail([row.job])
        for job, job_events in events.values():
            if job_events and not job.cancelled:
                self._emit(job, job_events)
        self._leave(done + [b for b, row in enumerate(self.rows) if row.job.cancelled])

    def _leave(self, indices: list[int]):
        """Remove rows from the batch: each is overwritten by the last row."""
        for b in sorted(set(indices), reverse=True):
            last = len(self.rows) - 1
            if b != last:
                for cache in self.caches:
                    cache.k[b] = cache.k[last]
                    cache.v[b] = cache.v[last]
                self.rows[b], self.pad[b] = self.rows[last], self.pad[last]
            self.rows.pop()
            self.pad.pop()
        if not self.rows:
            self.P = 0

    def _move(self, d: int):
        """Move every row's keys and values d slots to the right (left when d < 0)."""
        B, start = len(self.rows), min(self.pad, default=self.P)
        if B:
            for cache in self.caches:
                for buffer in (cache.k, cache.v):
                    buffer[:B, :, start + d:self.P + d] = buffer[:B, :, start:self.P].clone()
        self.pad = [p + d for p in self.pad]
        self.P += d
