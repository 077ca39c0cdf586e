"""Make the five small fine-tuning data sets of examples/finetune from the corpora committed in data/.

    python examples/finetune/make_data.py -o data        # from the repository root; writes data/*_{train,val}.jsonl

stories     instruction -> story: "Write a story about Lily, a little girl." -> the story's first sentences
summaries   story -> one sentence: the story's opening sentences -> the sentence that names its main character
            (a lead summary: no human-written summaries are at hand)
qa          a passage and a question -> the answer: "What is the name of the little girl?" -> "Lily", and
            "Who is Lily?" -> "a little girl", where the passage says "a little girl named Lily"
classify    which corpus a passage comes from: Shakespeare or TinyStories ({text, label})
translate   a toy translator: English -> the same sentence with its words in reverse order, a reversible
            transformation standing in for a second language (no parallel corpus is at hand)

Everything is drawn from TinyStories' training file and Shakespeare with a fixed seed, so the files are the same on
every run. Texts have their whitespace folded so each record is one line of a prompt.
"""

import argparse
import json
import random
import re
from pathlib import Path

NAMED = re.compile(r"\b[Aa]n? ((?:[a-z]+ ){0,2}?[a-z]+) named ([A-Z][a-z]+)")


def stories(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [" ".join(s.split()) for s in text.split("<|endoftext|>") if len(s.split()) > 20]


def sentences(story: str) -> list[str]:
    return re.findall(r"[^.!?]+[.!?]+\"?", story)


def write(out: Path, name: str, records: list[dict], n_val: int):
    for split, part in (("train", records[n_val:]), ("val", records[:n_val])):
        with open(out / f"{name}_{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    print(f"{name}: {len(records) - n_val} training and {n_val} validation records")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "data",
                        help="a folder with tinyshakespeare.txt and tinystories/train.txt (default: the repository's data/)")
    parser.add_argument("-o", "--out", type=Path, default=Path("data"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    tiny = stories(args.data / "tinystories" / "train.txt")
    rng.shuffle(tiny)

    story_records, summary_records, qa_records = [], [], []
    for story in tiny:
        sents = [s.strip() for s in sentences(story)]
        opening = " ".join(sents[:4])
        match = NAMED.search(opening)
        if not match or len(opening) > 400:
            continue
        what, name = match.groups()
        named_in = next(s for s in sents if match.group(0) in s)
        story_records.append({"prompt": f"Write a story about {name}, a {what}.", "response": opening})
        summary_records.append({"prompt": f"Summarize in one sentence: {opening}", "response": named_in})
        qa_records.append({"prompt": f"{opening} Question: What is the name of the {what}?", "response": name})
        qa_records.append({"prompt": f"{opening} Question: Who is {name}?", "response": f"a {what}"})
    write(args.out, "stories", story_records[:600], 50)
    write(args.out, "summaries", summary_records[:600], 50)
    rng.shuffle(qa_records)
    write(args.out, "qa", qa_records[:1000], 100)

    short = [s.strip() for story in tiny for s in sentences(story) if 3 <= len(s.split()) <= 7]
    rng.shuffle(short)
    translations = [{"prompt": f"Translate to Backwards: {s}", "response": " ".join(reversed(s.split()))}
                    for s in dict.fromkeys(short)]
    write(args.out, "translate", translations[:1200], 100)

    shakespeare = " ".join((args.data / "tinyshakespeare.txt").read_text(encoding="utf-8").split())
    flat_tiny = " ".join(tiny)
    passages = []
    for label, text in (("shakespeare", shakespeare), ("tinystories", flat_tiny)):
        for start in rng.sample(range(len(text) - 200), 500):
            passages.append({"text": text[start:start + 200].split(" ", 1)[1].rsplit(" ", 1)[0], "label": label})
    rng.shuffle(passages)
    write(args.out, "classify", passages, 200)


if __name__ == "__main__":
    main()
