"""CPU threads that give way to a busy neighbour: set once, before torch is imported, by every command.

torch's CPU kernels run in OpenMP parallel regions (libgomp in the pip wheels, or Intel's libiomp). Between regions
the default OpenMP threads spin for a while instead of sleeping. On a machine of our own that saves a wake-up; beside
another process that keeps the cores busy (a second training run, a test suite, a notebook) it is pathological: a
spinning thread burns the time slice its partner thread needs, and every parallel region waits for a thread that is
not running. Measured on a shared 2-core machine (benchmarks/train.py --busy): a nano training step with the default
spinning threads ran 5-10x slower than with OMP_WAIT_POLICY=PASSIVE, which itself ran at about the machine's share.

This module imports no torch: call configure() before anything imports it. A value the user exported is kept.
"""

import os

# Read by the OpenMP runtime when torch loads it: waiting threads sleep at once (libgomp: OMP_WAIT_POLICY; Intel's
# runtime, which some torch builds and MKL use: KMP_BLOCKTIME, in milliseconds of spinning before sleeping).
OPENMP_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def configure():
    """Set the OpenMP waiting behaviour for this process and the processes it starts (torchrun's workers, the
    tokenizer's pool). Must run before torch is imported; a variable already set (by the user) is left alone."""
    for name, value in OPENMP_SETTINGS.items():
        os.environ.setdefault(name, value)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a container's cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(processes: int = 1) -> int:
    """torch threads for one of `processes` training processes on this machine: its share of the usable cores.
    With passive waiting (configure()) this also suits a machine shared with others: threads whose cores are taken
    sleep instead of spinning, so a busy neighbour costs about its share of the cores."""
    return max(1, available_cores() // processes)
