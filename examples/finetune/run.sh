#!/usr/bin/env bash
# The five fine-tuning examples, from the repository root, on the shipped model (llmcli/checkpoints/tinystories).
# Each line's results and time are in examples/finetune/README.md. Set EX=... to pick some: EX="qa classify" bash ...
set -euo pipefail
cd "$(dirname "$0")/../.."
data=examples/finetune/data
out=examples/finetune/runs
python examples/finetune/make_data.py -o $data
for ex in ${EX:-qa classify translate stories summaries}; do
  start=$SECONDS
  case $ex in
    qa)        llm finetune $data/qa_train.jsonl --val $data/qa_val.jsonl --max-steps 150 --lr 1e-3 -o $out/qa
               python examples/finetune/score.py -m $out/qa $data/qa_val.jsonl --max-new-tokens 8 ;;
    classify)  llm finetune --task classify $data/classify_train.jsonl --val $data/classify_val.jsonl --max-steps 40 --lr 1e-3 -o $out/classify
               llm eval -m $out/classify $data/classify_val.jsonl ;;
    translate) llm finetune $data/translate_train.jsonl --val $data/translate_val.jsonl --max-steps 100 --lr 1e-3 -o $out/translate
               python examples/finetune/score.py -m $out/translate $data/translate_val.jsonl --max-new-tokens 16 ;;
    stories)   llm finetune $data/stories_train.jsonl --val $data/stories_val.jsonl --max-steps 60 --lr 1e-3 --lora-rank 8 --lora-targets attn.qkv,attn.proj,mlp.fc,mlp.proj -o $out/stories
               llm generate "Write a story about Sam, a brave cat." -m $out/stories --seed 1 --max-new-tokens 80 ;;
    summaries) llm finetune $data/summaries_train.jsonl --val $data/summaries_val.jsonl --max-steps 60 --lr 1e-3 -o $out/summaries
               python examples/finetune/score.py -m $out/summaries $data/summaries_val.jsonl --max-new-tokens 40 ;;
  esac
  echo "$ex: $((SECONDS - start))s" >&2
done
