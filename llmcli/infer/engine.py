"""The one decoder: rows join and leave a running batch, each on its own (continuous batching).

Every caller decodes here: `llm generate` and `llm chat` and the Python API through run(jobs), in their own thread;
`llm serve` through start() and submit(), a thread of its own serving concurrent requests. Each turn of the loop
prefills one chunk of the waiting prompts, then runs one decode step of every row of the batch. Prompts are
prefilled into a cache of their own, a chunk a turn (each distinct prompt once: the samples of a prompt share its keys
and values), so that the rows already decoding wait at most one chunk for a long prompt; once prefilled, their keys
and values are copied into rows of the batch's cache and they decode with the others from the next step on. A row
leaves as soon as it is finished (an end token, a stop string, its token limit) or its job is cancelled.

Each row (llmcli/infer/rows.py) keeps its sampling settings, its random generator row_rng(seed, prompt, sample), its
repetition-penalty mask and its text stream, so the same seed gives the same text, and greedy decoding the same
tokens, whatever else is in the batch.

The layout of the batch's cache (max_batch rows of max_len slots, allocated at once or grown as needed): rows are the first B rows of
the cache and share one axis of slots. Row b holds its tokens in slots pad[b]..P-1, P being the slot the next step
writes: a left-padded row, whose positions start after its padding and whose tokens never attend to padding (nor to
what earlier rows left in those slots). A prompt of L tokens joins at slots P-L..P-1. When the slots run out, all
rows move left by the smallest padding; when a new prompt is longer than P, right. A row that leaves is overwritten
by the last row.
"""

import os
import threading
import traceback
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from llmcli import runtime
from llmcli.infer.backend import backend_for
from llmcli.infer.rows import Row
from llmcli.infer.sampler import SamplingConfig, log_softmax, sample_next, sampling_key
from llmcli.model.batching import distinct_rows, left_pad


class QueueFull(Exception):
    """More requests are waiting than the engine's max_queue."""


@dataclass
class Job:
    """One request: its prompts (token ids) times n choices, decoded with one sampling config.

    emit(events) is called from the engine's thread with a list of events at a time: ("text", choice, text,
    scored), scored the new tokens' (token, log-probability, [(token, log-probability)] alternatives) if logprobs,
    ("finish", choice, finish_reason, completion_tokens, row) and, if the job failed, ("error", message). Choice i is
    sample first_sample + i % n of prompt i // n; finish_reason is "stop" (an end token or a stop string) or "length"
    (max_new_tokens or the end of the context).
    """
    prompts: list[list[int]]
    cfg: SamplingConfig
    emit: Callable[[list], None]
    n: int = 1
    seed: int | None = None
    first_sample: int = 0
    logprobs: int | None = None  # each new token's log-probability and this many most likely alternatives'
    cancelled: bool = False  # its client is gone, or it failed: its rows leave at the next step

    def __post_init__(self):
        if self.seed is None:
            self.seed = int.from_bytes(os.urandom(4), "little")

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class Prefill:
    """The prompts of some waiting jobs going through the model together, a chunk of columns a turn."""
    jobs: list[Job]
    prompts: list[list[int]]  # distinct prompts, in the order of the rows of tokens
    tokens: np.ndarray  # (N, T) left-padded
    pad: np.ndarray  # (N,)
    cache: object = None
    done: int = 0  # columns prefilled
    logits: np.ndarray | None = None  # (N, vocab) at the last position, once done


def scored(job: Job, logits: np.ndarray, token: int) -> tuple | None:
    """(token, its log-probability, the job.logprobs most likely (token, log-probability)) under the model's own
    distribution, log_softmax of its logits (as OpenAI reports them); None if the job asks for none."""
    if job.logprobs is None:
        return None
    logprobs = log_softmax(logits)
    top = np.argsort(-logprobs, kind="stable")[:job.logprobs]
    return token, float(logprobs[token]), [(int(t), float(logprobs[t])) for t in top]


