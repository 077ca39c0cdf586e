"""Settings chosen for the machine: how OpenMP's threads wait (chosen per command), threads that follow the load
outside training, threads from the CPU affinity, and the `auto` training precision."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from llmcli import runtime as threads
from llmcli.train import loop as train

OPENMP = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")


def test_configure_chooses_waiting_per_command_and_keeps_the_users_choice(monkeypatch):
    for name in OPENMP:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_following", False)
    monkeypatch.setattr(threads, "_last", None)
    threads.configure("generate")  # OpenMP's own spinning, and threads that follow the load
    assert "OMP_WAIT_POLICY" not in os.environ and threads._following
    threads.configure("pretrain")  # training: fixed threads that sleep at once
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and not threads._following
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("KMP_BLOCKTIME", "200")
    threads.configure("finetune")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["KMP_BLOCKTIME"] == "200"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    threads.configure("eval")  # the user's OpenMP settings: the thread count is theirs too
    assert not threads._following


@pytest.mark.parametrize("command, policy", [("pretrain", "PASSIVE"), ("generate", "None")])
def test_the_cli_configures_threads_before_torch_is_imported(command, policy):
    # main() must set the variables before a command imports torch: libgomp reads them once, when torch loads it
    code = (f"import os, sys; import llmcli.cli as cli; sys.argv = ['llm', '{command}', '--help']\n"
            "try: cli.main()\nexcept SystemExit: pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in OPENMP} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == f"{policy} False"


def test_threads_for_takes_the_idle_cores():
    assert threads.threads_for(cores=2, others=0.0, most=2) == 2
    assert threads.threads_for(cores=2, others=0.2, most=2) == 2  # a shell or a daemon now and then
    assert threads.threads_for(cores=2, others=0.5, most=2) == 1
    assert threads.threads_for(cores=2, others=3.0, most=2) == 1  # never none
    assert threads.threads_for(cores=8, others=2.0, most=4) == 4  # never more than the thread had
    assert threads.threads_for(cores=8, others=5.0, most=8) == 3


ADAPT = """
import sys, time
from llmcli import runtime as threads
threads.configure(sys.argv[1])
import torch
torch.set_num_threads(2)
threads.follow_load()
print("ready", flush=True)
sys.stdin.readline()  # the neighbours are running
end = time.monotonic() + 1.5
while time.monotonic() < end:
    threads.follow_load()
    torch.randn(256, 256) @ torch.randn(256, 256)
print(torch.get_num_threads())
"""


@pytest.mark.skipif(threads.available_cores() != 2 or threads._busy_time() is None,
                    reason="measures the load of a 2-core Linux machine")
def test_a_busy_neighbour_takes_decoding_to_one_thread_but_never_training():
    """Two processes that keep both cores busy: a command that follows the load drops to one thread within a
    second and a half; training keeps its two (its results must not depend on the load)."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP} | {"PYTHONPATH": str(ROOT)}
    commands = {command: subprocess.Popen([sys.executable, "-c", ADAPT, command], env=env, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True) for command in ("generate", "pretrain")}
    for process in commands.values():
        assert process.stdout.readline() == "ready\n"
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for process in commands.values():
            process.stdin.write("go\n")
            process.stdin.flush()
        counts = {command: process.communicate(timeout=60)[0].split()[-1] for command, process in commands.items()}
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert counts == {"generate": "1", "pretrain": "2"}


def test_default_threads_share_the_usable_cores():
    cores = len(os.sched_getaffinity(0))
    assert threads.default_threads() == cores
    assert threads.default_threads(processes=cores * 2) == 1


def test_auto_precision_is_bf16_only_for_wide_models_on_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    assert train.resolve_precision("fp32", 4096, cpu) == "fp32"
    assert train.resolve_precision("bf16-mixed", 64, cpu) == "bf16-mixed"
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert train.resolve_precision("auto", 384, cpu) == "bf16-mixed"
    assert train.resolve_precision("auto", 128, cpu) == "fp32"  # casts cost more than narrow matmuls save
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    assert train.resolve_precision("auto", 384, cpu) == "fp32"


def test_odd_or_unreadable_proc_stat_never_stops_a_command(monkeypatch):
    """/proc/stat of another form (an old kernel, a sandbox) turns following off; one that becomes unreadable during
    a run (no file descriptor left in a busy server) leaves the threads as they are, and neither raises."""
    import io

    for name in OPENMP:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_following", False)  # (restored after the test)
    for name in ("_last", "_most", "_current"):
        monkeypatch.setattr(threads, name, None)
    monkeypatch.setattr(threads, "INTERVAL", 0.0)
    monkeypatch.setattr(threads, "FIRST_LOOK", 0.0)
    stat = {"text": "cpu  1 2 3 4\ncpu0 1 2 3 4\ncpu1 1 2 3 4\n"}

    def fake_open(path, *args, **kwargs):
        if stat["text"] is None:
            raise OSError(24, "Too many open files")
        return io.StringIO(stat["text"])

    monkeypatch.setattr(threads, "open", fake_open, raising=False)  # found before the builtin
    threads.configure("generate")
    assert not threads._following
    stat["text"] = "".join(f"cpu{i} 10 0 10 100 0 0 0 0 0 0\n" for i in range(1024))
    threads.configure("generate")
    assert threads._following
    before = torch.get_num_threads()
    threads.follow_load()  # the first look
    stat["text"] = None
    threads.follow_load()
    assert not threads._following and torch.get_num_threads() == before
