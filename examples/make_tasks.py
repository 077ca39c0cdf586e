"""Make small multiple-choice task files for `llm eval` from the corpora in data/ (deterministic: a fixed seed).

    python examples/make_tasks.py [--data data] [--out examples/tasks] [-n 200]

next_sentence.jsonl: the opening sentences of a TinyStories validation story; which of four sentences comes next
  (the real one, or a sentence from the middle of another story). Chance 0.25.
shakespeare.jsonl: three lines of a Shakespeare play; which of two passages continues it (the play's next two
  lines, or two consecutive sentences of a story). Chance 0.5.
Every choice is at most 110 characters, so that it fits the context of the smallest models.
"""

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stories(path: Path) -> list[list[str]]:
    """Each story of the file as its list of sentences."""
    text = path.read_text(encoding="utf-8")
    docs = [d.strip() for d in re.split(r"^<\|endoftext\|>$", text, flags=re.M) if d.strip()]
    return [re.split(r"(?<=[.!?])\s+", " ".join(d.split())) for d in docs]


MAX_CHOICE = 110  # characters: a choice fits the context of the smallest (nano, 64-token) models


def next_sentence(docs: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    short = lambda s: len(s) <= MAX_CHOICE  # noqa: E731
    usable = [d for d in docs if len(d) >= 4 and any(short(s) for s in d[2:])]
    middles = [s for d in usable for s in d[1:-1] if short(s)]
    examples = []
    for story in rng.sample(usable, min(n, len(usable))):
        k = rng.choice([k for k in range(2, len(story)) if short(story[k])])
        real = story[k]
        others = [s for s in rng.sample(middles, 10) if s not in story][:3]
        choices = [" " + s for s in [real, *others]]
        rng.shuffle(choices)
        examples.append({"context": " ".join(story[:k]), "choices": choices, "answer": choices.index(" " + real)})
    return examples


def shakespeare(lines: list[str], docs: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    # passages: five consecutive non-empty lines that do not cross a blank line (one speech or exchange)
    blocks, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        else:
            blocks += [current[i:i + 5] for i in range(0, len(current) - 4, 5)]
            current = []
    blocks = [b for b in blocks if len("\n".join(b[3:])) <= MAX_CHOICE]
    pairs = [" ".join(d[i:i + 2]) for d in docs for i in range(len(d) - 1)]
    pairs = [p for p in pairs if len(p) <= MAX_CHOICE]
    examples = []
    for block in rng.sample(blocks, min(n, len(blocks))):
        context, real = "\n".join(block[:3]) + "\n", "\n".join(block[3:])
        other = rng.choice(pairs)
        choices = [real, other]
        rng.shuffle(choices)
        examples.append({"context": context, "choices": choices, "answer": choices.index(real)})
    return examples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "tasks")
    parser.add_argument("-n", type=int, default=200, help="examples a task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    docs = stories(args.data / "tinystories" / "valid.txt")
    lines = (args.data / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, examples in (("next_sentence", next_sentence(docs, args.n, rng)),
                           ("shakespeare", shakespeare(lines, docs, args.n, rng))):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
        print(f"{path}\t{len(examples)} examples")


if __name__ == "__main__":
    main()
