"""Training speed: tokens/s and model FLOPs utilisation of `llm`'s training step against a plain PyTorch reference.

    python benchmarks/train.py [--shapes nanogpt-cpu,small] [--precisions fp32,bf16-mixed] [--compile] [--steps 6]

For each shape and precision it times our step (llmcli.model.Transformer + llmcli.train.train_step: fused AdamW,
gradient clipping, token-normalised loss) and a straightforward reference written below (a nanoGPT-like GPT with
the same shapes, torch.optim.AdamW defaults, the same batch), alternating the two, and prints median tokens/s, MFU and
the ratio ours / reference. MFU = (6 * parameters + 12 * layers * width * context) FLOPs per token, over the matmul
rate this machine measures at the start for the same precision.
"""

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmcli.config import TrainConfig  # noqa: E402
from llmcli.model.transformer import ModelConfig, Transformer  # noqa: E402
from llmcli.train.pretrain import World, make_optimizer, train_step  # noqa: E402

# name: (layers, heads, width, context, batch, vocab)
SHAPES = {
    "nanogpt-cpu": (4, 4, 128, 64, 12, 65),  # nanoGPT README's CPU config (char-level shakespeare)
    "small": (6, 6, 384, 256, 16, 65),  # nanoGPT's shakespeare_char shape at batch 16
    "nano": (2, 2, 64, 64, 16, 512),
    "tiny": (4, 4, 128, 256, 32, 2048),
}


class RefBlock(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn, self.attn_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc, self.fc_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, layers, heads, width, context, vocab):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(RefBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def matmul_rate(dtype) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    times = []
    for _ in range(6):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * 2048**3 / min(times[1:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="nanogpt-cpu,small")
    parser.add_argument("--precisions", default="fp32,bf16-mixed")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 2 warm-up steps)")
    args = parser.parse_args()
    rates = {"fp32": matmul_rate(torch.float32), "bf16-mixed": matmul_rate(torch.bfloat16)}
    print(f"matmul rate: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16-mixed'] / 1e9:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)\n")
    print("| shape | precision | compile | ours tokens/s | reference tokens/s | ours / reference | ours MFU |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        layers, heads, width, context, batch, vocab = SHAPES[shape]
        for precision in args.precisions.split(","):
            for compiled in ([False, True] if args.compile else [False]):
                tokens_per_s, mfu = run_pair(layers, heads, width, context, batch, vocab, precision, compiled,
                                             args.steps, rates[precision])
                print(f"| {shape} ({layers}L {width}w ctx {context} b {batch}) | {precision} | {compiled} | "
                      f"{tokens_per_s[0]:,.0f} | {tokens_per_s[1]:,.0f} | {tokens_per_s[0] / tokens_per_s[1]:.2f}x "
                      f"| {mfu:.1%} |", flush=True)


def run_pair(layers, heads, width, context, batch, vocab, precision, compiled, steps, rate):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab, context=context, n_layer=layers, n_head=heads, n_embd=width)
    ours = Transformer(config)
    ours_optimizer = make_optimizer(ours, TrainConfig())
    ref = RefGPT(layers, heads, width, context, vocab)
    ref_optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ours_step_model = torch.compile(ours) if compiled else ours
    ref_forward = torch.compile(ref) if compiled else ref
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    inputs = torch.randint(0, vocab, (batch, context))
    targets = torch.randint(0, vocab, (batch, context))

    def our_step():
        train_step(ours_step_model, ours_optimizer, [(inputs, targets)], 1e-3, 1.0, autocast, World())

    def ref_step():
        with autocast:
            loss = ref_forward(inputs, targets)
        ref_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_optimizer.step()
        loss.item()

    for _ in range(2):  # warm up (and compile)
        our_step()
        ref_step()
    times = ([], [])
    for _ in range(steps):  # alternate, so that a slow stretch of the shared machine hits both
        for i, step in enumerate((our_step, ref_step)):
            started = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - started)
    tokens = batch * context
    tokens_per_s = [tokens / statistics.median(t) for t in times]
    flops_per_token = 6 * ours.num_params() + 12 * layers * width * context
    return tokens_per_s, flops_per_token * tokens_per_s[0] / rate


if __name__ == "__main__":
    main()
