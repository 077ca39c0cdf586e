"""A decoder-only Transformer, readable top to bottom: GPT-2 by default, Llama, Mistral or Qwen2 by its config.

token embedding (+ learned or sinusoidal positions) -> n_layer pre-norm blocks (causal self-attention, MLP) ->
final norm -> output head (tied to the token embedding or its own). The config picks each part: LayerNorm or
RMSNorm, learned, sinusoidal or rotary positions, GELU MLP or SwiGLU, multi-head, grouped-query or multi-query
attention, biases. A preallocated KV cache makes decoding one token cost one token's work.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.config import ModelConfig  # the shape: plain data, readable without torch


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (context, head_dim) of the rotary angles, laid out as Llama's rotate_half expects.

    Computed on the CPU even inside meta_device(): arange on the meta device imports torch._refs, 1-5 s of loading
    any rotary model; the tables are small, and moved with the model to its device."""
    frequencies, divisor = config.rope_frequencies()
    inv_freq = torch.tensor(frequencies, dtype=torch.float32, device="cpu")
    positions = torch.arange(config.context, dtype=torch.float32, device="cpu") / divisor
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x (B, H, T, D) by the angles of x's positions."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def sinusoidal_table(config: ModelConfig) -> torch.Tensor:
    """The fixed position encoding of "Attention Is All You Need": sin on even dimensions, cos on odd ones."""
    positions = torch.arange(config.context, dtype=torch.float32, device="cpu")[:, None]  # (as rope_tables)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, config.n_embd, 2, dtype=torch.float32, device="cpu") / config.n_embd))
    table = torch.zeros(config.context, config.n_embd, device="cpu")
    table[:, 0::2] = torch.sin(positions * inv_freq)
    table[:, 1::2] = torch.cos(positions * inv_freq)[:, : config.n_embd // 2]
    return table


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, in buffers allocated once for the longest sequence."""

    def __init__(self, batch_size: int, max_len: int, n_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at positions pos..pos+T of the first B rows and return all keys and values of
        those rows up to there. (A server's batch uses the first B rows of a cache allocated for the most rows.)"""
        B, end = k.size(0), pos + k.size(2)
        self.k[:B, :, pos:end] = k
        self.v[:B, :, pos:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]


def attention(q, k, v, mask, is_causal: bool, dropout: float, gqa: bool, fp32_max: int = 0) -> torch.Tensor:
    """Scaled dot-product attention of q (B, n_head, T, head_dim) over k, v (B, n_kv_head, S, head_dim), as
    F.scaled_dot_product_attention; returns (B, n_head, T, head_dim) in q's dtype.

    fp32_max: under bfloat16 autocast on a CPU, training attends in float32 (casts included) while keys x head_dim
    is at most this, where SDPA's bfloat16 backward pass is the slower (llmcli.runtime.FP32_ATTENTION_MAX)."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled() and \
            torch.is_autocast_enabled("cpu") and k.size(2) * q.size(3) <= fp32_max:
        with torch.autocast("cpu", enabled=False):  # (autocast would cast float32 inputs back to bfloat16)
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal,
                                               dropout_p=dropout, enable_gqa=gqa)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                          enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # queries, keys and values in one matmul; keys and values have n_kv_head heads (fewer under GQA)
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                             bias=config.bias or config.qkv_bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None
        self.fp32_attention_max = 0  # see attention(); set by training (Transformer.attend_in_float32)

    def forward(self, x: torch.Tensor, pos: int = 0, rope: tuple | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, (n_head + 2 n_kv_head) * head_dim) -> (B, heads, T, head_dim): the query heads, then keys', values'
        qkv = self.qkv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        if rope is not None:  # rotate queries and keys (together: half the operations) before keys enter the cache
            qk = apply_rope(qk, *rope)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(pos, k, v)
        if mask is not None:  # given by the caller: left-padded rows of a batch
            is_causal = False
        elif T == 1:
            mask, is_causal = None, False  # one new token may look at every cached position
        elif pos == 0:
            mask, is_causal = None, True
        else:  # a chunk appended after cached positions: query i sees keys up to pos + i
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            is_causal = False
        # each group of n_head / n_kv_head queries shares a key head
        y = attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0,
                      gqa=self.n_kv_head != self.n_head, fp32_max=self.fp32_attention_max)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        # SwiGLU's gate and up projections share one matmul: fc's output is [gate, up]
        self.fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * config.hidden_size, bias=config.bias)
        self.proj = nn.Linear(config.hidden_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.dropout(self.proj(F.silu(gate) * up))
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm: normalise the input of each sub-layer, add its output to the residual stream."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, pos: int = 0, rope: tuple | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), pos, rope, mask)
        return x + self.mlp(self.norm_2(x))


@contextmanager
def meta_device():
    """Modules built inside have shapes but no memory and no random init, so building even a large one is instant.
    nn.init's fill functions are switched off too: calling them on meta tensors imports torch._dynamo, which costs
    more than a second of every cold start."""
    names = ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_", "trunc_normal_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.context, config.n_embd)
        for name, table in self.fixed_tables().items():  # computed, not saved
            self.register_buffer(name, table, persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(number of residual additions)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def fixed_tables(self) -> dict[str, torch.Tensor]:
        if self.config.positions == "sinusoidal":
            return {"position_table": sinusoidal_table(self.config)}
        if self.config.positions == "rope":
            return dict(zip(("rope_cos", "rope_sin"), rope_tables(self.config)))
        return {}

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, pos: int = 0, pad: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T) that sit at positions pos..pos+T of the sequence.

        pad (B,): rows of a batch are left-padded by pad[b] tokens; their positions start after the padding and no
        token attends to padding. last_only: logits of the last position only (B, 1, vocab), as sampling needs.
        """
        x = self.features(idx, pos, pad)
        if last_only:
            x = x[:, -1:]
        if self.config.tie_embeddings:
            return F.linear(x, self.token_embedding.weight)  # the output head shares the embedding matrix
        return self.lm_head(x)

    def features(self, idx: torch.Tensor, pos: int = 0, pad: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states (B, T, n_embd), before the output head (a classifier puts its own head here)."""
        T = idx.size(1)
        mask = None
        if pad is None:
            if pos + T > self.config.context:
                raise ValueError(f"sequence of {pos + T} tokens is longer than the context ({self.config.context})")
            positions = torch.arange(pos, pos + T, device=idx.device)
        else:
            slots = torch.arange(pos + T, device=idx.device)
            # finished rows of a batch may run past the context; their outputs are ignored
            positions = (slots[pos:] - pad[:, None]).clamp(0, self.config.context - 1)  # (B, T)
            keys, queries = slots[None, None, :], slots[pos:, None]
            # a padding query sees itself only, so that no row of the softmax is empty (NaN)
            mask = (keys <= queries) & ((keys >= pad[:, None, None]) | (keys == queries))
            mask = mask[:, None]  # (B, 1, T, pos + T)
        x = self.token_embedding(idx)
        rope = None
        if self.config.positions == "learned":
            x = x + self.position_embedding(positions)
        elif self.config.positions == "sinusoidal":
            x = x + self.position_table[positions]
        else:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
            if pad is not None:  # (B, T, D) -> (B, 1, T, D): the same angles for every head
                rope = (rope[0][:, None], rope[1][:, None])
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, pos, rope, mask)
        return self.norm_f(x)

    def attend_in_float32(self, most: int):
        """Attention under bfloat16 autocast runs in float32 while keys x head_dim <= most (see attention())."""
        for block in self.blocks:
            block.attn.fp32_attention_max = most

    def setup_kv_cache(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """Give every attention layer a cache for batch_size sequences of up to max_len tokens (default: context);
        returns the caches, a layer each."""
        max_len = max_len or self.config.context
        weight = self.norm_f.weight  # (the embedding may be int8 rows: see llmcli/model/quantize.py)
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, max_len, self.config.kv_heads, self.config.head_dim,
                                          weight.dtype, weight.device)
        return self.kv_caches()

    def kv_caches(self) -> list[KVCache | None]:
        return [block.attn.kv_cache for block in self.blocks]

    def use_kv_caches(self, caches: list[KVCache | None]):
        """Attach these caches (a layer each, as kv_caches() gave them): a server switches between several."""
        for block, cache in zip(self.blocks, caches):
            block.attn.kv_cache = cache

    def select_kv_cache_rows(self, index: torch.Tensor):
        """Row b of every cache becomes row index[b] (the samples of a prompt take the prompt's keys and values)."""
        for block in self.blocks:
            cache = block.attn.kv_cache
            cache.k, cache.v = cache.k[index], cache.v[index]

    def clear_kv_cache(self):
        for block in self.blocks:
            block.attn.kv_cache = None
