"""Loss curves: training and validation loss against tokens seen, from the metrics.jsonl of training runs, and the
validation in bits per byte of text (on a second axis) where the runs recorded it.

`plot_runs` draws several runs overlaid into a PNG with matplotlib (an optional extra: `pip install llmcli[plot]`);
`sparkline` is the small curve of the end-of-run summary in the terminal, text only.
"""

import json
from pathlib import Path

from llmcli.errors import LLMError

BARS = "▁▂▃▄▅▆▇█"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LLMError(f"{run_dir} has no metrics.jsonl: not a training run directory")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a row cut short by a kill
    return rows


def sparkline(values: list[float], width: int = 60) -> str:
    """values squeezed into width bars, each the mean of its share, scaled between the least and the most."""
    if not values:
        return ""
    bars = min(width, len(values))
    shares = [values[i * len(values) // bars:(i + 1) * len(values) // bars] for i in range(bars)]
    means = [sum(share) / len(share) for share in shares]
    low, high = min(means), max(means)
    span = (high - low) or 1.0
    return "".join(BARS[round((m - low) / span * (len(BARS) - 1))] for m in means)


def plot_runs(run_dirs: list[Path], out: Path, smooth: int = 20) -> Path:
    """One PNG: for each run its training loss (a moving mean over `smooth` steps), its validation loss and, on the
    right axis, its validation bits per byte (val_bpb, pretraining runs)."""
    try:
        import matplotlib
    except ImportError:
        raise LLMError("llm plot needs matplotlib: pip install 'llmcli[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    figure, axes = plt.subplots(figsize=(8, 5))
    bpb_axes = axes.twinx() if any("val_bpb" in r for _, rows in runs for r in rows) else None
    for i, (run_dir, rows) in enumerate(runs):
        color = f"C{i}"
        train = [(r["tokens"], r["train_loss"]) for r in rows if "train_loss" in r]
        val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
        if not train and not val:
            raise LLMError(f"{run_dir}/metrics.jsonl holds no losses yet")
        if train:
            losses = [loss for _, loss in train]
            window = max(1, min(smooth, len(losses) // 10))
            smoothed = [sum(losses[max(0, j - window + 1):j + 1]) / len(losses[max(0, j - window + 1):j + 1])
                        for j in range(len(losses))]
            axes.plot([t for t, _ in train], smoothed, color=color, alpha=0.6, label=f"{run_dir.name} train")
        if val:
            axes.plot([t for t, _ in val], [loss for _, loss in val], "o-", color=color, label=f"{run_dir.name} val")
        bpb = [(r["tokens"], r["val_bpb"]) for r in rows if "val_bpb" in r]
        if bpb:
            bpb_axes.plot([t for t, _ in bpb], [b for _, b in bpb], "s--", color=color, alpha=0.5,
                          label=f"{run_dir.name} val bits per byte")
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if bpb_axes is not None:
        bpb_axes.set_ylabel("validation bits per byte")
        more = bpb_axes.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    axes.legend(handles, labels)
    figure.tight_layout()
    try:
        figure.savefig(out, dpi=120)
    except OSError as e:
        raise LLMError(f"cannot write {out}: {e.strerror}") from None
    except ValueError as e:  # an extension matplotlib has no format for
        raise LLMError(f"cannot write {out}: {e}") from None
    finally:
        plt.close(figure)
    return Path(out)
