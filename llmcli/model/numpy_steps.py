"""Decode steps of a torch Transformer on the CPU run by the NumPy decoder, torch's kernels multiplying the matrices.

A decode step at batch 1 is some 40 small operations a layer besides its matrix products, and torch's overhead on
each (dispatch, dtype and shape checks, a new tensor) is several times NumPy's (docs/perf.md, "Decode steps on
NumPy"). So the engine's TorchBackend (llmcli/infer/backend.py) prefills with torch (long prompts are large matrix products, attention is SDPA's) and then runs each new token
through numpy_model.py's forward, every weight matrix still in torch: the embedding lookup is the model's module,
the linear layers and the output head are their own kernels (float32, int8 or int4, called without the module
around them: `product`; a LoRA layer is its module), on tensors that share memory with NumPy's arrays (no copies),
and the KV cache is the model's, viewed as NumPy arrays.
The logits equal the torch model's to float32 rounding (tests).
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.model.numpy_model import NumpyTransformer
from llmcli.model.quantize import Int4Linear, Int8Linear
from llmcli.model.transformer import KVCache, Transformer

def runs_on_numpy(model) -> bool:
    """Whether TorchKernels can step this model: our float32 language model on the CPU (NumPy has no bfloat16)."""
    return type(model) is Transformer and model.norm_f.weight.device.type == "cpu" and \
        model.norm_f.weight.dtype == torch.float32


class TorchKernels(NumpyTransformer):
    """NumpyTransformer over a torch Transformer's own modules and tables (nothing is copied)."""

    def __init__(self, model: Transformer):
        self.config = model.config
        self.modules = dict(model.named_modules())
        norms = {f"{name}.{key}": p for name, module in self.modules.items()
                 if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) for key, p in module.named_parameters()}
        tables = dict(model.named_buffers(recurse=False))  # rotary cos and sin, or the sinusoidal table
        if self.config.positions == "learned":
            tables["position_embedding.weight"] = model.position_embedding.weight
        self.w = {name: t.detach().numpy() for name, t in (norms | tables).items()}
        self.products = {name: product(module) for name, module in self.modules.items()
                         if isinstance(module, (nn.Linear, Int8Linear, Int4Linear))}
        if self.config.tie_embeddings:  # (a quantized model has an output head of its own)
            weight = model.token_embedding.weight
            self.products["lm_head"] = lambda x: F.linear(x, weight)

    def forward(self, idx: np.ndarray, pos: int, cache: list[tuple[np.ndarray, np.ndarray]],
                pad: np.ndarray | None = None) -> np.ndarray:
        """NumpyTransformer.forward; cache: the model's KVCache buffers as NumPy arrays (kv_cache_arrays), of B
        rows."""
        with torch.inference_mode():
            return super().forward(idx, pos, cache, pad)

    def _embed(self, idx: np.ndarray) -> np.ndarray:
        return self.modules["token_embedding"](torch.from_numpy(idx)).numpy()

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = self.products[name](torch.from_numpy(x.reshape(-1, x.shape[-1]))).numpy()
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _head(self, x: np.ndarray) -> np.ndarray:
        return self._linear(x, "lm_head")


def product(module: nn.Module):
    """x (rows, in) -> x W^T + b (rows, out) of a linear layer, float32, by the kernel its forward calls but without
    the module call around it (hooks, reshapes, checks: a large part of a small product's cost, docs/perf.md)."""
    if type(module) in (Int8Linear, Int4Linear):
        kernel = module.product
        bias = module.bias
        return kernel if bias is None else lambda x: kernel(x).add_(bias)
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module  # (a LoRA layer: its own forward)


def kv_cache_arrays(caches: list[KVCache]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The keys and values of these caches (model.kv_caches(): a layer each) as NumPy arrays sharing their memory,
    (batch, kv_heads, max_len, head_dim) each."""
    return [(cache.k.numpy(), cache.v.numpy()) for cache in caches]
