"""What the engine asks of a model: prefill prompts into a KV cache, one decode step of a batch, copy cached rows.

Two backends. TorchBackend runs our torch Transformer (ours, Hugging Face's and GGUF's models alike); on the CPU it
steps small batches through NumPy between the model's own kernels (llmcli/model/numpy_steps.py) and larger ones on
torch, whichever is the faster (llmcli.runtime.MOST_ROWS, MOST_KEYS): both write the same cache, so it may switch at
any step. NumpyBackend runs the NumpyTransformer, the torch-free cold start of a small checkpoint.

A cache holds `rows` rows of `slots` slots. Rows are left-padded: row b's tokens fill slots pad[b]..pos-1, its
positions start after its padding and no token attends to padding. Logits come back as float32 NumPy arrays
(rows, vocab), of the last position only.
"""

import numpy as np

from llmcli import runtime


def decoding_layout(model):
    """Store every weight matrix transposed in memory (same values, same shapes, other strides), for inference.

    A decode step multiplies one row per sequence by each matrix; on CPU, x @ W with W laid out (in, out) streams
    the weights faster than F.linear's x @ W.T over the (out, in) layout (benchmarks/generate.py, docs/perf.md).
    Not for training: the optimizer and checkpoint saving expect contiguous parameters. Done once, at load.
    """
    looked_up = ("position_embedding",) + (() if model.config.tie_embeddings else ("token_embedding",))
    for name, p in model.named_parameters():  # (a table only looked up is better left in rows)
        if p.ndim == 2 and p.is_contiguous() and not name.startswith(looked_up):
            p.data = p.data.t().contiguous().t()
    return model


def numpy_steps_faster(rows: int, slots: int) -> bool:
    """Whether a decode step of `rows` rows attending to `slots` slots each runs faster on NumPy between torch's
    kernels than on torch alone (NumPy's attention runs on one core): runtime.MOST_ROWS, MOST_KEYS."""
    return rows <= runtime.MOST_ROWS and rows * slots <= runtime.MOST_KEYS


class TorchCache:
    """A KV cache of the torch model: its layers' KVCache modules and, on the CPU in float32, NumPy views of them."""

    def __init__(self, layers, numpy_views: bool):
        from llmcli.model.numpy_steps import kv_cache_arrays

        self.layers = layers
        self.arrays = kv_cache_arrays(layers) if numpy_views else None


class TorchBackend:
    def __init__(self, model):
        import torch

        from llmcli.model.numpy_steps import TorchKernels, runs_on_numpy

        self.torch, self.model = torch, decoding_layout(model)
        self.config = model.config
        self.device = model.norm_f.weight.device
        # small decode steps run NumPy between the model's torch kernels (needs a float32 cache in CPU memory)
        self.kernels = TorchKernels(model) if runs_on_numpy(model) else None

    def allocate(self, rows: int, slots: int) -> TorchCache:
        caches = self.model.setup_kv_cache(rows, slots)
        self.model.clear_kv_cache()  # (attached only while a forward pass uses it)
        return TorchCache(caches, self.kernels is not None)

    def prefill(self, cache: TorchCache, tokens: np.ndarray, pos: int, pad: np.ndarray) -> np.ndarray:
        """Tokens (N, T) into slots pos..pos+T of the first N rows; the logits of their last position."""
        return self._forward(cache, tokens, pos, pad)

    def step(self, cache: TorchCache, tokens: np.ndarray, pos: int, pad: np.ndarray) -> np.ndarray:
        """One new token a row (B,) into slot pos of the first B rows; their logits."""
        B = len(tokens)
        if self.kernels is not None and numpy_steps_faster(B, pos + 1):
            return self.kernels.forward(tokens[:, None], pos, [(k[:B], v[:B]) for k, v in cache.arrays], pad)
        return self._forward(cache, tokens[:, None], pos, pad)

    def _forward(self, cache: TorchCache, tokens: np.ndarray, pos: int, pad: np.ndarray) -> np.ndarray:
        torch = self.torch
        self.model.use_kv_caches(cache.layers)
        try:
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self.device),
                                    pos=pos, pad=torch.from_numpy(pad).to(self.device) if pad.any() else None,
                                    last_only=True)
        finally:
            self.model.clear_kv_cache()  # (a model without a cache attached is the model, for embeddings)
        return logits[:, -1].float().cpu().numpy()

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """The logits (T, vocab) at every position of one text of T tokens (a prompt's log-probabilities)."""
        torch = self.torch
        with torch.inference_mode():  # (no cache attached: a plain forward pass)
            logits = self.model(torch.tensor([ids], dtype=torch.int64, device=self.device))
        return logits[0].float().cpu().numpy()

    def copy_rows(self, src: TorchCache, src_rows, src_slots: slice, dst: TorchCache, dst_rows, dst_slots: slice):
        """Keys and values of rows src_rows (an int or a slice), slots src_slots, into dst's dst_rows, dst_slots;
        src may be dst, the ranges overlapping."""
        for a, b in zip(src.layers, dst.layers):
            for source, target in ((a.k, b.k), (a.v, b.v)):
                target[dst_rows, :, dst_slots] = source[src_rows, :, src_slots].clone()


class NumpyBackend:
    def __init__(self, model):
        self.model, self.config = model, model.config

    def allocate(self, rows: int, slots: int) -> list:
        shape = (rows, self.config.kv_heads, slots, self.config.head_dim)
        return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.config.n_layer)]

    def prefill(self, cache: list, tokens: np.ndarray, pos: int, pad: np.ndarray) -> np.ndarray:
        N = len(tokens)
        return self.model.forward(np.asarray(tokens, dtype=np.int64), pos, [(k[:N], v[:N]) for k, v in cache], pad)

    def step(self, cache: list, tokens: np.ndarray, pos: int, pad: np.ndarray) -> np.ndarray:
        return self.prefill(cache, tokens[:, None], pos, pad)

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """The logits (T, vocab) at every position of one text of T tokens (a prompt's log-probabilities)."""
        return self.model.forward(np.asarray([ids], dtype=np.int64), 0, self.allocate(1, len(ids)), last_only=False)[0]

    @staticmethod
    def copy_rows(src: list, src_rows, src_slots: slice, dst: list, dst_rows, dst_slots: slice):
        for a, b in zip(src, dst):
            for source, target in zip(a, b):
                target[dst_rows, :, dst_slots] = source[src_rows, :, src_slots].copy()


def backend_for(model):
    """The backend of a loaded model: a NumpyTransformer's, or the torch Transformer's."""
    from llmcli.model.numpy_model import NumpyTransformer

    return NumpyBackend(model) if isinstance(model, NumpyTransformer) else TorchBackend(model)
