"""Turn TinyStories into instruction -> story pairs: the training data of the shipped default model.

Each story appears twice. The first copy gets a line asking for it, "Tell me a story about a cat." and the like,
naming the thing or animal the story mentions most (or its main character); a fifth of first copies stay plain, so
the model still continues ordinary text. The second copy names another topic drawn from those the story mentions,
weighted by the square of its count: many more request/story pairs in which the requested word must be taken from the
request line, which is what makes the model follow the topic rather than tell its favourite story. Output is in the
TinyStories format (documents separated by `<|endoftext|>` lines), on stdout:

    python examples/tinystories_instructions.py data/tinystories/train.txt > instruct.txt

(the shipped model was made from the whole 6,212-story training pool that data/README.md describes; data/ commits
its first 662 stories)
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
THE = set("sun moon park sea beach forest farm river garden".split())  # "a story about the sun", not "a sun"
NO_ARTICLE = {"rain", "snow"}
PLAIN_SHARE = 0.2


def with_article(noun: str) -> str:
    if noun in NO_ARTICLE:
        return noun
    if noun in THE:
        return "the " + noun
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def topic_counts(story: str) -> Counter:
    """How often the story mentions each topic noun (plurals count)."""
    words = (w.rstrip("s") if w.rstrip("s") in TOPICS else w for w in re.findall(r"[a-z]+", story.lower()))
    return Counter(w for w in words if w in TOPICS)


def topic_of(story: str) -> str | None:
    """The topic noun the story mentions most (first mention breaks ties), else its main character's name."""
    counts = topic_counts(story)
    if counts:
        return with_article(max(counts, key=counts.get))  # Counter keeps first-mention order: max keeps the first
    name = re.search(r"\bnamed ([A-Z][a-z]+)", story)
    return name.group(1) if name else None


def another_topic(story: str, rng: random.Random) -> str | None:
    counts = topic_counts(story)
    if not counts:
        return topic_of(story)
    nouns = list(counts)
    return with_article(rng.choices(nouns, weights=[counts[n] ** 2 for n in nouns])[0])


def request(topic: str, rng: random.Random) -> str:
    return rng.choice(REQUESTS).format(topic=topic) + "\n"


def with_requests(stories: list[str], seed: int = 0, tail_share: float = 0.06) -> list[str]:
    """Both copies of each story, shuffled so they land apart (not one context window), and the copies of the last
    `tail_share` of the stories kept at the end: `llm pretrain` validates on the end of the stream (5%), and
    those stories must not have been trained on."""
    rng = random.Random(seed)
    split = round(len(stories) * (1 - tail_share))
    out = []
    for group in stories[:split], stories[split:]:
        docs = []
        for story in group:
            topic = topic_of(story)
            plain = topic is None or rng.random() < PLAIN_SHARE
            docs.append(story if plain else request(topic, rng) + story)
            second = another_topic(story, rng)
            if second is not None:
                docs.append(request(second, rng) + story)
        rng.shuffle(docs)
        out += docs
    return out


def main(path: str):
    text = open(path, encoding="utf-8").read()
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    sys.stdout.write("".join(f"{doc}\n<|endoftext|>\n" for doc in with_requests(stories)))


if __name__ == "__main__":
    main(sys.argv[1])
