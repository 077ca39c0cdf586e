"""Exact-match accuracy of a fine-tuned model's greedy replies on held-out {prompt, response} records.

    python examples/finetune/score.py -m MODEL data/qa_val.jsonl [--max-new-tokens 32] [--show 3] [--chat]

Each prompt goes through the model's prompt template, as with `llm generate` (with --chat: the model's chat
template, as `llm generate --chat`, for an instruct model before it is fine-tuned here); the reply (up to <|endoftext|>) is
compared with the response, whitespace stripped. Prints the accuracy and a few replies.
"""

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from llmcli.formats import load_model  # noqa: E402
from llmcli.infer.generate import apply_template, generate_text  # noqa: E402
from llmcli.infer.sampler import sampling_settings  # noqa: E402
from llmcli.text.chat_template import find_chat_template  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--show", type=int, default=3)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    args = parser.parse_args()
    model, tok, config = load_model(args.model)
    turns = find_chat_template(args.model, config, tok) if args.chat else None
    cfg, template = sampling_settings(config, turns, tok, temperature=0.0, max_new_tokens=args.max_new_tokens)
    if turns is not None:  # (its stops are in cfg: a reply ends with its turn)
        template = turns.prompt([{"role": "user", "content": "{prompt}"}])
    records = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    started, right = time.perf_counter(), 0
    for i, record in enumerate(records):
        out = io.StringIO()
        generate_text(model, tok, iter([apply_template(template, record["prompt"])]), cfg, truncate=True, out=out)
        reply = out.getvalue().strip()
        right += reply == record["response"].strip()
        if i < args.show:
            print(f"prompt:   {record['prompt'][:100]}\nexpected: {record['response']}\nreply:    {reply}\n")
    print(f"exact match {right}/{len(records)} = {right / len(records):.3f} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
