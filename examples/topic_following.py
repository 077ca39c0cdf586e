"""How often a model answers "Tell me a story about a X" with a story that mentions X.

    python examples/topic_following.py [-m CHECKPOINT ...] [--samples 10]

For each of ten topics, samples stories with the model's own generation defaults (seeds 1..N) and counts those that
name the topic (singular or plural) anywhere in the story. Prints one row a model: the share for each topic and
overall. The shipped model's card quotes this table.
"""

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmcli.formats import load_model  # noqa: E402
from llmcli.infer.generate import apply_template, generate_samples  # noqa: E402
from llmcli.infer.sampler import sampling_settings  # noqa: E402

TOPICS = ["cat", "dog", "bird", "fish", "bear", "frog", "dragon", "ball", "tree", "boat"]


def share_on_topic(model_path, samples: int) -> dict[str, float]:
    model, tokenizer, config = load_model(model_path, numpy_if_small=True)
    shares = {}
    for topic in TOPICS:
        cfg, template = sampling_settings(config, num_samples=samples, seed=1)
        prompt = apply_template(template, f"Tell me a story about a {topic}")
        stories = [s.text for s in generate_samples(model, tokenizer, [prompt], cfg)]
        shares[topic] = sum(bool(re.search(rf"\b{topic}s?\b", s, re.IGNORECASE)) for s in stories) / samples
    return shares


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", action="append", help="checkpoint (repeatable; default: the shipped one)")
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    print("model".ljust(30) + "".join(t.rjust(7) for t in TOPICS) + "    all")
    for path in args.model or [None]:
        shares = share_on_topic(path, args.samples)
        overall = sum(shares.values()) / len(shares)
        print(str(path or "shipped").ljust(30) + "".join(f"{s:7.2f}" for s in shares.values()) + f"{overall:7.2f}")


if __name__ == "__main__":
    main()
