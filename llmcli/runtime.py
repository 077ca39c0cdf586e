"""Machine tuning in one place: how this process runs on the machine as it is, and the thresholds that pick kernels.

configure(command) runs once per command, before torch is imported (llmcli.cli.main does it):
- OpenMP's waiting. Between parallel regions OpenMP's threads spin instead of sleeping: on cores of our own that saves
  a wake-up per region, beside a busy neighbour it burns the time slice its partner thread needs (docs/perf.md).
  Training (`pretrain`, `finetune`) keeps a fixed number of threads that sleep at once, so that its sums never depend
  on the machine's load (a resumed run repeats the uninterrupted one bit for bit); other commands keep the spinning.
- BLAS threads: NumPy decoding multiplies small matrices, where OpenBLAS's threads only add waiting (docs/perf.md).

The allocator is tuned for the work that needs it: return_freed_memory() before a model is quantized as it is read
(the loader calls it), so that the float32 blocks it drops go back to the system (docs/perf.md).

follow_load() is for long-running loops only (the decode engine's, evaluation's and embedding's batches): at most twice a second it measures how much
of our cores other processes kept busy (/proc/stat, less our own CPU time) and sets torch's threads to the idle ones
(threads_for). Never from a module's forward: a model's results must not depend on who else runs.

Values the user exported (OMP_WAIT_POLICY, KMP_BLOCKTIME, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS) are kept, and
commands other than training then leave the thread count as torch has it. This module imports no torch at import
time, and nothing under llmcli/model/ imports it: a module receives a threshold as an argument.
"""

import math
import os
import sys
import time

# --- thresholds: each set by the benchmark named beside it (its numbers: docs/perf.md) ------------------------------

# NumPy steps between torch's modules (llmcli/model/numpy_steps.py) against torch alone: benchmarks/decode_steps.py
MOST_ROWS = 8  # rows of a decode step up to which NumPy's steps are the faster
MOST_KEYS = 2048  # keys attended in one decode step (rows x slots) up to which NumPy's are the faster
# Parameters up to which `llm generate` decodes on NumPy without importing torch: benchmarks/cold_start.py
SMALL_MODEL = 30_000_000
# tokens x head_dim up to which bfloat16 training on a CPU attends in float32: benchmarks/train.py
FP32_ATTENTION_MAX = 256 * 64
# width from which `--precision auto` trains in bf16-mixed where the CPU has bfloat16: benchmarks/train.py
BF16_MIN_WIDTH = 256
# prompt tokens (padding included) the engine prefills per turn, between two decode steps: a choice, not yet measured
# (benchmarks/serve.py would show its effect on time to first token)
PREFILL_TOKENS = 512

# Read by the OpenMP runtime when torch loads it: waiting threads sleep at once (libgomp: OMP_WAIT_POLICY; Intel's
# runtime, which some torch builds and MKL use: KMP_BLOCKTIME, in milliseconds of spinning before sleeping).
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
FIXED_THREADS_COMMANDS = ("pretrain", "finetune")
INTERVAL = 0.5  # seconds between two looks at the machine's load
FIRST_LOOK = 0.1  # the first look, at the least this long after configure(): loading a model is long work too

_following = False  # whether follow_load() changes the thread count (configure() decides)
_last = None  # (monotonic time, busy seconds of our cores, our CPU seconds) at the last look
_most = _current = None  # torch's threads at the first look (never exceeded), and now


def configure(command: str | None = None):
    """Tune this process, and the processes it starts (torchrun's workers, the tokenizer's pool), for the command
    about to run ("pretrain", "generate", ...): see the module's docstring. Must run before torch is imported."""
    global _following, _last
    user_set = any(name in os.environ for name in (*PASSIVE, "OMP_NUM_THREADS"))
    training = command in FIXED_THREADS_COMMANDS
    if training:
        for name, value in PASSIVE.items():
            os.environ.setdefault(name, value)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read when NumPy is first imported
    _following = False
    if not user_set and not training:
        busy, ours = _times()
        # the first look compares with now: by then torch is imported, and a busy neighbour is seen before loading
        _following, _last = busy is not None, (time.monotonic(), busy, ours)


def return_freed_memory():
    """Make glibc's malloc give every block of 1 MB or more back to the system as soon as it is freed (mmap), instead
    of raising that threshold after each such free: for quantizing a model as it is read (its float32 blocks, read
    and dropped one after another, would stay with the process). Not for other work: large temporaries would fault
    in each of their pages at every use."""
    import ctypes

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc
            pass


def threads_for(cores: int, others: float, most: int) -> int:
    """Threads to run on when other processes kept `others` (a float) of our `cores` busy: the idle cores, at least
    one and at most `most`. A core counts as idle unless others use more than a quarter of it (a shell, a
    periodic daemon), since one thread too many costs far more than one too few."""
    return max(1, min(most, math.floor(cores - others + 0.25)))


def follow_load():
    """Follow the load: called by long-running loops (the decode engine's, evaluation's), it looks at the machine at most every
    INTERVAL seconds and sets torch's threads (process-wide) to threads_for(...), up to the count torch had at the
    first look. A no-op for training and where the user chose the threads or there is no /proc/stat."""
    global _following, _last, _most, _current
    torch = sys.modules.get("torch")  # (NumPy decoding never imports it: then there are no threads to set)
    if not _following or torch is None:
        return
    now = time.monotonic()
    if now - _last[0] < (INTERVAL if _current is not None else FIRST_LOOK):
        return
    busy, ours = _times()
    if busy is None:  # /proc/stat became unreadable (no file descriptor left, a sandbox): keep the threads as they are
        _following = False
        return
    if _most is None:
        _most = _current = torch.get_num_threads()
    others = ((busy - _last[1]) - (ours - _last[2])) / (now - _last[0])
    want = threads_for(available_cores(), others, _most)
    if want != _current:
        torch.set_num_threads(want)
        _current = want
    _last = (now, busy, ours)


def _times() -> tuple[float, float]:
    """(CPU seconds the cores we may run on have been busy since boot or None (_busy_time), CPU seconds this process
    has used)."""
    process = os.times()
    return _busy_time(), process.user + process.system


def _busy_time() -> float | None:
    """CPU seconds (user, nice, system, irq, softirq) of the cores in our affinity since boot, from /proc/stat;
    None where there is no /proc/stat or it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        cores = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        ticks = 0
        for line in lines:
            fields = line.split()
            if fields and fields[0] in cores:
                user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
                ticks += user + nice + system + irq + softirq
    except (OSError, AttributeError, ValueError):  # ValueError: lines of another form (an old kernel, a sandbox)
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a container's cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(processes: int = 1) -> int:
    """torch threads for one of `processes` training processes on this machine: its share of the usable cores.
    Training threads sleep when they wait (configure()), so a busy neighbour costs about its share of the cores."""
    return max(1, available_cores() // processes)
