"""The Transformer of llmcli/model/transformer.py run with NumPy, to sample from a small checkpoint without importing torch.

Importing torch takes longer than the shipped model takes to write a whole story (docs/perf.md). So `llm generate`
runs checkpoints of up to llmcli.runtime.SMALL_MODEL parameters here: the same computation as transformer.py's
forward (tests hold the logits equal to 1e-5 for every configuration), for left-padded rows with a KV cache, float32.
Decoding is the engine's (llmcli/infer/engine.py, NumpyBackend), so a seed gives the same text on either.
"""

import math

import numpy as np

from llmcli.config import ModelConfig


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of the Transformer's state dict (a test holds this equal to transformer.py's)."""
    C, hidden = config.n_embd, config.hidden_size
    qkv = (config.n_head + 2 * config.kv_heads) * config.head_dim
    fc = (2 if config.mlp == "swiglu" else 1) * hidden
    norm_bias = config.norm == "layernorm" and config.bias
    shapes = {"token_embedding.weight": (config.vocab_size, C)}
    if config.positions == "learned":
        shapes["position_embedding.weight"] = (config.context, C)

    def linear(name, n_in, n_out, bias):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name):
        shapes[f"{name}.weight"] = (C,)
        if norm_bias:
            shapes[f"{name}.bias"] = (C,)

    for i in range(config.n_layer):
        norm(f"blocks.{i}.norm_1")
        linear(f"blocks.{i}.attn.qkv", C, qkv, config.bias or config.qkv_bias)
        linear(f"blocks.{i}.attn.proj", C, C, config.bias)
        norm(f"blocks.{i}.norm_2")
        linear(f"blocks.{i}.mlp.fc", C, fc, config.bias)
        linear(f"blocks.{i}.mlp.proj", hidden, C, config.bias)
    norm("norm_f")
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def position_tables(config: ModelConfig) -> dict[str, np.ndarray]:
    """The computed (not saved) tables: sinusoidal positions, or rotary cos and sin, as model.py builds them."""
    if config.positions == "sinusoidal":
        positions = np.arange(config.context, dtype=np.float32)[:, None]
        inv_freq = 1.0 / 10000.0 ** (np.arange(0, config.n_embd, 2, dtype=np.float32) / config.n_embd)
        table = np.zeros((config.context, config.n_embd), np.float32)
        table[:, 0::2] = np.sin(positions * inv_freq)
        table[:, 1::2] = np.cos(positions * inv_freq)[:, : config.n_embd // 2]
        return {"position_table": table}
    if config.positions == "rope":
        frequencies, divisor = config.rope_frequencies()
        inv_freq = np.array(frequencies, dtype=np.float32)
        angles = np.outer(np.arange(config.context, dtype=np.float32) / divisor, inv_freq)
        angles = np.concatenate([angles, angles], axis=-1).astype(np.float32)
        return {"rope_cos": np.cos(angles), "rope_sin": np.sin(angles)}
    return {}


# In place, as a long prompt's prefill passes over (T, T) scores and (T, hidden) activations: fewer new arrays.

def softmax_(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, overwriting x."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def gelu(h: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation: 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))), without pow (far slower than products)."""
    y = h * h
    y *= 0.044715
    y += 1.0
    y *= h * math.sqrt(2.0 / math.pi)
    np.tanh(y, out=y)
    y += 1.0
    y *= h
    y *= 0.5
    return y


