"""Language-model evaluation: loss, perplexity and bits per byte of a checkpoint on a text file.

The file is tokenized as in training (each document after an end-of-text token) and scored in consecutive windows
of the model's context, in batches and without gradients. Every token but the first is predicted exactly once.
Bits per byte divides the total loss in bits by the UTF-8 bytes of the file, so it compares models whatever their
tokenizers.
"""

import math
import os
import time

import torch
import torch.nn.functional as F

from llmcli import data
from llmcli.errors import LLMError
from llmcli.model import Transformer
from llmcli.progress import progress_bar
from llmcli.tokenizer import Tokenizer


def tokenize_file(tokenizer: Tokenizer, path: str) -> list[int]:
    ids: list[int] = []
    start = [tokenizer.end_of_text] if tokenizer.end_of_text is not None else []
    docs = list(data.read_documents([path]))
    for doc_ids in tokenizer.encode_batch(docs):
        ids += start + doc_ids
    return ids


@torch.no_grad()
def evaluate_file(model: Transformer, tokenizer: Tokenizer, path: str, batch_size: int = 8) -> dict:
    path = str(data.check_text_file(path))
    n_bytes = os.path.getsize(path)
    started = time.perf_counter()
    ids = tokenize_file(tokenizer, path)
    if len(ids) < 2:
        raise LLMError(f"{path} has no text to score" if n_bytes == 0 or not ids else f"{path} is too short to score")
    context = model.config.context
    tokens = torch.tensor(ids, dtype=torch.long)
    # window at s: inputs tokens[s:s+context], targets one further; full windows in batches, then the short tail
    n_full = (len(ids) - 1) // context
    starts = [i * context for i in range(n_full)]
    batches = [starts[b:b + batch_size] for b in range(0, n_full, batch_size)]
    if (len(ids) - 1) % context:
        batches.append([n_full * context])
    total_nll = 0.0
    with progress_bar("scoring", len(batches)) as update:
        for group in batches:
            n = min(context, len(ids) - 1 - group[0])
            inputs = torch.stack([tokens[s:s + n] for s in group])
            targets = torch.stack([tokens[s + 1:s + n + 1] for s in group])
            logits = model(inputs)
            total_nll += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            update(advance=1)
    n_predicted = len(ids) - 1
    loss = total_nll / n_predicted
    return {
        "file": path,
        "tokens": n_predicted,
        "bytes": n_bytes,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "context": context,
        "tokens_per_s": round(n_predicted / (time.perf_counter() - started)),
    }
