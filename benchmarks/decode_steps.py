"""One decode step on NumPy between torch's modules (llmcli/model/numpy_steps.py) against torch alone, by rows and slots.

    python benchmarks/decode_steps.py --model ../smollm2/hf --quantize int4 --rows 1,4,8 --slots 256,1024,4096

For each (rows, slots): the median time of a decode step of each way, alternating in one process, over a KV cache of
random keys and values (a step's time does not depend on them), rows 1.. left-padded by 3 slots as a batch of
prompts of different lengths is. llmcli.runtime.MOST_ROWS and MOST_KEYS come from such runs.
"""

import argparse
import time

from llmcli.runtime import configure

configure("generate")  # as `llm generate`: OpenMP's waiting, and NumPy's BLAS on one thread

import numpy as np
import torch

from llmcli.formats import load_model
from llmcli.infer.backend import decoding_layout, numpy_steps_faster
from llmcli.model.numpy_steps import TorchKernels, kv_cache_arrays


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: the shipped one)")
    parser.add_argument("--quantize", default=None, help="int8 or int4")
    parser.add_argument("--rows", default="1,4,8")
    parser.add_argument("--slots", default="64,256,1024")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    model, _, _ = load_model(args.model, quantize=args.quantize)
    decoding_layout(model)
    print(f"{'rows':>4} {'slots':>6} {'numpy ms':>9} {'torch ms':>9} {'torch/numpy':>11}  numpy_steps chooses")
    for rows in map(int, args.rows.split(",")):
        for slots in map(int, args.slots.split(",")):
            caches = model.setup_kv_cache(rows, slots + args.steps)
            for cache in caches:
                cache.k.normal_()
                cache.v.normal_()
            steps, arrays = TorchKernels(model), kv_cache_arrays(caches)
            pad = np.full(rows, 3, dtype=np.int64)
            pad[0] = 0
            tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (rows, 1))
            on_numpy, on_torch = [], []
            with torch.inference_mode():
                for step in range(args.steps):
                    pos = slots - 1 + step
                    start = time.perf_counter()
                    steps.forward(tokens, pos, arrays, pad)
                    on_numpy.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    model(torch.from_numpy(tokens), pos=pos, pad=torch.from_numpy(pad))
                    on_torch.append(time.perf_counter() - start)
            n, t = np.median(on_numpy[1:]) * 1e3, np.median(on_torch[1:]) * 1e3  # (the first warms up)
            chosen = "numpy" if numpy_steps_faster(rows, slots) else "torch"
            print(f"{rows:>4} {slots:>6} {n:>9.1f} {t:>9.1f} {t / n:>10.2f}x  {chosen}", flush=True)
            model.clear_kv_cache()


if __name__ == "__main__":
    main()
