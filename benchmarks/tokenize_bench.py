"""Tokenization throughput and memory: MB/s of raw text and peak RSS, on corpora made by repeating data/ text.

    python benchmarks/tokenize_bench.py [--sizes 50,300] [--workers 2]

Each measurement runs in a fresh process (so its peak RSS is its own) and writes shards to a temporary directory.
It prints MB/s and the peak RSS of the main process and of the largest worker, for each corpus size (RSS must not
grow with the size), and the ratio of the parallel tokenizer to the same code on one process.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "data" / "tinystories" / "train.txt"
TOKENIZER = ROOT / "llmcli" / "checkpoints" / "tinystories" / "tokenizer.model"


def measure(corpus: str, workers: int) -> dict:
    """In a child process: tokenize the corpus, return seconds and peak RSS (self, largest child)."""
    sys.path.insert(0, str(ROOT))
    from llmcli.text.shards import tokenize_corpus
    from llmcli.text.tokenizer import Tokenizer

    tokenizer = Tokenizer(TOKENIZER)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        index = tokenize_corpus([corpus], tokenizer, Path(out), workers=workers)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": index["tokens"],
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run(corpus: Path, workers: int) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from tokenize_bench import measure; " \
           f"print(json.dumps(measure({str(corpus)!r}, {workers})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def make_corpus(path: Path, megabytes: int):
    text = SOURCE.read_bytes()
    with open(path, "wb") as f:
        while f.tell() < megabytes * 1e6:
            f.write(text)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="50,300", help="corpus sizes in MB")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("| corpus | workers | MB/s | tokens | peak RSS main | peak RSS worker |\n|---|---|---|---|---|---|")
        results = {}
        for size in map(int, args.sizes.split(",")):
            corpus = Path(tmp) / f"corpus-{size}.txt"
            make_corpus(corpus, size)
            real_mb = corpus.stat().st_size / 1e6
            plans = [args.workers, 1] if size == min(map(int, args.sizes.split(","))) else [args.workers]
            for workers in plans:
                r = run(corpus, workers)
                results[(size, workers)] = real_mb / r["seconds"]
                print(f"| {real_mb:.0f} MB | {workers} | {real_mb / r['seconds']:.1f} | {r['tokens']:,} | "
                      f"{r['rss_mb']:.0f} MB | {r['worker_rss_mb']:.0f} MB |", flush=True)
            corpus.unlink()
        small = min(map(int, args.sizes.split(",")))
        print(f"\nparallel ({args.workers} workers) / one process: "
              f"{results[(small, args.workers)] / results[(small, 1)]:.2f}x")


if __name__ == "__main__":
    main()
