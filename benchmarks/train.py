"""Training speed of `llm pretrain` against its peers, by the wall time of whole commands.

    python benchmarks/train.py [--shapes nanogpt-cpu,small] [--nanogpt ~/nanoGPT] [--busy] [--repeats 2]

Each program trains the same shape on the same corpus (tinyshakespeare, a token per character, no biases) for two
step counts; tokens/s is the extra tokens of the longer run over its extra seconds, so start-up, data preparation and
the validations at the start and the end cancel out. The programs, run alternately (the machine is shared: a slow stretch then hits all of them):

- `nanoGPT`: nanoGPT's own train.py, fp32 and no compile as its README runs it on a CPU, when --nanogpt names a
  checkout (https://github.com/karpathy/nanoGPT; not part of this project). Its char-level data is prepared into the
  checkout's data/shakespeare_char/ from the same corpus the first time.
- `reference`: a plain PyTorch loop written below (a nanoGPT-like GPT, torch.optim.AdamW, gradient clipping, the
  loss read every step), fp32, torch's default threads.
- `llm fp32, spinning threads`: `llm pretrain` with the settings it had before it chose them for the machine
  (`--precision fp32`, OpenMP threads that spin while they wait).
- `llm`: `llm pretrain` with its defaults.

--busy runs everything twice: on the machine as it is, and beside a burner (a process multiplying matrices with
torch's default threads on every core, as a second training run or a test suite would). The table gives the median
tokens/s over the repeats with the range, each program's ratio to nanoGPT (or the reference) and its peak RSS.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data/tinyshakespeare.txt"
# name: (layers, heads, width, context, batch, step counts)
SHAPES = {
    "nanogpt-cpu": (4, 4, 128, 64, 12, (50, 250)),  # nanoGPT README's CPU config (char-level shakespeare)
    "small": (6, 6, 384, 256, 16, (3, 9)),  # nanoGPT's shakespeare_char shape at batch 16
}
VOCAB = 65  # the reference's: nanoGPT's char-level vocabulary has 65 symbols
# `llm` trains on the same characters: a char tokenizer makes each one token, as nanoGPT's data does; its vocabulary
# also holds the 256 byte-fallback tokens (never used on this corpus), so it has about 320 embeddings
LLM_VOCAB = 400  # an upper bound for --type char
BURNER = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def reference_run(layers, heads, width, context, batch, steps):
    """A plain PyTorch training loop of a nanoGPT-like model on random tokens (speed does not depend on them)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
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

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(VOCAB, width), nn.Embedding(context, width)
            self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
            self.ln_f = nn.LayerNorm(width)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.t()
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    torch.manual_seed(0)
    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(steps):
        inputs, targets = torch.randint(0, VOCAB, (2, batch, context))
        loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()


def commands(shape, steps, tmp: Path, nanogpt: Path | None) -> dict[str, tuple[list, dict]]:
    """{program: (command, environment)} for one run of `steps` steps."""
    layers, heads, width, context, batch, _ = SHAPES[shape]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS"):  # each program chooses its own
        env.pop(name, None)
    config = tmp / f"{shape}.yaml"
    # no biases, as nanoGPT's train.py (bias = False)
    config.write_text(json.dumps({"model": dict(n_layer=layers, n_head=heads, n_embd=width, context=context,
                                                bias=False),
                                  "train": dict(batch_size=batch, eval_batches=2, warmup_steps=2)}))
    llm = [sys.executable, "-m", "llmcli", "pretrain", str(CORPUS), "--config", str(config), "--tokenizer",
           str(tmp / "tokenizer.model"), "--max-steps", str(steps), "--eval-interval", str(steps)]
    out = tmp / f"run-{time.monotonic_ns()}"
    programs = {}
    if nanogpt is not None:
        programs["nanoGPT"] = ([sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
                                "--compile=False", f"--n_layer={layers}", f"--n_head={heads}", f"--n_embd={width}",
                                f"--block_size={context}", f"--batch_size={batch}", f"--max_iters={steps}",
                                f"--lr_decay_iters={steps}", f"--eval_interval={steps}", "--eval_iters=2",
                                "--log_interval=1000000", "--dropout=0.0", "--always_save_checkpoint=False",
                                f"--out_dir={out}-nanogpt"], env)
    programs["reference"] = ([sys.executable, __file__, "--reference-run",
                              ",".join(map(str, (layers, heads, width, context, batch, steps)))], env)
    # OMP_WAIT_POLICY set to nothing: libgomp's own default (spin, then sleep), which `llm` no longer leaves in place
    programs["llm fp32, spinning threads"] = (llm + ["--precision", "fp32", "-o", f"{out}-old"],
                                              env | {"OMP_WAIT_POLICY": ""})
    programs["llm"] = (llm + ["-o", f"{out}-llm"], env)
    return programs


