"""Semantic search: rank the documents of a file by the cosine similarity of their embeddings to a query's.

Documents are the records of a .jsonl file (field `text`), the texts between `<|endoftext|>` lines of a file that
has such lines, or else the non-empty lines of the file. Their embeddings are cached next to the file, in
`.NAME.KEY.embeddings.safetensors`, KEY a hash of the file's bytes, the model's files and the pooling: a second
search of the same file with the same model embeds only the query. A cache file that does not hold one finite unit
vector per document is rebuilt; a folder that cannot be written gets no cache.
"""

import hashlib
from pathlib import Path

import numpy as np

from llmcli.errors import LLMError
from llmcli.eval.embed import embed_texts
from llmcli.progress import log
from llmcli.text import data


def read_docs(path: Path) -> list[str]:
    data.check_text_file(path)
    if path.suffix == ".jsonl":
        docs = list(data.read_documents([path]))
    elif any(line.strip() == data.DOC_SEPARATOR for line in data.read_lines(path)):
        docs = [d for d in data.read_documents([path]) if d.strip()]
    else:
        docs = [line for line in data.read_lines(path) if line.strip()]
    if not docs:
        raise LLMError(f"{path} has no documents to search")
    return docs


def model_key(model_dir: Path) -> str:
    """A hash that changes when the model's files do (their names, sizes and modification times; cheap). model_dir
    may also be a single-file model (GGUF)."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.iterdir()) if model_dir.is_dir() else [model_dir]:
        if f.is_file() and f.suffix in (".safetensors", ".yaml", ".json", ".model", ".gguf"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_path(docs_path: Path, model_dir: Path, pooling: str) -> Path:
    h = hashlib.sha256(docs_path.read_bytes())
    h.update(model_key(model_dir).encode() + pooling.encode())
    return docs_path.with_name(f".{docs_path.name}.{h.hexdigest()[:16]}.embeddings.safetensors")


def doc_embeddings(model, tokenizer, model_dir: Path, docs_path: Path, docs: list[str], pooling: str) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from llmcli.eval.embed import write_embeddings

    cache = cache_path(docs_path, model_dir, pooling)
    if cache.is_file():
        try:
            vectors = load_file(str(cache))["embeddings"]
            # anyone who can write the folder can change the file: only unit vectors of the right shape are used
            if (vectors.shape == (len(docs), model.config.n_embd) and vectors.dtype == np.float32
                    and np.isfinite(vectors).all()
                    and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)):
                log(f"document embeddings from the cache {cache}")
                return vectors
        except (SafetensorError, OSError, KeyError):
            pass
        log(f"the cache {cache} does not fit these documents: embedding them again")
    vectors = embed_texts(model, tokenizer, docs, pooling)
    try:
        write_embeddings(vectors, cache, {"docs": docs_path.name, "model": str(model_dir), "pooling": pooling})
        log(f"cached the document embeddings in {cache}")
    except LLMError as e:
        log(f"not cached: {e}")
    return vectors


def top_k(query: np.ndarray, vectors: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(document index, cosine) of the k most similar documents, best first; vectors are unit length."""
    scores = vectors @ query
    best = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in best]
