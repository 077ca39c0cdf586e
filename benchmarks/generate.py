"""Decoding speed: `llm`'s generation against transformers' `generate` on the same weights, side by side.

    python benchmarks/generate.py [--shapes small,gpt2] [--batches 1,8] [--prompts 16,512] [--new-tokens 32]
                                  [--repeats 3] [--profile]

For each shape (random weights), batch size and prompt length it builds our Transformer, copies its weights into
transformers' GPT2LMHeadModel (the renaming of llmcli.hf's export), and times greedy decoding of each engine,
alternating them: time to first token (the prompt's prefill and one token) and decode tokens/s (new tokens after the
first, over the time after the first). Ours is llmcli.generate.decode_rows, the loop `llm generate` runs, on the
torch model in float32, on the same with `--quantize int8` (llmcli/quantize.py) and, for shapes small enough for it,
on the NumPy model (llmcli/numpy_model.py, which `llm generate` uses for them). HF is
`model.generate(do_sample=False)` with the KV cache, timed by a logits processor that notes each token. Medians over
--repeats runs; "vs HF" is an engine's tokens/s over HF's.

The floor: at batch 1 a decode step reads every weight once (the tied embedding once, as the output head), so
time per token >= weight bytes / memory read bandwidth (measured here with torch.sum over a 512 MB tensor). The
table prints the floor in tokens/s of the bytes each engine reads (float32, or int8 for int8) and the engine's time
per token as a multiple of it. --profile prints torch.profiler's table of one batch-1 decode step of the last shape,
float32 and int8.
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the `llm` command sets it for NumPy decoding
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmcli.formats.hf import export_family, hf_config_for, hf_tensors  # noqa: E402
from llmcli.infer.generate import SamplingConfig, decode_rows, decoding_layout  # noqa: E402
from llmcli.model.numpy_model import SMALL_MODEL, NumpyTransformer  # noqa: E402
from llmcli.model.quantize import quantize  # noqa: E402
from llmcli.model.transformer import ModelConfig, Transformer  # noqa: E402

# name: (layers, heads, width, vocab); the context is made long enough for the longest prompt
SHAPES = {"small": (6, 6, 384, 4096), "gpt2": (12, 12, 768, 50257), "nano": (2, 2, 64, 512)}


def read_bandwidth() -> float:
    """Bytes/s that torch.sum streams from memory (best of a few), the bound of a decode step at batch 1."""
    x = torch.ones(128 * 1024 * 1024)  # 512 MB: far larger than the caches
    best = float("inf")
    for _ in range(4):
        started = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - started)
    return x.numel() * 4 / best


def hf_twin(model: Transformer):
    """transformers' GPT-2 with our model's weights (as `llm export --format hf` writes them)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    family = export_family(model.config)
    tensors = hf_tensors(model, family)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config_for(family, model.config, None))).eval()
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and all(m == "lm_head.weight" or m.endswith("attn.bias") for m in missing), missing
    hf.tie_weights()  # the output head is the token embedding, as ours
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf


def time_ours(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    started = time.perf_counter()
    first = None
    for _ in decode_rows(model, prompt.tolist(), cfg):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - started, prompt.size(0) * (new_tokens - 1) / (end - first)


@torch.no_grad()
def time_hf(hf, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    from transformers import LogitsProcessor, LogitsProcessorList

    calls = []

    class Clock(LogitsProcessor):  # called once a token, after the forward that gives its logits
        def __call__(self, input_ids, scores):
            calls.append(time.perf_counter())
            return scores

    started = time.perf_counter()
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                      logits_processor=LogitsProcessorList([Clock()]))
    end = time.perf_counter()
    assert out.size(1) == prompt.size(1) + new_tokens and len(calls) == new_tokens
    return calls[0] - started, prompt.size(0) * (new_tokens - 1) / (end - calls[0])


def profile_step(model, new_tokens: int):
    from torch.profiler import ProfilerActivity, profile

    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    prompt = [[1] * 16]
    steps = decode_rows(model, prompt, cfg)
    for _ in range(4):
        next(steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        next(steps)
    steps.close()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,gpt2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompts", default="16,512")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = (f"{'shape':>6} {'params':>7} {'batch':>5} {'prompt':>6} | {'engine':<11} {'tok/s':>7} {'vs HF':>6} "
              f"{'TTFT':>8} | {'floor tok/s':>11} {'x floor':>7}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        layers, heads, width, vocab = SHAPES[shape]
        longest = max(int(p) for p in args.prompts.split(","))
        config = ModelConfig(n_layer=layers, n_head=heads, n_embd=width, vocab_size=vocab,
                             context=max(1024, longest + args.new_tokens))
        model = Transformer(config).eval()
        engines = {"HF": hf_twin(model)}
        if model.num_params() <= SMALL_MODEL:
            engines["NumPy fp32"] = NumpyTransformer(config, {k: v.numpy() for k, v in model.state_dict().items()})
        engines["torch int8"] = quantize(copy.deepcopy(model), "int8")
        engines["torch fp32"] = decoding_layout(model)  # as `llm generate` does, after copying the weights out
        floors = {name: bandwidth / weight_bytes(engines["torch int8" if "int8" in name else "torch fp32"])
                  for name in engines}  # tokens/s at batch 1
        for batch in (int(b) for b in args.batches.split(",")):
            for length in (int(p) for p in args.prompts.split(",")):
                prompt = torch.randint(0, vocab, (batch, length))
                runs = {name: [] for name in engines}
                for name, engine in engines.items():  # warm up
                    timer(name)(engine, prompt[:, :4], 3)
                for _ in range(args.repeats):  # alternate, so that a slow stretch of a shared machine hits all
                    for name, engine in engines.items():
                        runs[name].append(timer(name)(engine, prompt, args.new_tokens))
                rate = {name: statistics.median(r for _, r in results) for name, results in runs.items()}
                for i, (name, results) in enumerate(runs.items()):
                    first = statistics.median(f for f, _ in results)
                    where = f"{shape:>6} {model.num_params() / 1e6:6.1f}M {batch:>5} {length:>6}" if i == 0 else ""
                    floor = (f"{floors[name]:11.1f} {floors[name] / rate[name]:7.2f}" if batch == 1 else "")
                    print(f"{where:>27} | {name:<11} {rate[name]:7.1f} {rate[name] / rate['HF']:5.2f}x "
                          f"{first * 1e3:6.1f}ms | {floor}", flush=True)
    if args.profile:
        profile_step(engines["torch fp32"], 8)
        profile_step(engines["torch int8"], 8)


def weight_bytes(model: Transformer) -> int:
    """Bytes a batch-1 decode step reads: every weight once (the tied embedding once, as the output head), but of a
    table only looked up (positions, an untied input embedding) one row."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    looked_up = ("position_", "rope_") + (() if model.config.tie_embeddings else ("token_embedding",))
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if not name.startswith(looked_up))


def timer(name: str):
    return time_hf if name == "HF" else time_ours


if __name__ == "__main__":
    main()
