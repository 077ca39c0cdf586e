"""GGUF files, llama.cpp's and ollama's format: read llama, qwen2 and gpt2 models into our Transformer, write ours.

A GGUF file is one file: key/value metadata (the model's shape under `{architecture}.*` keys, the tokenizer under
`tokenizer.ggml.*`, the chat template under `tokenizer.chat_template`), then the tensors, each in its own type (float
or one of ggml's block quantizations). Read and written with the `gguf` package, llama.cpp's own Python library
(a dependency); format: github.com/ggml-org/ggml/blob/master/docs/gguf.md.

reading.py opens files and builds the model, tokenizer.py the tokenizer (as llama.cpp does), writing.py writes ours;
layout.py says where our tensors live in a file, for both directions.
"""

from llmcli.formats.gguf.layout import ARCHITECTURES
from llmcli.formats.gguf.reading import (READ_TYPES, dequantize, gguf_info, is_gguf_file, load_gguf, open_gguf,
                                         read_metadata)
from llmcli.formats.gguf.tokenizer import gguf_tokenizer
from llmcli.formats.gguf.writing import WRITE_TYPES, write_gguf

__all__ = ["ARCHITECTURES", "READ_TYPES", "WRITE_TYPES", "dequantize", "gguf_info", "gguf_tokenizer", "is_gguf_file",
           "load_gguf", "open_gguf", "read_metadata", "write_gguf"]
