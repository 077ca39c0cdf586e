"""LoRA against full fine-tuning of the same model: trainable parameters, peak memory and step time, side by side.

    python benchmarks/lora.py [--preset small] [--rank 8] [--targets attn.qkv,attn.proj] [--steps 6] [--batch 8]

Each variant runs in its own process (so that its peak resident memory is its own; on a GPU, peak allocated memory
is read instead) and times train.train_step, the step `llm finetune` uses, on the same random batch of a model of
the preset's shape. The variants alternate, twice each, and the median step time is kept.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_variant(preset: str, rank: int, targets: str, steps: int, batch: int) -> dict:
    import torch

    from llmcli.config import PRESETS, TrainConfig
    from llmcli.model.lora import add_lora, parse_targets
    from llmcli.model.transformer import ModelConfig, Transformer
    from llmcli.train.loop import World, train_step
    from llmcli.train.optim import make_optimizer

    world = World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    config = ModelConfig(**PRESETS[preset]["model"])
    model = Transformer(config).to(world.device)
    if rank:
        add_lora(model, rank, 16.0, 0.0, parse_targets(targets))
    model.to(world.device).train()
    optimizer = make_optimizer(model, TrainConfig())
    ids = torch.randint(0, config.vocab_size, (batch, config.context + 1))
    micro_batches = [(ids[:, :-1], ids[:, 1:])]
    times = []
    for step in range(steps + 1):  # the first step allocates the optimizer state: not timed
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_step(model, optimizer, micro_batches, 1e-4, 1.0, torch.autocast("cpu", enabled=False), world)
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if world.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rank": rank, "parameters": model.num_params(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_memory_mb": peak / 2**20, "step_s": statistics.median(times[1:]), "device": world.device.type}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="attn.qkv,attn.proj")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variant", type=int, default=None, help=argparse.SUPPRESS)  # a child process's rank
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(run_variant(args.preset, args.variant, args.targets, args.steps, args.batch)))
        return
    results = {0: [], args.rank: []}
    for _ in range(2):
        for rank in results:
            out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--targets", args.targets,
                                  "--steps", str(args.steps), "--batch", str(args.batch), "--variant", str(rank)],
                                 capture_output=True, text=True, check=True).stdout
            results[rank].append(json.loads(out))
    full, lora = ({**r[0], "step_s": statistics.median(x["step_s"] for x in r),
                   "peak_memory_mb": max(x["peak_memory_mb"] for x in r)} for r in results.values())
    memory = "peak allocated GPU memory" if full["device"] == "cuda" else "peak resident memory of the process"
    print(f"preset {args.preset}, batch {args.batch}, LoRA rank {args.rank} on {args.targets}; {memory}")
    print(f"{'':<22}{'full':>14}{'LoRA':>14}{'LoRA / full':>14}")
    for key, fmt in (("trainable", "{:,.0f}"), ("peak_memory_mb", "{:.1f}"), ("step_s", "{:.4f}")):
        print(f"{key:<22}{fmt.format(full[key]):>14}{fmt.format(lora[key]):>14}{lora[key] / full[key]:>14.3f}")


if __name__ == "__main__":
    main()
