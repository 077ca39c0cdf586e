"""Multiple-choice tasks scored by log-likelihood, in the style of lm-evaluation-harness.

A task file is JSONL, one example a line: {"context": str, "choices": [str, ...], "answer": index}. Each choice is
scored by the log-probability the model gives its tokens after the context (the context after an end-of-text token,
as documents are seen in training, and cut from the left if it does not fit). The prediction is the most likely
choice (accuracy) or the most likely per UTF-8 byte of the choice (length-normalised accuracy, so long choices are
not penalised for being long). Both come with the standard error of the mean over examples.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcli import runtime
from llmcli.errors import LLMError
from llmcli.model.transformer import Transformer
from llmcli.progress import progress_bar
from llmcli.text import data

FIELDS = ("context", "choices", "answer")


@dataclass
class Example:
    context: str
    choices: list[str]
    answer: int


def is_task_file(path: str | Path) -> bool:
    """A .jsonl file whose first record has any of context/choices/answer is a task; every other file is text."""
    if not str(path).endswith(".jsonl") or not Path(path).is_file():
        return False
    for line in data.read_lines(path):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return True  # looks meant as a task; read_task names the bad line
            return not isinstance(record, dict) or any(k in record for k in FIELDS)
    return True  # an empty .jsonl: read_task says it is empty


def read_task(path: str | Path) -> list[Example]:
    examples = []
    for number, record in data.read_jsonl(path):
        where = f"{path}: line {number}"
        missing = [k for k in FIELDS if k not in record]
        if missing:
            raise LLMError(f"{where} lacks the field '{missing[0]}' (a task line has {', '.join(FIELDS)})")
        context, choices, answer = (record[k] for k in FIELDS)
        if not isinstance(context, str):
            raise LLMError(f"{where}: 'context' must be a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise LLMError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise LLMError(f"{where}: answer {answer!r} is out of range for {len(choices)} choices "
                           f"(an index from 0 to {len(choices) - 1})")
        examples.append(Example(context, choices, answer))
    if not examples:
        raise LLMError(f"{path} has no examples")
    return examples


def _request(tokenizer, context: str, choice: str, max_len: int, where: str) -> tuple[list[int], int]:
    """(tokens, n_choice): the context's and the choice's tokens, the choice's being the last n_choice.

    The pair is encoded whole when the context's tokens are a prefix of the whole's (so the choice is tokenized as
    the model would see it in running text), else as two parts."""
    start = [tokenizer.start_of_text] if tokenizer.start_of_text is not None else []
    ctx = tokenizer.encode(context) if context else []
    whole = tokenizer.encode(context + choice)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx and len(whole) > len(ctx) else tokenizer.encode(choice)
    if len(cont) > max_len:
        raise LLMError(f"{where}: a choice of {len(cont)} tokens is longer than the model's context "
                       f"({max_len} predictions a window)")
    tokens = (start + ctx + cont)[-(max_len + 1):]  # keep the end: the choice and as much context as fits
    return tokens, len(cont)


@torch.no_grad()
def evaluate_task(model: Transformer, tokenizer, path: str, batch_size: int = 16) -> dict:
    path = str(data.check_text_file(path))
    examples = read_task(path)
    started = time.perf_counter()
    context = model.config.context
    requests = []  # (tokens, n_choice, example index, choice index)
    for i, ex in enumerate(examples):
        for j, choice in enumerate(ex.choices):
            tokens, n = _request(tokenizer, ex.context, choice, context, f"{path}: example {i + 1}")
            requests.append((tokens, n, i, j))
    logprob = [[0.0] * len(ex.choices) for ex in examples]
    order = sorted(range(len(requests)), key=lambda r: len(requests[r][0]))  # similar lengths batch together
    n_tokens = 0
    with progress_bar("scoring choices", len(order)) as update:
        for b in range(0, len(order), batch_size):
            runtime.follow_load()  # a long loop: on the cores other processes leave idle
            group = [requests[r] for r in order[b:b + batch_size]]
            width = max(len(t) for t, *_ in group) - 1
            # right padding: a causal model's earlier positions never see it
            inputs = torch.zeros(len(group), width, dtype=torch.long)
            targets = torch.zeros(len(group), width, dtype=torch.long)
            for row, (tokens, *_) in enumerate(group):
                inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
                targets[row, :len(tokens) - 1] = torch.tensor(tokens[1:])
            logp = F.log_softmax(model(inputs).float(), dim=-1).gather(-1, targets[..., None])[..., 0]
            for row, (tokens, n, i, j) in enumerate(group):
                logprob[i][j] = logp[row, len(tokens) - 1 - n:len(tokens) - 1].sum().item()
                n_tokens += len(tokens) - 1
            update(advance=len(group))
    correct = [max(range(len(lp)), key=lp.__getitem__) == ex.answer for lp, ex in zip(logprob, examples)]
    correct_norm = [max(range(len(lp)), key=lambda j: lp[j] / len(ex.choices[j].encode())) == ex.answer
                    for lp, ex in zip(logprob, examples)]
    accuracy, accuracy_se = _mean_and_se(correct)
    norm, norm_se = _mean_and_se(correct_norm)
    return {
        "file": path,
        "examples": len(examples),
        "accuracy": accuracy,
        "accuracy_stderr": accuracy_se,
        "accuracy_norm": norm,
        "accuracy_norm_stderr": norm_se,
        "chance": sum(1 / len(ex.choices) for ex in examples) / len(examples),
        "context": context,
        "tokens_per_s": round(n_tokens / (time.perf_counter() - started)),
    }


def _mean_and_se(outcomes: list[bool]) -> tuple[float, float]:
    n = len(outcomes)
    p = sum(outcomes) / n
    return p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0
