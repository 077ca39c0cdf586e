"""Settings chosen for the machine: OpenMP threads that sleep when they wait (a busy neighbour does not stall us),
threads from the CPU affinity, and the `auto` training precision."""

import os

import torch

from llmcli import threads
from llmcli.train import pretrain as train


def test_configure_sets_passive_waiting_but_keeps_the_users_choice(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("KMP_BLOCKTIME", "200")
    threads.configure()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert os.environ["KMP_BLOCKTIME"] == "200"


def test_the_cli_configures_threads_before_torch_is_imported():
    import subprocess
    import sys

    from conftest import ROOT

    # main() must set the variables before a command imports torch: libgomp reads them once, when torch loads it
    code = ("import os, sys; import llmcli.cli as cli; sys.argv = ['llm', '--help']\n"
            "try: cli.main()\nexcept SystemExit: pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "PASSIVE False"


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
