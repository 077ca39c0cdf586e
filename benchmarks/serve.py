"""What continuous batching buys `llm serve`: the same requests sent one at a time, then by 4, 16 and 64 clients.

    python benchmarks/serve.py [--requests 64] [--max-tokens 128] [--max-batch 64] [-m MODEL]

Starts `llm serve` on a free loopback port with the shipped model (or -m), and sends the same streamed completion
requests (a different prompt each, sampled with its own seed) from 1, 4, 16 and 64 concurrent clients, each client
sending its next request when the last one ended. Prints, a row per number of clients: requests sent, completed and
failed, completion tokens, aggregate tokens/s (all completion tokens over the wall time) and its ratio to one client
at a time, and time to first token (from sending a request to its first piece of text) at the median and 99th
percentile. Clients and server share this machine's cores.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
THINGS = ["a cat", "a dog", "a red ball", "a girl who liked to sing", "a tall tree", "a boat", "the sun", "the moon",
          "a bird", "a fish", "a happy frog", "a little car", "a kind bear", "a toy", "a flower", "a cake"]


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Send one streamed completion; its time to first token (to the first event, which carries the first piece of
    text), completion tokens (from the usage event) and whether it completed. The client reads the events only at
    the end: it shares the cores with the server."""
    started = time.perf_counter()
    first, received = None, bytearray()
    try:
        async with http.stream("POST", url + "/completions", json=body) as response:
            async for data in response.aiter_raw():
                first = first or time.perf_counter() - started
                received += data
            if response.status_code != 200:
                return {"ok": False, "status": response.status_code}
    except httpx.HTTPError as e:
        return {"ok": False, "status": type(e).__name__}
    events = received.decode().split("\n\n")
    usage = [json.loads(e[6:])["usage"] for e in events if e.startswith('data: {') and '"usage": {' in e]
    done = "data: [DONE]" in events and len(usage) == 1
    return {"ok": done, "ttft": first, "tokens": usage[0]["completion_tokens"] if done else 0}


async def run_clients(url: str, bodies: list[dict], clients: int) -> tuple[list[dict], float]:
    """bodies sent by `clients` concurrent clients; (the results, the wall time)."""
    queue = list(reversed(bodies))
    results = []

    async def client(http):
        while queue:
            results.append(await one_request(http, url, queue.pop()))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return results, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per row (the same ones every row)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("-m", "--model", default=None)
    args = parser.parse_args()
    command = [sys.executable, "-m", "llmcli", "serve", "--port", "0", "--max-batch", str(args.max_batch),
               "--max-queue", str(4 * args.requests)] + (["-m", args.model] if args.model else [])
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        url = server.stdout.readline().strip()
        if not url:
            sys.exit(f"{' '.join(command)} did not start")
        model = httpx.get(url + "/models").json()["data"][0]["id"]
        bodies = [{"model": model, "prompt": f"Tell me a story about {THINGS[i % len(THINGS)]}", "seed": i,
                   "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
                  for i in range(args.requests)]
        asyncio.run(run_clients(url, bodies[:2], 1))  # warm up
        print(f"llm serve --max-batch {args.max_batch}, model {model}; {args.requests} streamed completions of at most "
              f"{args.max_tokens} tokens a row; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
        print(f"{'clients':>7} {'sent':>5} {'done':>5} {'failed':>6} {'tokens':>7} {'wall s':>7} {'tok/s':>7} "
              f"{'vs 1':>6} {'TTFT p50':>9} {'TTFT p99':>9}")
        baseline = None
        for clients in map(int, args.clients.split(",")):
            results, wall = asyncio.run(run_clients(url, bodies, clients))
            done = [r for r in results if r["ok"]]
            tokens = sum(r["tokens"] for r in done)
            rate = tokens / wall
            baseline = baseline or rate
            ttft = [r["ttft"] for r in done if r["ttft"] is not None] or [float("nan")]
            print(f"{clients:>7} {len(results):>5} {len(done):>5} {len(results) - len(done):>6} {tokens:>7} "
                  f"{wall:>7.1f} {rate:>7.0f} {rate / baseline:>5.2f}x {percentile(ttft, 50) * 1000:>7.0f}ms "
                  f"{percentile(ttft, 99) * 1000:>7.0f}ms", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
