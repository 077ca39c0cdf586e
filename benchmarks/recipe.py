"""The training recipe, side by side: bits per byte of held-out stories for the earlier defaults and today's, each
with AdamW and with Muon, on the same data, shape, tokenizer and batches.

    python benchmarks/recipe.py [--steps 150] [--batch-size 16] [--corpus data/tinystories/train.txt]

Each row is one `llm pretrain` run at issue 31's shape (6 layers, 6 heads of 32, 192 wide, context 256, vocabulary
2048) on the corpus, then `llm eval` of data/tinystories/valid.txt (stories the run never saw) at stride 256; it
prints a Markdown table: the validation bits per byte the run logged, held-out bits per byte, tokens/s of training.
A short run on a shared CPU is noisy: read differences of a few hundredths as noise, and tokens/s as rough.
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
SHAPE = ["model.n_layer=6", "model.n_head=6", "model.n_embd=192", "model.context=256"]
# the defaults before issue 31: GPT-2's block, a fixed warmup of 100 steps, a cosine to a tenth
EARLIER = ["model.norm=layernorm", "model.positions=learned", "model.mlp=gelu", "model.tie_embeddings=true",
           "train.warmup_steps=100", "train.schedule=cosine", "train.min_lr_ratio=0.1"]
VARIANTS = {
    "earlier defaults, adamw": EARLIER,
    "earlier defaults, muon": EARLIER + ["train.optimizer=muon"],
    "new defaults, adamw": [],
    "new defaults, muon": ["train.optimizer=muon"],
}


def llm(*args) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "llmcli", *map(str, args)], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"llm {' '.join(map(str, args))} failed:\n{done.stderr}")
    return done.stdout


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default=str(ROOT / "data/tinystories/train.txt"))
    parser.add_argument("--valid", default=str(ROOT / "data/tinystories/valid.txt"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--only", help="comma-separated variant names to run (default: all)")
    args = parser.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only.split(",")}
    print(f"| recipe ({args.steps} steps of {args.batch_size} x 256) | val bits per byte (logged) "
          "| held-out bits per byte | tokens/s |\n|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = None
        for name, settings in variants.items():
            run = Path(tmp, name.replace(" ", "-").replace(",", ""))
            sets = [x for s in SHAPE + settings for x in ("--set", s)]
            llm("pretrain", args.corpus, "--preset", "tiny", "--vocab-size", 2048, "--max-steps", args.steps,
                "--batch-size", args.batch_size, "--eval-interval", args.steps, *sets, "-o", run,
                *(["-t", tokenizer] if tokenizer else []))
            tokenizer = tokenizer or run  # every run after the first takes the same tokenizer
            summary = yaml.safe_load((run / "config.yaml").read_text())["summary"]
            scored = json.loads(llm("eval", "-m", run, args.valid, "--stride", 256, "--json"))
            print(f"| {name} | {summary['val_bpb']:.3f} | {scored['bits_per_byte']:.3f} | "
                  f"{summary['tokens_per_s']:,} |", flush=True)


if __name__ == "__main__":
    main()
