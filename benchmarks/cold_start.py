"""What a new user waits for: `llm generate "Tell me a story about a cat"` on the shipped model, from a cold start.

    python benchmarks/cold_start.py [--runs 5] [--prompt "..."]

Runs the whole command several times, alternating with `python -c "import torch"` (the floor: no torch program can
print before torch is imported), and prints, as medians: time to the first byte of text on stdout, the whole
command's time, tokens generated and tokens/s of decoding (from `--json`'s timings), and the first byte's time as a
multiple of the torch import.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def first_byte_and_total(command: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
    first = process.stdout.read(1)
    first_at = time.perf_counter() - started
    process.stdout.read()
    process.wait()
    if process.returncode or not first:
        sys.exit(f"{' '.join(command)} failed (exit {process.returncode})")
    return first_at, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt", default="Tell me a story about a cat")
    args = parser.parse_args()
    llm = [sys.executable, "-m", "llmcli", "generate", args.prompt]
    first, total, imports, decode = [], [], [], []
    for run in range(args.runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        imports.append(time.perf_counter() - started)
        first_at, whole = first_byte_and_total(llm + ["--seed", str(run)])
        first.append(first_at)
        total.append(whole)
        # the same command with --json for the model's own timings (its output arrives all at once)
        out = subprocess.run(llm + ["--seed", str(run), "--json"], capture_output=True, text=True, env=ENV)
        decode.append(json.loads(out.stdout.splitlines()[0]) if out.returncode == 0 and out.stdout else {})
    median = statistics.median
    print(f"runs: {args.runs}, prompt: {args.prompt!r}")
    print(f"import torch:                  {median(imports):.2f} s")
    print(f"llm generate, first byte:      {median(first):.2f} s ({median(first) / median(imports):.2f}x the import)")
    print(f"llm generate, whole command:   {median(total):.2f} s")
    decode = [d for d in decode if d]
    if decode:
        print(f"load (imports and weights):    {median(d['load_s'] for d in decode):.2f} s")
        print(f"prefill to first token:        {median(d['time_to_first_token_s'] for d in decode) * 1000:.0f} ms")
        print(f"decoding:                      {median(d['tokens_per_s'] for d in decode):.0f} tokens/s")
        print(f"tokens generated:              {median(d['new_tokens'] for d in decode):.0f}")


if __name__ == "__main__":
    main()
