"""Text embeddings from a language model's hidden states.

A text is tokenized after an end-of-text token, as documents are in training, cut to the model's context, and run
through the model; the final (normalised) hidden states are pooled into one vector and scaled to unit length, so that
the dot product of two embeddings is their cosine similarity.

Poolings: `mean` averages the states of the text's tokens; `last` takes the state of its last token (the one that
has seen the whole text). benchmarks/retrieval.py measures which retrieves better (mean, on the shipped model).
"""

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llmcli import runtime
from llmcli.errors import LLMError
from llmcli.model.transformer import Transformer
from llmcli.progress import log, progress_bar
from llmcli.text import data

POOLINGS = ("mean", "last")


def check_pooling(pooling: str):
    if pooling not in POOLINGS:
        raise LLMError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


@torch.no_grad()
def embed_texts(model: Transformer, tokenizer, texts: list[str], pooling: str = "mean",
                batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """(len(texts), n_embd) float32 unit vectors. progress: a progress bar on a terminal's stderr."""
    check_pooling(pooling)
    if not texts:
        return np.zeros((0, model.config.n_embd), dtype=np.float32)
    context = model.config.context
    start = [tokenizer.start_of_text] if tokenizer.start_of_text is not None else []
    raw = [start + ids for ids in tokenizer.encode_batch(list(texts))]
    encoded = [ids[:context] for ids in raw]
    cut = sum(len(ids) > context for ids in raw)
    if cut:
        log(f"{cut} of {len(texts)} texts were cut to the model's context of {context} tokens")
    out = np.zeros((len(texts), model.config.n_embd), dtype=np.float32)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    with progress_bar("embedding", len(order) if progress else None) as update:
        for b in range(0, len(order), batch_size):
            runtime.follow_load()  # a long loop: on the cores other processes leave idle
            rows = order[b:b + batch_size]
            lengths = torch.tensor([len(encoded[i]) for i in rows])
            ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # right padding: causal, unseen
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
            states = model.features(ids).float()
            positions = torch.arange(ids.size(1))[None, :]
            if pooling == "last":
                pooled = states[torch.arange(len(rows)), lengths - 1]
            else:
                # the text's own tokens; the end-of-text token only when the text has none
                first = torch.where(lengths > len(start), len(start), 0)[:, None]
                mask = ((positions >= first) & (positions < lengths[:, None])).float()[..., None]
                pooled = (states * mask).sum(1) / mask.sum(1)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            update(advance=len(rows))
    return out


def read_texts(source: str, field: str | None = None) -> tuple[Iterator[str], "data.Lines"]:
    """The lines of a file ('-': stdin), or with field (or a .jsonl file) that field of each JSONL record, read
    lazily; and the Lines they come from (whose ready() says whether another can be read without waiting)."""
    lines = data.read_lines(source)
    if field is not None or str(source).endswith(".jsonl"):
        return data.jsonl_texts(lines, field or "text", option="--field"), lines
    return lines, lines


def embed_stream(model: Transformer, tokenizer, texts: Iterator[str], lines: "data.Lines", pooling: str,
                 batch_size: int) -> Iterator[np.ndarray]:
    """The embeddings (n, n_embd) of texts (from read_texts), a batch at a time, each as soon as it is computed:
    an endless pipe streams. An empty input gives none (said on stderr)."""
    count = 0
    for batch in data.batches(texts, batch_size, lines.ready):
        count += len(batch)
        yield embed_texts(model, tokenizer, batch, pooling, batch_size, progress=False)
    if not count:  # the rule for empty input (README): no output, said on stderr, exit 0
        log(f"{lines.name} is empty: no texts, no embeddings")


def write_embeddings(vectors: np.ndarray, out: Path, metadata: dict):
    """.npy (numpy) or .safetensors (tensor 'embeddings', with metadata), written atomically."""
    from llmcli.files import atomic_write

    if out.suffix == ".npy":
        atomic_write(out, _npy_bytes(vectors))
    elif out.suffix == ".safetensors":
        from safetensors.numpy import save

        blob = save({"embeddings": vectors}, metadata={k: str(v) for k, v in metadata.items()})
        atomic_write(out, blob)
    else:
        raise LLMError(f"cannot write {out}: the output file must end in .npy or .safetensors")


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
