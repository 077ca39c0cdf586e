"""Loading a model and its memory: `load_model` time, imports before it, peak RSS against the weights' bytes, and
the wall time and peak RSS of a whole `llm generate`, for float32, int8 and int4, in one run.

    python benchmarks/load.py PATH [PATH ...] [--runs 3] [--new-tokens 32]

Every number comes from a fresh process (the CLI's OpenMP settings, llmcli/runtime.py): `imports` is `import torch`
and llmcli's loading modules; `load` is `load_model(PATH, quantize=MODE)` (wall and CPU seconds, median of --runs);
`weights` the bytes of the parameters and buffers the model decodes with (shared ones once); `growth` how much the
process's peak RSS grew during the load (Linux's VmHWM), over the weights; then `llm generate PATH "Once upon a time"
--max-new-tokens N --ignore-eos` as a whole: wall seconds and its peak RSS (ru_maxrss of the child, started from a
small Python so that it does not count the benchmark's own memory), over the weights.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

LOAD = """
import json, sys, time
from llmcli import runtime
runtime.configure()
started = time.perf_counter()
import torch
from llmcli.formats import load_model
imported = time.perf_counter()

def peak_rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))

before, cpu = peak_rss(), time.process_time()
model = load_model(sys.argv[1], quantize=None if sys.argv[2] == "fp32" else sys.argv[2])[0]
loaded, cpu = time.perf_counter(), time.process_time() - cpu
tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
print(json.dumps({"imports": imported - started, "load": loaded - imported, "cpu": cpu, "growth": peak_rss() - before,
                  "weights": sum(t.numel() * t.element_size() for t in tensors.values())}))
"""

# the peak RSS of a command, from a launcher that is not the benchmark (a child's ru_maxrss counts its parent's)
RSS_LAUNCHER = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - started, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"{'model':<28} {'mode':<5} {'imports':>7} {'load':>6} {'cpu':>6} {'weights':>8} {'growth':>8} {'/w':>5} "
          f"{'generate':>8} {'peak RSS':>8} {'/w':>5}")
    for path in args.paths:
        for mode in ("fp32", "int8", "int4"):
            runs = []
            for _ in range(args.runs):
                result = subprocess.run([sys.executable, "-c", LOAD, path, mode], capture_output=True, text=True,
                                        env=ENV)
                if result.returncode:
                    sys.exit(f"loading {path} ({mode}) failed:\n{result.stderr}")
                runs.append(json.loads(result.stdout))
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            command = [sys.executable, "-m", "llmcli", "generate", "-m", path, "Once upon a time", "--max-new-tokens",
                       str(args.new_tokens), "--ignore-eos", "--temperature", "0"]
            command += [] if mode == "fp32" else ["--quantize", mode]
            result = subprocess.run([sys.executable, "-S", "-c", RSS_LAUNCHER, *command], capture_output=True,
                                    text=True, env=ENV)
            wall, rss, code = result.stdout.split()[-3:]
            if code != "0":
                sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
            weights = median["weights"]
            print(f"{Path(path).name[:28]:<28} {mode:<5} {median['imports']:6.2f}s {median['load']:5.2f}s "
                  f"{median['cpu']:5.2f}s {weights / 2**20:5.0f}MiB {median['growth'] / 2**20:5.0f}MiB "
                  f"{median['growth'] / weights:5.2f} {float(wall):7.2f}s {int(rss) / 2**20:5.0f}MiB "
                  f"{int(rss) / weights:5.2f}", flush=True)


if __name__ == "__main__":
    main()
