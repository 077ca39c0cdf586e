"""Turn TinyStories into instruction -> story pairs: the training data of the shipped default model.

Each story gets a first line asking for it, "Tell me a story about a cat." and the like, naming a thing or animal the
story mentions most (or its main character), so a model trained on the output answers such a request with a story
about it. A fifth of the stories stay plain, so the model still continues ordinary text. Output is in the
TinyStories format (documents separated by `<|endoftext|>` lines), on stdout:

    python examples/tinystories_instructions.py ../shared/data/tinystories/train.txt > instruct.txt
"""

import random
import re
import sys
from collections import Counter

TOPICS = """cat dog bird fish bunny rabbit bear frog duck mouse squirrel lion puppy kitten horse cow owl bug butterfly
monkey elephant dragon tiger fox pig sheep turtle snake bee ant spider dinosaur unicorn whale shark ball toy car box
tree flower cake boat kite hat book park garden forest beach pond house sun moon star rain snow train truck doll robot
balloon cookie apple farm sea shell rock bike plane castle princess prince king queen monster ghost pirate teddy
treasure rainbow cloud river mountain""".split()
REQUESTS = [
    "Tell me a story about {topic}.",
    "Tell me a story about {topic}",
    "Write a story about {topic}.",
    "Can you tell me a story about {topic}?",
    "Tell me a short story about {topic}.",
    "Please tell me a story about {topic}.",
]
PLAIN_SHARE = 0.2


def topic_of(story: str) -> str | None:
    """The topic noun the story mentions most (first mention breaks ties), else its main character's name."""
    words = re.findall(r"[a-z]+", story.lower())
    counts = Counter(w.rstrip("s") if w.rstrip("s") in TOPICS else w for w in words)
    found = [(counts[t], -words.index(t) if t in words else 0, t) for t in TOPICS if counts[t]]
    if found:
        noun = max(found)[2]
        return ("an " if noun[0] in "aeiou" else "a ") + noun
    name = re.search(r"\bnamed ([A-Z][a-z]+)", story)
    return name.group(1) if name else None


def with_requests(stories: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for story in stories:
        topic = topic_of(story)
        if topic is None or rng.random() < PLAIN_SHARE:
            out.append(story)
        else:
            out.append(rng.choice(REQUESTS).format(topic=topic) + "\n" + story)
    return out


def main(path: str):
    text = open(path, encoding="utf-8").read()
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    sys.stdout.write("".join(f"{doc}\n<|endoftext|>\n" for doc in with_requests(stories)))


if __name__ == "__main__":
    main(sys.argv[1])