def timed(command, env, cwd) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of a command, which must succeed."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(map(str, command))}\n{stderr.decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def prepare(tmp: Path, nanogpt: Path | None):
    """The char tokenizer all `llm` runs share, the token cache warmed, nanoGPT's char-level data."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    llm = [sys.executable, "-m", "llmcli"]
    subprocess.run(llm + ["tokenize", "train", str(CORPUS), "--type", "char", "--vocab-size", str(LLM_VOCAB), "-o",
                          str(tmp)], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(llm + ["pretrain", str(CORPUS), "--preset", "nano", "--tokenizer", str(tmp / "tokenizer.model"),
                          "--max-steps", "1", "-o", str(tmp / "warm")], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if nanogpt is not None:
        data = nanogpt / "data" / "shakespeare_char"
        if not (data / "train.bin").is_file():
            (data / "input.txt").write_bytes(CORPUS.read_bytes())  # prepare.py downloads it only when missing
            subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, stdout=subprocess.DEVNULL)


def measure(shapes, repeats, tmp, nanogpt, label, steps=None) -> list[tuple]:
    rows = []
    for shape in shapes:
        layers, heads, width, context, batch, (short, long) = SHAPES[shape]
        short, long = steps or (short, long)
        results = {}  # program: [(tokens/s, peak RSS)]
        for _ in range(repeats):
            runs = {}
            for n in (short, long):
                for program, (command, env) in commands(shape, n, tmp, nanogpt).items():
                    cwd = nanogpt if program == "nanoGPT" else ROOT
                    runs[program, n] = timed(command, env, cwd)
                    print(f"  {label} {shape} {program} {n} steps: {runs[program, n][0]:.1f}s",
                          file=sys.stderr, flush=True)
            for program in dict.fromkeys(p for p, _ in runs):  # in the order they ran
                extra = runs[program, long][0] - runs[program, short][0]
                # nan: the longer run took no longer; start-up time varied more than the extra steps took
                tokens_per_s = (long - short) * batch * context / extra if extra > 0 else float("nan")
                results.setdefault(program, []).append((tokens_per_s, runs[program, long][1]))
        for program, values in results.items():
            rows.append((f"{shape} ({layers}L/{heads}H/{width}, ctx {context}, batch {batch})", label, program,
                         [v[0] for v in values], max(v[1] for v in values)))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="nanogpt-cpu,small")
    parser.add_argument("--nanogpt", type=Path, help="a checkout of github.com/karpathy/nanoGPT to compare with")
    parser.add_argument("--busy", action="store_true", help="also measure beside a torch burner on every core")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", help="the two step counts, e.g. 20,80 [default: per shape]")
    parser.add_argument("--reference-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_run:
        return reference_run(*map(int, args.reference_run.split(",")))
    if args.nanogpt is not None and not (args.nanogpt / "train.py").is_file():
        sys.exit(f"{args.nanogpt} is not a nanoGPT checkout (no train.py)")
    shapes = args.shapes.split(",")
    steps = tuple(map(int, args.steps.split(","))) if args.steps else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(tmp, args.nanogpt)
        rows = measure(shapes, args.repeats, tmp, args.nanogpt, "as is", steps)
        if args.busy:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
            burner = subprocess.Popen([sys.executable, "-c", BURNER], env=env)
            try:
                rows += measure(shapes, args.repeats, tmp, args.nanogpt, "busy", steps)
            finally:
                burner.kill()
                burner.wait()
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; tokens/s: median over "
          f"{args.repeats} repeats [range]\n")
    print("| shape | machine | program | tokens/s | ratio | peak RSS |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        for label in ("as is", "busy"):
            group = [r for r in rows if r[0].startswith(shape) and r[1] == label]
            if not group:
                continue
            baseline = next(r for r in group if r[2] == ("nanoGPT" if args.nanogpt else "reference"))
            for name, _, program, speeds, rss in group:
                median = statistics.median(speeds)
                print(f"| {name} | {label} | {program} | {median:,.0f} [{min(speeds):,.0f}-{max(speeds):,.0f}] | "
                      f"{median / statistics.median(baseline[3]):.2f}x | {rss / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
