"""Retrieval quality of `llm embed` against a bag-of-words baseline, measured side by side in one run.

    python benchmarks/retrieval.py [--model CKPT] [-n 300] [--data data]

From TinyStories validation stories (held out from the shipped model's training) two tasks are built: the query is
a story's first sentence, or one sentence from its middle, and the documents are the stories with that sentence
taken out. A query is answered when its own story ranks first (recall@1) or in the top ten (recall@10) of the n.
Methods: TF-IDF bag of words (cosine), the model's embeddings with each pooling, and chance.
"""

import argparse
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmcli.eval.embed import POOLINGS, embed_texts  # noqa: E402
from llmcli.formats import load_model  # noqa: E402


def stories(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    docs = [d.strip() for d in re.split(r"^<\|endoftext\|>$", text, flags=re.M) if d.strip()]
    return [re.split(r"(?<=[.!?])\s+", " ".join(d.split())) for d in docs]


def tasks(docs: list[list[str]], n: int, rng: random.Random) -> dict[str, tuple[list[str], list[str]]]:
    chosen = rng.sample([d for d in docs if len(d) >= 4], n)
    first = ([d[0] for d in chosen], [" ".join(d[1:]) for d in chosen])
    picks = [rng.randrange(1, len(d) - 1) for d in chosen]
    middle = ([d[k] for d, k in zip(chosen, picks)], [" ".join(d[:k] + d[k + 1:]) for d, k in zip(chosen, picks)])
    return {"first sentence": first, "middle sentence": middle}


def bag_of_words(queries: list[str], docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF vectors (unit length) of queries and documents over the documents' words."""
    words = lambda text: re.findall(r"[a-z']+", text.lower())  # noqa: E731
    counts = [Counter(words(d)) for d in docs]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*counts)))}
    df = np.zeros(len(vocab))
    for c in counts:
        df[[vocab[w] for w in c]] += 1
    idf = np.log(len(docs) / df) + 1

    def vectors(texts):
        m = np.zeros((len(texts), len(vocab)))
        for row, text in enumerate(texts):
            for w, c in Counter(words(text)).items():
                if w in vocab:
                    m[row, vocab[w]] = c
        m *= idf
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)

    return vectors(queries), vectors(docs)


def recall(q: np.ndarray, d: np.ndarray, k: int) -> float:
    """Share of queries i whose document i is among the k most similar."""
    scores = q @ d.T
    rank = (scores > scores[np.arange(len(q)), np.arange(len(q))][:, None]).sum(1)  # documents scored above it
    return float((rank < k).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint [default: the shipped model]")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("-n", type=int, default=300, help="stories (documents) a task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer, _ = load_model(args.model)
    docs = stories(args.data / "tinystories" / "valid.txt")
    print(f"{args.n} documents a task; recall@1 / recall@10 (higher is better)")
    print(f"{'task':<16} {'method':<22} {'R@1':>6} {'R@10':>6} {'seconds':>8}")
    for name, (queries, texts) in tasks(docs, args.n, random.Random(args.seed)).items():
        print(f"{name:<16} {'chance':<22} {1 / args.n:6.3f} {min(10 / args.n, 1):6.3f}")
        started = time.perf_counter()
        q, d = bag_of_words(queries, texts)
        seconds = time.perf_counter() - started
        print(f"{name:<16} {'bag of words (tf-idf)':<22} {recall(q, d, 1):6.3f} {recall(q, d, 10):6.3f} {seconds:8.1f}")
        for pooling in POOLINGS:
            started = time.perf_counter()
            q, d = embed_texts(model, tokenizer, queries, pooling), embed_texts(model, tokenizer, texts, pooling)
            seconds = time.perf_counter() - started
            print(f"{name:<16} {'model, ' + pooling + ' pooling':<22} {recall(q, d, 1):6.3f} {recall(q, d, 10):6.3f} "
                  f"{seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