class NumpyTransformer:
    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray]):
        self.config = config
        self.w = {name: (w.T.copy() if name.startswith("blocks.") and w.ndim == 2 else w)  # (in, out): x @ W
                  for name, w in weights.items()}
        self.w |= position_tables(config)
        head = weights["token_embedding.weight" if config.tie_embeddings else "lm_head.weight"]
        self.head = np.ascontiguousarray(head.T)  # (n_embd, vocab)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        # sums over n, not np.mean: at one token a decode step is mostly per-call overhead, and mean's is the larger
        eps, weight, n = self.config.norm_eps, self.w[f"{name}.weight"], x.shape[-1]
        if self.config.norm == "rmsnorm":
            return x / np.sqrt((x * x).sum(axis=-1, keepdims=True) / n + eps) * weight
        centered = x - x.sum(axis=-1, keepdims=True) / n
        x = centered / np.sqrt((centered * centered).sum(axis=-1, keepdims=True) / n + eps) * weight
        return x + self.w[f"{name}.bias"] if f"{name}.bias" in self.w else x

    # The three places that read a weight matrix: a subclass may hand them to other kernels (numpy_steps.py)

    def _embed(self, idx: np.ndarray) -> np.ndarray:
        """(B, T) token ids -> (B, T, n_embd)."""
        return self.w["token_embedding.weight"][idx]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """(..., in) -> (..., out) by layer `name` (a key of transformer.py's modules)."""
        y = x @ self.w[f"{name}.weight"]
        return y + self.w[f"{name}.bias"] if f"{name}.bias" in self.w else y

    def _head(self, x: np.ndarray) -> np.ndarray:
        """(B, n_embd) final hidden states -> (B, vocab) logits."""
        return x @ self.head

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin

    def forward(self, idx: np.ndarray, pos: int, cache: list[tuple[np.ndarray, np.ndarray]],
                pad: np.ndarray | None = None, last_only: bool = True) -> np.ndarray:
        """Logits (B, vocab) of the last of tokens idx (B, T) in slots pos..pos+T, their keys and values written
        into cache (one (keys, values) pair of (B, kv_heads, max_len, head_dim) a layer); (B, T, vocab), those of
        every position, if not last_only.

        pad (B,): row b is left-padded by pad[b] tokens, as in transformer.py: its positions start after the padding and
        no token attends to padding.
        """
        config = self.config
        B, T = idx.shape
        H, KV, D = config.n_head, config.kv_heads, config.head_dim
        end = pos + T
        slots = np.arange(end)
        pad = np.zeros(B, dtype=np.int64) if pad is None else pad
        # (finished rows of a batch may run past the context; their outputs are ignored)
        positions = np.clip(slots[None, pos:] - pad[:, None], 0, config.context - 1)  # (B, T)
        x = self._embed(idx)
        if config.positions == "learned":
            x = x + self.w["position_embedding.weight"][positions]
        elif config.positions == "sinusoidal":
            x = x + self.w["position_table"][positions]
        else:  # (B, 1, T, D): the same angles for every head
            rope = self.w["rope_cos"][positions][:, None], self.w["rope_sin"][positions][:, None]
        # the query in slot s sees keys in slots pad..s (a padding query itself only, so that no row is empty):
        # added to the scores, 0 where it may look and -inf where not; (B, 1, 1, T, end) as the scores
        keys, queries = slots[None, None, :], slots[pos:, None]
        visible = (keys <= queries) & ((keys >= pad[:, None, None]) | (keys == queries))
        mask = np.where(visible, 0.0, -np.inf).astype(np.float32)[:, None, None]
        masked = T > 1 or pad.any()  # (one new token of an unpadded batch sees every cached position)
        for i, (k_cache, v_cache) in enumerate(cache):
            block = f"blocks.{i}"
            qkv = self._linear(self._norm(x, f"{block}.norm_1"), f"{block}.attn.qkv")
            q, k, v = qkv[..., :H * D], qkv[..., H * D:(H + KV) * D], qkv[..., (H + KV) * D:]
            # (B, T, heads * D) -> (B, heads, T, D); queries grouped by the key head they share
            q = q.reshape(B, T, KV, H // KV, D).transpose(0, 2, 3, 1, 4)
            k, v = (t.reshape(B, T, KV, D).transpose(0, 2, 1, 3) for t in (k, v))
            if config.positions == "rope":
                q, k = self._rope(q, *(t[:, None] for t in rope)), self._rope(k, *rope)
            k_cache[:, :, pos:end], v_cache[:, :, pos:end] = k, v
            keys, values = k_cache[:, :, None, :end], v_cache[:, :, None, :end]  # (B, KV, 1, end, D)
            scores = (q * (1.0 / math.sqrt(D))) @ keys.swapaxes(-1, -2)  # (B, KV, group, T, end)
            if masked:
                scores += mask
            y = softmax_(scores) @ values  # (B, KV, group, T, D)
            y = y.transpose(0, 3, 1, 2, 4).reshape(B, T, H * D)
            x = x + self._linear(y, f"{block}.attn.proj")
            h = self._linear(self._norm(x, f"{block}.norm_2"), f"{block}.mlp.fc")
            if config.mlp == "swiglu":
                gate, up = h[..., :config.hidden_size], h[..., config.hidden_size:]
                h = gate / (1.0 + np.exp(-gate)) * up
            else:
                h = gelu(h)
            x = x + self._linear(h, f"{block}.mlp.proj")
        return self._head(self._norm(x[:, -1] if last_only else x, "norm_f"))
