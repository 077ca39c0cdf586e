"""Decoding speed: `llm`'s generation against transformers' `generate` on the same weights, side by side.

    python benchmarks/generate.py --model DIR [--gguf FILE] [--llamacpp-python PYTHON] [--new-tokens 128]
                                  [--repeats 3] [--threads N] [--busy] [--profile]
    python benchmarks/generate.py [--shapes small,gpt2] [--batches 1,8] [--prompts 16,512] [--new-tokens 32]
                                  [--repeats 3] [--profile]

With --model (a Hugging Face folder or one of our checkpoints), every engine runs as a whole process, the engines
alternating, --repeats rounds: `llm generate` itself (float32, --quantize int8, --quantize int4; --ignore-eos
--json), transformers' `generate` on the same folder, and llama.cpp (the `xllamacpp` wheel) on --gguf when given,
under --llamacpp-python (a virtual environment of its own) or this Python if it imports xllamacpp. Each decodes
--new-tokens greedily at batch 1 after a short prompt, with --threads threads (default: torch's). The table: decode
tokens/s (after the first token), its ratio to transformers', the spread (lowest-highest) over the rounds, load time,
time to first token, and peak RSS (of the whole process) with the bytes of the weights each engine decodes with.
`llm int4, passive` is int4 with the OpenMP setting `llm` had before it chose one per command (llmcli/runtime.py).
--busy measures everything again beside a burner (torch multiplying matrices on every core with its default threads)
and prints a second table.

For each shape (random weights), batch size and prompt length it builds our Transformer, copies its weights into
transformers' GPT2LMHeadModel (the renaming of llmcli.hf's export), and times greedy decoding of each engine,
alternating them: time to first token (the prompt's prefill and one token) and decode tokens/s (new tokens after the
first, over the time after the first). Ours is llmcli.infer.engine.Engine.run, the loop `llm generate` runs, on the
torch model in float32 (its decode steps on NumPy between its torch modules where that is the faster:
llmcli/model/numpy_steps.py), on the same with `--quantize int8` (llmcli/quantize.py) and, for shapes small enough for it,
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
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the `llm` command sets it for NumPy decoding
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmcli.formats.hf import export_family, hf_config_for, hf_tensors  # noqa: E402
from llmcli.infer.backend import decoding_layout  # noqa: E402
from llmcli.infer.engine import Engine, Job  # noqa: E402
from llmcli.infer.sampler import SamplingConfig  # noqa: E402
from llmcli.model.numpy_model import NumpyTransformer  # noqa: E402
from llmcli.runtime import SMALL_MODEL  # noqa: E402
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
    hf = GPT2LMHeadModel(GPT2Config(**hf_config_for(family, model.config))).eval()
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and all(m == "lm_head.weight" or m.endswith("attn.bias") for m in missing), missing
    hf.tie_weights()  # the output head is the token embedding, as ours
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf


def time_ours(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    rows = []
    jobs = [Job([p], cfg, lambda events: rows.extend(e[4] for e in events if e[0] == "finish"), seed=0)
            for p in prompt.tolist()]
    engine = Engine(model, None, max_batch=len(jobs), preallocate=False)
    started = time.perf_counter()
    for _ in engine.run(jobs):
        pass
    first, end = min(r.joined_at for r in rows), max(r.finished_at for r in rows)
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

    import numpy as np

    from llmcli.infer.backend import backend_for

    backend = backend_for(model)
    cache, pad = backend.allocate(1, 16 + new_tokens), np.zeros(1, dtype=np.int64)
    backend.prefill(cache, np.ones((1, 16), dtype=np.int64), 0, pad)
    for pos in range(16, 20):
        backend.step(cache, np.ones(1, dtype=np.int64), pos, pad)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.step(cache, np.ones(1, dtype=np.int64), 20, pad)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder: compare whole processes of every engine on it")
    parser.add_argument("--gguf", help="with --model: the same model as a GGUF file, for llama.cpp")
    parser.add_argument("--llamacpp-python", help="a Python that imports xllamacpp (default: this one)")
    parser.add_argument("--threads", type=int, help="threads of every engine (default: torch's default)")
    parser.add_argument("--worker", choices=["transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="small,gpt2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompts", default="16,512")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--busy", action="store_true", help="with --model: also measure beside a torch burner")
    args = parser.parse_args()
    if args.worker:
        return WORKERS[args.worker](args)
    if args.model:
        return compare_processes(args)
    args.new_tokens = args.new_tokens or 32
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


# --- whole processes on one model folder (--model) ------------------------------------------------------------------

PROMPT = "Once upon a time, in a small village by the sea, there lived"


# Runs a command and reports its peak RSS on stderr. A child's peak RSS (ru_maxrss) counts the memory of the process
# it was forked from, so the command is started from this small Python, not from the benchmark with torch loaded.
RSS_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\npeak_rss_kb {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_process(command: list[str], env: dict) -> dict:
    """The JSON line the command prints last, with the peak RSS of its process (bytes) and its wall time."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-S", "-c", RSS_LAUNCHER, *command], capture_output=True, text=True,
                            env=env)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record["wall_s"] = time.perf_counter() - started
    record["peak_rss"] = int(result.stderr.strip().splitlines()[-1].split()[-1]) * 1024
    return record


