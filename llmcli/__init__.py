"""llm: a command-line workbench to tokenize, pretrain, fine-tune, sample from and evaluate small language models.

As a library: `model = llmcli.load()`, then model.generate / stream / chat / bits_per_byte (llmcli/api.py, docs/api.md).
"""

import importlib

__version__ = "0.1.0"
__all__ = ["load", "Model"]


def __getattr__(name: str):
    # the API on first use, not on `import llmcli`: the CLI's --help must not import torch. (importlib, not an import
    # statement: the package's face is the top of the layers, while its __init__ is imported by every module.)
    if name in __all__:
        return getattr(importlib.import_module("llmcli.api"), name)
    raise AttributeError(f"module 'llmcli' has no attribute {name!r}")
