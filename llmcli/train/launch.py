"""`llm pretrain --nproc N`: the same command again under torchrun with N processes, its messages passed on."""

import os
import re
import signal
import subprocess
import sys

from llmcli.errors import PEER_STOPPED, LLMError
from llmcli.runtime import default_threads


def relaunch_with_torchrun(nproc: int, argv: list[str], on_hangup) -> int:
    """Run `python -m llmcli ARGV` (less its --nproc) under torchrun with nproc processes; returns its exit status.
    on_hangup: the SIGHUP handler to install (the CLI's, which stops as SIGTERM does). Ctrl-C or SIGTERM stops the
    processes after their step (they save) and raises KeyboardInterrupt."""
    if nproc < 1:
        raise LLMError("--nproc must be at least 1")
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "llmcli", *args]
    threads = str(default_threads(nproc))
    # in a session of its own, so that a signal reaches it once, from us: a terminal's Ctrl-C reached torchrun too,
    # and the second signal it then passed on stopped the processes before they saved
    launcher = subprocess.Popen(command, env={"OMP_NUM_THREADS": threads, **os.environ}, stderr=subprocess.PIPE,
                                text=True, bufsize=1, start_new_session=True)
    # and so a closed terminal's SIGHUP reaches only us: pass it on as SIGTERM, or training would go on unseen
    signal.signal(signal.SIGHUP, on_hangup)
    relay = _Relay(launcher.stderr)
    try:
        relay.pass_on()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the processes finish their step and save; say where
        launcher.terminate()
        relay.failed = False
        relay.pass_on(stopping=True)
        launcher.wait()
        raise
    if relay.said == {relay.peer_stopped}:
        sys.stderr.write(relay.peer_stopped)
    return launcher.wait()


class _Relay:
    """The processes' own messages pass through; torchrun's report of a failed process (a traceback of its own)
    does not, and an error that every process gives is said once; that another process stopped, only when none of
    them said why."""

    peer_stopped = f"llm: error: {PEER_STOPPED}\n"

    def __init__(self, stream):
        self.stream, self.said, self.failed = stream, set(), False

    def pass_on(self, stopping: bool = False):
        for line in self.stream:
            if stopping:  # torchrun logs how it stops the processes, then raises: its traceback is its last word
                self.failed = self.failed or line.startswith("Traceback")
                if re.match(r"[EWI]\d{4} ", line):
                    continue
            else:
                self.failed = self.failed or bool(re.match(r"[EW]\d{4} .*(failed|Sending process)", line))
            if not self.failed and line not in self.said:
                if line.startswith("llm: error:"):
                    self.said.add(line)
                if line != self.peer_stopped:
                    sys.stderr.write(line)
