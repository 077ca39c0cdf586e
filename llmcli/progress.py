"""Progress and logs, always on stderr: a live Rich display when stderr is a terminal, plain lines otherwise."""

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def log(message: str):
    console.print(message, highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str, total: float | None, fields: str = ""):
    """Yield update(advance=..., completed=..., **fields); a no-op when stderr is not a terminal.

    fields is a format string over the keyword fields, shown after the bar (e.g. "loss {task.fields[loss]:.3f}").
    """
    if not console.is_terminal:
        yield lambda **kwargs: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if fields:
        columns.append(TextColumn(fields))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, **_placeholders(fields))
        yield lambda **kwargs: progress.update(task, **kwargs)


def _placeholders(fields: str) -> dict:
    """Initial values for the fields a format string names, so the first render does not fail."""
    import re

    return {name: 0.0 for name in re.findall(r"task\.fields\[(\w+)\]", fields)}
