"""Does the default precision train as well as fp32? Validation loss against steps, side by side.

    python benchmarks/train_loss.py [--corpus data/tinyshakespeare.txt] [--steps 300] [--seeds 1337,1338]

Runs `llm pretrain` on the same corpus, tokenizer and batches twice per seed: with `--precision fp32` (the old
default) and with the default (`auto`, bf16-mixed on a CPU with native bfloat16 at this 256-wide shape), and prints
one table of validation losses at each evaluation. The two seeds' fp32 runs show how far the noise of the
initialisation and the batches moves the loss; a difference between precisions within it is no difference.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(n_layer=4, n_head=4, n_embd=256, context=128, vocab_size=512)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default=str(ROOT / "data/tinyshakespeare.txt"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--seeds", default="1337,1338")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    columns, losses = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp, "shape.yaml")
        config.write_text(json.dumps({"model": SHAPE, "train": {
            "batch_size": 16, "lr": 1e-3, "warmup_steps": 30, "eval_batches": 16}}))
        for seed in args.seeds.split(","):
            for precision in ("fp32", None):  # None: the default
                name = f"{precision or 'default'} seed {seed}"
                out = Path(tmp, name.replace(" ", "-"))
                command = [sys.executable, "-m", "llmcli", "pretrain", args.corpus, "--config", str(config), "-o",
                           str(out), "--max-steps", str(args.steps), "--eval-interval", str(args.eval_interval),
                           "--seed", seed] + (["--precision", precision] if precision else [])
                print(f"running: {' '.join(command[1:])}", file=sys.stderr, flush=True)
                subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                losses[name] = {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}
                summary = yaml.safe_load((out / "config.yaml").read_text())["summary"]
                columns.append(f"{name} ({summary['precision']}, {summary['tokens_per_s']:,} tok/s)")
                losses[columns[-1]] = losses.pop(name)
    print(f"{SHAPE['n_layer']} layers, {SHAPE['n_embd']} wide, context {SHAPE['context']}, batch 16, "
          f"vocab {SHAPE['vocab_size']}: validation loss\n")
    print("| step | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for step in sorted(losses[columns[0]]):
        print(f"| {step} | " + " | ".join(f"{losses[c].get(step, float('nan')):.4f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