def engines(args) -> dict[str, list[str]]:
    """Engine name -> command line printing one JSON object with load_s, time_to_first_token_s, tokens_per_s."""
    here = str(Path(__file__).resolve())
    ours = [sys.executable, "-m", "llmcli", "generate", PROMPT, "-m", args.model, "--max-new-tokens",
            str(args.new_tokens), "--temperature", "0", "--ignore-eos", "--json"]
    worker = ["--model", args.model, "--new-tokens", str(args.new_tokens)]
    commands = {"transformers fp32": [sys.executable, here, "--worker", "transformers", *worker]}
    if args.gguf:
        python = args.llamacpp_python or sys.executable
        commands[f"llama.cpp {Path(args.gguf).stem.rsplit('.', 1)[-1]}"] = [
            python, "-c", LLAMACPP_WORKER, args.gguf, PROMPT, str(args.new_tokens),
            str(args.threads or torch.get_num_threads())]
    commands |= {"llm fp32": ours, "llm int8": [*ours, "--quantize", "int8"], "llm int4": [*ours, "--quantize", "int4"]}
    # llm's OpenMP setting before it chose one per command (llmcli/runtime.py): threads that sleep at once
    commands["llm int4, passive"] = ["/usr/bin/env", "OMP_WAIT_POLICY=PASSIVE", *commands["llm int4"]]
    return commands


def decoded_bytes(args) -> dict[str, int]:
    """Bytes of the weights each engine decodes with (tied tables once)."""
    from llmcli.formats import load_model

    sizes = {}
    for mode in ("fp32", "int8", "int4"):
        model = load_model(args.model, quantize=None if mode == "fp32" else mode)[0]
        tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # shared storage once
        sizes[f"llm {mode}"] = sum(t.numel() * t.element_size() for t in tensors.values())
        del model
    sizes["transformers fp32"] = sizes["llm fp32"]
    sizes["llm int4, passive"] = sizes["llm int4"]
    if args.gguf:
        sizes[[k for k in engines(args) if k.startswith("llama.cpp")][0]] = Path(args.gguf).stat().st_size
    return sizes


def compare_processes(args):
    args.new_tokens = args.new_tokens or 128
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    commands = engines(args)
    sizes = decoded_bytes(args)
    print(f"{args.model}: batch 1, {args.new_tokens} new tokens (--ignore-eos), greedy, "
          f"{args.threads or torch.get_num_threads()} threads, {args.repeats} rounds, engines alternating; "
          f"torch {torch.__version__}", flush=True)
    tables = [("as is", measure(commands, env, args.repeats))]
    if args.busy:
        burner = subprocess.Popen([sys.executable, "-c", BURNER], env=env)
        try:
            tables.append(("beside a torch burner on every core", measure(commands, env, args.repeats)))
        finally:
            burner.kill()
            burner.wait()
    for label, runs in tables:
        print_table(label, runs, sizes)
    if args.profile:
        from llmcli.formats import load_model

        if args.threads:
            torch.set_num_threads(args.threads)
        for mode in ("fp32", "int8", "int4"):
            print(f"one decode step, llm {mode}:")
            profile_step(load_model(args.model, quantize=None if mode == "fp32" else mode)[0], 8)


def measure(commands: dict, env: dict, repeats: int) -> dict[str, list[dict]]:
    runs = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            runs[name].append(run_process(command, env))
    return runs


def print_table(label: str, runs: dict[str, list[dict]], sizes: dict[str, int]):
    header = (f"{'engine':<18} {'tok/s':>7} {'spread':>13} {'vs HF':>6} {'load s':>6} {'TTFT s':>6} "
              f"{'peak RSS':>9} {'weights':>8} {'RSS/w':>5}")
    print(f"\n{label}:\n{header}\n{'-' * len(header)}")
    reference = statistics.median(r["tokens_per_s"] for r in runs["transformers fp32"])
    for name, results in runs.items():
        rates = [r["tokens_per_s"] for r in results]
        rate = statistics.median(rates)
        rss = max(r["peak_rss"] for r in results)
        print(f"{name:<18} {rate:7.1f} {min(rates):6.1f}-{max(rates):<6.1f} {rate / reference:5.2f}x "
              f"{statistics.median(r['load_s'] for r in results):6.2f} "
              f"{statistics.median(r['time_to_first_token_s'] for r in results):6.2f} "
              f"{rss / 1e9:7.2f}GB {sizes[name] / 1e9:6.3f}GB {rss / sizes[name]:5.1f}", flush=True)


# a neighbour that keeps every core busy, with torch's default threads (as a second run or a notebook would)
BURNER = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def transformers_worker(args):
    """transformers' generate on the folder, timed by a logits processor that notes each token."""
    started = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - started
    calls = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            calls.append(time.perf_counter())
            return scores

    prompt = tokenizer(PROMPT, return_tensors="pt")
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([Clock()]), pad_token_id=tokenizer.eos_token_id)
    end = time.perf_counter()
    print(json.dumps({"load_s": load_s, "time_to_first_token_s": calls[0] - started,
                      "tokens_per_s": (len(calls) - 1) / (end - calls[0])}))


# llama.cpp (the xllamacpp wheel) on a GGUF file, with its own timings of the prompt and of decoding; a script of its
# own, for a Python (a virtual environment) that has xllamacpp and not torch. argv: gguf, prompt, new tokens, threads
LLAMACPP_WORKER = '''
import json, sys, time
started = time.perf_counter()
import xllamacpp
gguf, prompt, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = xllamacpp.CommonParams()
params.model.path = gguf
params.n_ctx = 1024
params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
server = xllamacpp.Server(params)
load_s = time.perf_counter() - started
result = server.handle_completions({"prompt": prompt, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0})
timings = (json.loads(result) if isinstance(result, str) else result)["timings"]
first = (timings["prompt_ms"] + timings["predicted_per_token_ms"]) / 1e3
print(json.dumps({"load_s": load_s, "time_to_first_token_s": first, "tokens_per_s": timings["predicted_per_second"]}))
'''


WORKERS = {"transformers": transformers_worker}


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