class Engine:
    """Decodes jobs together: run(jobs) in the caller's thread, or start() a thread of its own and submit() to it.

    model: a loaded model (our torch Transformer or a NumpyTransformer) or its backend (llmcli/infer/backend.py).
    max_batch: most rows decoding together. max_queue: most jobs waiting for a row when none is free; submit() raises
    QueueFull past it. preallocate: the cache for max_batch rows of the whole context at once (a server: it fails at
    the start, not under load), else grown as rows and slots are needed (`llm generate` of a model of a long context).
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, log=None,
                 preallocate: bool = True):
        self.backend = model if hasattr(model, "copy_rows") else backend_for(model)
        self.model, self.tokenizer = self.backend.model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.log = log or (lambda message: None)
        self.context = self.backend.config.context
        # slots beyond the context: the rows move left once every most_slots - context steps at most
        self.most_slots = self.context + max(16, self.context // 4)
        self.cache_rows, self.max_len = (max_batch, self.most_slots) if preallocate else (1, min(self.most_slots, 256))
        self.cache = self.backend.allocate(self.cache_rows, self.max_len)
        self.rows: list[Row] = []
        self.pad: list[int] = []  # of each row: its first slot
        self.P = 0  # the slot the next decode step writes
        self.waiting: deque[Job] = deque()
        self.prefill: Prefill | None = None
        self.calls: deque[tuple[Callable, Future]] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.raising = False  # run(): a failure is the caller's exception, not a failed request
        self.finished: list[Row] = []  # run(): rows finished during this turn
        self.thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)

    # --- the caller's thread: run(jobs) ----------------------------------------------------------------------------

    def run(self, jobs: Iterable[Job], ready: Callable[[], bool] | None = None) -> Iterator[list[Row]]:
        """Decode jobs in this thread until every one is done, their events going to their emit as they happen;
        yields after each turn the rows that finished in it (often none).

        A job is taken from `jobs` when rows are free for it, so a generator reading prompts from a pipe joins the
        running batch as its lines arrive. ready(): whether the next job can be had without waiting; while rows
        decode, the next is taken only when it says so. Exceptions (Ctrl-C included) reach the caller; the engine
        is then empty again.
        """
        jobs, more = iter(jobs), True
        self.raising = True
        try:
            while True:
                while more and self._free_rows() > 0 and (ready is None or not self._working() or ready()):
                    job = next(jobs, None)
                    if job is None:
                        more = False
                    else:
                        self._check(job)
                        self.waiting.append(job)
                if not self._working():
                    if not more:
                        return
                    continue
                self._turn()
                finished, self.finished = self.finished, []
                yield finished
        finally:
            self.finished = []
            self.raising = False
            self.waiting.clear()
            self.prefill = None
            self._leave(list(range(len(self.rows))))

    def _working(self) -> bool:
        return bool(self.rows or self.waiting or self.prefill)

    def _free_rows(self) -> int:
        prefill = self.prefill  # (the engine's thread changes it without the lock)
        taken = len(self.rows) + sum(j.rows for j in self.waiting) + (sum(j.rows for j in prefill.jobs)
                                                                      if prefill else 0)
        return self.max_batch - taken

    def _check(self, job: Job):
        if job.rows > self.max_batch:
            raise ValueError(f"{job.rows} choices (prompts x n) are more than the server's --max-batch "
                             f"{self.max_batch}")

    # --- other threads: start(), submit() -------------------------------------------------------------------------

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
        self._check(job)
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

    def _loop(self):
        while True:
            with self.cond:
                while not (self.stopping or self._working() or self.calls):
                    self.cond.wait()
                if self.stopping and not (self._working() or self.calls):
                    return
                calls = list(self.calls)
                self.calls.clear()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:
                        future.set_exception(e)
            self._turn()

    # --- one turn: a chunk of prefill, a decode step ----------------------------------------------------------------

    def _turn(self):
        runtime.follow_load()  # a long-running loop: on the cores other processes leave idle
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

    def _fail(self, jobs: list[Job]):
        """Log the exception being handled and tell each job it failed; their rows leave at the next step. Under
        run(), raise it instead."""
        if self.raising:
            raise
        self.log(traceback.format_exc().rstrip())
        for job in jobs:
            if not job.cancelled:
                job.cancelled = True
                self._emit(job, [("error", "the server failed on this request (logged)")])

    def _emit(self, job: Job, events: list):
        if self.raising:
            job.emit(events)
            return
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
                distinct = len(set(map(tuple, prompts + job.prompts)))
                if job.rows > free or (jobs and distinct * longest > runtime.PREFILL_TOKENS):
                    break
                jobs.append(self.waiting.popleft())
                prompts += job.prompts
                free -= job.rows
        if not jobs:
            return None
        first, _ = distinct_rows(prompts)
        prompts = [prompts[i] for i in first]
        tokens, pad = left_pad(prompts)
        return Prefill(jobs, prompts, tokens.astype(np.int64), pad.astype(np.int64))

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
        if p.cache is None:
            p.cache = self.backend.allocate(N, T)
        columns = max(1, runtime.PREFILL_TOKENS // N)
        logits = self.backend.prefill(p.cache, p.tokens[:, p.done:p.done + columns], p.done, p.pad)
        p.done += columns
        if p.done >= T:
            p.logits = logits
            self.prefill = None
            self._join(p)

    def _join(self, p: Prefill):
        """The first token of every choice of the prefilled jobs; the choices that go on take rows of the batch."""
        number = {tuple(ids): i for i, ids in enumerate(p.prompts)}
        T = p.tokens.shape[1]
        for job in p.jobs:
            if job.cancelled:
                continue
            try:
                rows = [self._new_row(job, choice) for choice in range(job.rows)]
                logits = p.logits[[number[tuple(row.ids)] for row in rows]]
                events, going_on = [], []
                for row, token, row_logits in zip(rows, self._sample(rows, logits), logits):
                    token = int(token)
                    text = row.finish("length") if row.limit == 0 else row.accept(token, scored(job, row_logits, token))
                    self._events(row, text, events)
                    if row.finish_reason is None:
                        going_on.append(row)
                self._emit(job, events)
                for row in going_on if not job.cancelled else []:
                    self._reserve(len(self.rows) + 1, max(self.P, len(row.ids)))
                    if self.P < len(row.ids):
                        self._move(len(row.ids) - self.P)
                    b, L = len(self.rows), len(row.ids)
                    self.backend.copy_rows(p.cache, number[tuple(row.ids)], slice(T - L, T), self.cache, b,
                                           slice(self.P - L, self.P))
                    self.rows.append(row)
                    self.pad.append(self.P - L)
            except Exception:
                self._fail([job])

    def _new_row(self, job: Job, choice: int) -> Row:
        row = Row.start(job.prompts[choice // job.n], job.cfg, self.tokenizer, job.seed,
                        job.first_sample + choice % job.n, self.context, self.backend.config.vocab_size)
        row.job, row.choice = job, choice
        return row

    @staticmethod
    def _sample(rows: list[Row], logits: np.ndarray) -> np.ndarray:
        """The next token of each row; the rows' jobs have the same sampling settings (sample_next's work is per
        row, but its calls cost too)."""
        seen = np.stack([row.seen for row in rows]) if rows[0].seen is not None else None
        counts = np.stack([row.counts for row in rows]) if rows[0].counts is not None else None
        bias = None
        if any(row.bias is not None for row in rows):
            bias = np.stack([row.bias if row.bias is not None else np.zeros(logits.shape[-1]) for row in rows])
        return sample_next(logits, rows[0].job.cfg, [row.rng for row in rows], seen, counts, bias)

    def _events(self, row: Row, text: str, events: list):
        scores = row.new_scores()
        if text or scores:
            events.append(("text", row.choice, text, scores))
        if row.finish_reason is not None:
            events.append(("finish", row.choice, row.finish_reason, row.new_tokens, row))
            if self.raising:
                self.finished.append(row)

    def _step(self):
        """One decode step of every row; finished rows leave."""
        if self.P == self.max_len:  # out of slots: move left, or grow where little would be won
            if self.max_len < self.most_slots and min(self.pad) < self.max_len // 4:
                self._reserve(len(self.rows), self.max_len + 1)
            else:
                self._move(-min(self.pad))
        tokens = np.array([row.last for row in self.rows], dtype=np.int64)
        logits = self.backend.step(self.cache, tokens, self.P, np.array(self.pad, dtype=np.int64))
        self.P += 1
        groups: dict[tuple, list[int]] = {}  # rows by sampling settings
        for b, row in enumerate(self.rows):
            groups.setdefault(sampling_key(row.job.cfg), []).append(b)
        tokens = np.zeros(len(self.rows), dtype=np.int64)
        for indices in groups.values():
            rows = [self.rows[b] for b in indices]
            if len(groups) == 1:
                indices = slice(None)  # (the common case: no copy of the logits)
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
                token = int(tokens[b])
                text = row.accept(token, scored(row.job, logits[b], token))
                self._events(row, text, events.setdefault(id(row.job), (row.job, []))[1])
                if row.finish_reason is not None:
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
                self.backend.copy_rows(self.cache, last, slice(None), self.cache, b, slice(None))
                self.rows[b], self.pad[b] = self.rows[last], self.pad[last]
            self.rows.pop()
            self.pad.pop()
        if not self.rows:
            self.P = 0

    def _reserve(self, rows: int, slots: int):
        """Grow the batch's cache (doubling, up to max_batch rows of most_slots slots) to hold rows x slots."""
        if rows <= self.cache_rows and slots <= self.max_len:
            return
        new_rows = min(self.max_batch, max(rows, 2 * self.cache_rows if rows > self.cache_rows else self.cache_rows))
        new_slots = min(self.most_slots, max(slots, 2 * self.max_len if slots > self.max_len else self.max_len))
        cache = self.backend.allocate(new_rows, new_slots)
        if self.rows:
            B = len(self.rows)
            self.backend.copy_rows(self.cache, slice(0, B), slice(0, self.P), cache, slice(0, B), slice(0, self.P))
        self.cache, self.cache_rows, self.max_len = cache, new_rows, new_slots

    def _move(self, d: int):
        """Move every row's keys and values d slots to the right (left when d < 0)."""
        B, start = len(self.rows), min(self.pad, default=self.P)
        if B:
            self.backend.copy_rows(self.cache, slice(0, B), slice(start, self.P), self.cache, slice(0, B),
                                   slice(start + d, self.P + d))
        self.pad = [p + d for p in self.pad]
        self.P += d
