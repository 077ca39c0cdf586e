"""Language-model evaluation: loss, perplexity and bits per byte of a checkpoint on a text file.

The file is tokenized as in training (each document after an end-of-text token) and scored with a sliding window:
windows of the model's context start every `stride` tokens, and each scores only the tokens the windows before it
did not, so every token but the first is predicted exactly once, and (past the first window) with at least
context - stride tokens before it. stride = context is the fast, consecutive-window score; smaller strides give each
token more context and cost context/stride times as much. The last window is moved back to end at the file's end so
that all windows have one length and batch together.

Bits per byte divides the total loss in bits by the UTF-8 bytes of the text the tokens encode: the documents'
text, each line ending counted as the one byte LF whether the file has LF or CR LF, and neither the separator lines
nor the line ending that closes a document's last line (they are no document's text; the end-of-text token that
stands for a separator is scored, as the prediction that a document ends). So the same text gives the same bits per
byte whatever its line endings, and it compares models whatever their tokenizers.
"""

import math
import time

import torch
import torch.nn.functional as F

from llmcli import runtime
from llmcli.errors import LLMError
from llmcli.model.transformer import Transformer
from llmcli.progress import progress_bar
from llmcli.text import data
from llmcli.text.tokenizer import Tokenizer


def tokenize_file(tokenizer: Tokenizer, path: str) -> tuple[list[int], int]:
    """The token ids of a text file as in training (each document after the start-of-text token, if any), and
    the UTF-8 bytes of the documents' text they encode."""
    ids: list[int] = []
    start = [tokenizer.start_of_text] if tokenizer.start_of_text is not None else []
    docs = list(data.read_documents([path]))
    for doc_ids in tokenizer.encode_batch(docs):
        ids += start + doc_ids
    return ids, sum(len(doc.encode("utf-8")) for doc in docs)


def default_stride(context: int) -> int:
    return max(1, context // 2)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) of each window over n_tokens tokens: window s feeds tokens[s:s+L] and predicts
    tokens[s+1:s+L+1], L = min(context, n_tokens - 1), scoring the predictions from offset on."""
    length = min(context, n_tokens - 1)
    last = n_tokens - 1 - length  # start of the window that ends at the end of the file
    result, scored_to = [], 0  # predictions of tokens[1..scored_to] are done
    start = 0
    while True:
        start = min(start, last)
        result.append((start, scored_to - start))
        scored_to = start + length
        if start == last:
            return result
        start += stride


def evaluate_file(model: Transformer, tokenizer: Tokenizer, path: str, batch_size: int = 8,
                  stride: int | None = None) -> dict:
    """Loss, perplexity and bits per byte of a text file (see the module's docstring). Raises LLMError for a file
    without text or a stride out of range."""
    path = str(data.check_text_file(path))
    started = time.perf_counter()
    ids, n_bytes = tokenize_file(tokenizer, path)
    if len(ids) < 2 or n_bytes == 0:
        raise LLMError(f"{path} has no text to score" if n_bytes == 0 or not ids else f"{path} is too short to score")
    return {"file": path, **score(model, ids, n_bytes, batch_size, stride, started)}


def evaluate_text(model: Transformer, tokenizer: Tokenizer, text: str, batch_size: int = 8,
                  stride: int | None = None) -> dict:
    """evaluate_file of a text given as a string: one document, its UTF-8 bytes counted as they are."""
    started = time.perf_counter()
    start = [tokenizer.start_of_text] if tokenizer.start_of_text is not None else []
    ids, n_bytes = start + tokenizer.encode(text), len(text.encode("utf-8"))
    if len(ids) < 2 or n_bytes == 0:
        raise LLMError("the text is too short to score: it needs at least one token after the first")
    return score(model, ids, n_bytes, batch_size, stride, started)


@torch.no_grad()
def score(model: Transformer, ids: list[int], n_bytes: int, batch_size: int = 8, stride: int | None = None,
          started: float | None = None) -> dict:
    """Score token ids (the text of n_bytes UTF-8 bytes) with a sliding window: loss (nats a token), perplexity,
    bits per byte and what was done."""
    started = time.perf_counter() if started is None else started
    context = model.config.context
    stride = default_stride(context) if stride is None else stride
    if not 1 <= stride <= context:
        raise LLMError(f"--stride must be between 1 and the model's context ({context}), got {stride}")
    tokens = torch.tensor(ids, dtype=torch.long)
    plan = windows(len(ids), context, stride)
    length = min(context, len(ids) - 1)
    positions = torch.arange(length)
    total_nll = 0.0
    with progress_bar("scoring", len(plan)) as update:
        for b in range(0, len(plan), batch_size):
            runtime.follow_load()  # a long loop: on the cores other processes leave idle
            group = plan[b:b + batch_size]
            inputs = torch.stack([tokens[s:s + length] for s, _ in group])
            targets = torch.stack([tokens[s + 1:s + length + 1] for s, _ in group])
            logits = model(inputs)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
            scored = positions[None, :] >= torch.tensor([offset for _, offset in group])[:, None]
            total_nll += nll.view(len(group), length)[scored].sum().item()
            update(advance=len(group))
    n_predicted = len(ids) - 1
    loss = total_nll / n_predicted
    return {
        "tokens": n_predicted,
        "bytes": n_bytes,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "context": context,
        "stride": stride,
        "windows": len(plan),
        "tokens_per_s": round(n_predicted / (time.perf_counter() - started)),
    }
