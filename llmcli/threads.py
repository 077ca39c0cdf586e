"""CPU threads for the machine as it is: fast when the cores are ours, about our share of them beside a busy neighbour.

torch's CPU kernels run in OpenMP parallel regions (libgomp in the pip wheels, or Intel's libiomp). Between regions
OpenMP's threads spin for a while instead of sleeping. On cores of our own that saves a wake-up per region: decoding
SmolLM2-135M at batch 1 ran 10-50% faster, and a 4-layer, 128-wide training step 10-25% faster, than with threads that
sleep at once (OMP_WAIT_POLICY=PASSIVE). Beside another process that keeps the cores busy (a second run, a test suite,
a notebook) spinning is pathological: a spinning thread burns the time slice its partner thread needs, and every
parallel region waits for a thread that is not running (a nano training step ran 5-10x slower). Two cures:

- Training (`pretrain`, `finetune`) keeps a fixed number of threads that sleep at once. Its results must not depend on
  the machine's load: a resumed run repeats the uninterrupted one bit for bit, and torch sums in a different order on
  a different number of threads.
- Every other command keeps OpenMP's spinning and follows the load (adapt()): loading a model and every forward
  pass call adapt(), which at most twice a second measures how much of our cores other processes kept busy
  (/proc/stat, less our own CPU time; the first look compares with configure()'s, before torch is even imported) and
  runs on the idle ones (threads_for): one thread beside a neighbour, so that no partner thread is waited for.

This module imports no torch at import time: call configure() before anything imports it. Values the user exported
(OMP_WAIT_POLICY, KMP_BLOCKTIME, OMP_NUM_THREADS) are kept, and commands other than training then leave the thread
count as torch has it (training takes train.threads, default its share of the cores: default_threads).
"""

import math
import os
import time

# Read by the OpenMP runtime when torch loads it: waiting threads sleep at once (libgomp: OMP_WAIT_POLICY; Intel's
# runtime, which some torch builds and MKL use: KMP_BLOCKTIME, in milliseconds of spinning before sleeping).
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
FIXED_THREADS_COMMANDS = ("pretrain", "finetune")
INTERVAL = 0.5  # seconds between two looks at the machine's load
FIRST_LOOK = 0.1  # the first look, at the least this long after configure(): loading a model is long work too

_following = False  # whether adapt() changes the thread count (configure() decides)
_last = None  # (monotonic time, busy seconds of our cores, our CPU seconds) at the last look
_most = _current = None  # torch's threads at the first look (never exceeded), and now


def configure(command: str | None = None):
    """Choose OpenMP's waiting for this process and the processes it starts (torchrun's workers, the tokenizer's
    pool), given the command about to run ("pretrain", "generate", ...): see the module's docstring. Must run before
    torch is imported."""
    global _following, _last
    user_set = any(name in os.environ for name in (*PASSIVE, "OMP_NUM_THREADS"))
    if command in FIXED_THREADS_COMMANDS:
        for name, value in PASSIVE.items():
            os.environ.setdefault(name, value)
    _following = False
    if not user_set and command not in FIXED_THREADS_COMMANDS:
        busy, ours = _times()
        # the first look compares with now: by then torch is imported, and a busy neighbour is seen before loading
        _following, _last = busy is not None, (time.monotonic(), busy, ours)


def threads_for(cores: int, others: float, most: int) -> int:
    """Threads to run on when other processes kept `others` (a float) of our `cores` busy: the idle cores, at least
    one and at most `most`. A core counts as idle unless others use more than a quarter of it (a shell, a
    periodic daemon), since one thread too many costs far more than one too few."""
    return max(1, min(most, math.floor(cores - others + 0.25)))


def adapt():
    """Follow the load: called often by long work (loading a model, decoding steps, evaluation batches), it looks
    at the machine at most every INTERVAL seconds and sets torch's threads (process-wide) to threads_for(...), up to
    the count torch had at the first look. A no-op for training and where the user chose the threads or there is
    no /proc/stat."""
    global _following, _last, _most, _current
    if not _following:
        return
    now = time.monotonic()
    if now - _last[0] < (INTERVAL if _current is not None else FIRST_LOOK):
        return
    busy, ours = _times()
    if busy is None:  # /proc/stat became unreadable (no file descriptor left, a sandbox): keep the threads as they are
        _following = False
        return
    import torch

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
