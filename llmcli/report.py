"""Tables of `llm eval` results, on stdout (they are the result)."""

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_eval_tables(results: list[dict]):
    console = Console()
    if not console.is_terminal:  # a pipe or a file: wide enough that paths are not folded
        console = Console(width=160)
    text = [r for r in results if "bits_per_byte" in r]
    tasks = [r for r in results if "accuracy" in r]
    models = list(dict.fromkeys(r["model"] for r in results))
    several = len(models) > 1
    if text and several:
        files = list(dict.fromkeys(r["file"] for r in text))
        grid = Table(title="bits per byte (lower is better)")
        grid.add_column("model", overflow="fold")
        for f in files:
            grid.add_column(Path(f).name, justify="right")
        cells = {(r["model"], r["file"]): f"{r['bits_per_byte']:.4f}" for r in text}
        for m in models:
            grid.add_row(m, *(cells.get((m, f), "") for f in files))
        console.print(grid)
    if text:
        contexts = {(r["context"], r["stride"]) for r in text}
        title = "text"
        if len(contexts) == 1:
            ((context, stride),) = contexts
            title = (f"context {context} tokens, stride {stride}: past the first window every token is predicted "
                     f"from at least {context - stride} tokens before it")
        table = Table(title=title)
        columns = (["model"] if several else []) + ["file", "tokens", "loss", "perplexity", "bits/byte", "tokens/s"]
        if len(contexts) > 1:
            columns[-1:-1] = ["context", "stride"]
        for column in columns:
            table.add_column(column, justify="left" if column in ("model", "file") else "right", overflow="fold")
        for r in text:
            row = {"model": r["model"], "file": r["file"], "tokens": f"{r['tokens']:,}", "loss": f"{r['loss']:.4f}",
                   "perplexity": f"{r['perplexity']:.2f}", "bits/byte": f"{r['bits_per_byte']:.4f}",
                   "context": str(r["context"]), "stride": str(r["stride"]), "tokens/s": f"{r['tokens_per_s']:,}"}
            table.add_row(*(row[c] for c in columns))
        console.print(table)
    if tasks:
        table = Table(title="multiple choice (± standard error; norm: log-likelihood per byte of the choice)")
        columns = (["model"] if several else []) + ["task", "examples", "accuracy", "accuracy norm", "chance",
                                                    "tokens/s"]
        for column in columns:
            table.add_column(column, justify="left" if column in ("model", "task") else "right", overflow="fold")
        for r in tasks:
            row = {"model": r["model"], "task": r["file"], "examples": f"{r['examples']:,}",
                   "accuracy": f"{r['accuracy']:.3f} ± {r['accuracy_stderr']:.3f}",
                   "accuracy norm": f"{r['accuracy_norm']:.3f} ± {r['accuracy_norm_stderr']:.3f}",
                   "chance": f"{r['chance']:.3f}", "tokens/s": f"{r['tokens_per_s']:,}"}
            table.add_row(*(row[c] for c in columns))
        console.print(table)
