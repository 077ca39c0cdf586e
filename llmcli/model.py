"""A decoder-only Transformer, GPT-2 style, readable top to bottom.

token embedding + learned positions -> n_layer pre-norm blocks (causal self-attention, MLP) -> final norm ->
output head tied to the token embedding. A preallocated KV cache makes decoding one token cost one token's work.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    context: int = 256  # the longest sequence the model sees; sets the size of the position table
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and norms, as GPT-2 has
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, in buffers allocated once for the longest sequence."""

    def __init__(self, batch_size: int, max_len: int, n_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at positions pos..pos+T and return all keys and values up to there."""
        end = pos + k.size(2)
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, pos: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(pos, k, v)
        if T == 1:
            mask, is_causal = None, False  # one new token may look at every cached position
        elif pos == 0:
            mask, is_causal = None, True
        else:  # a chunk appended after cached positions: query i sees keys up to pos + i
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm: normalise the input of each sub-layer, add its output to the residual stream."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), pos)
        return x + self.mlp(self.norm_2(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.context, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(number of residual additions)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

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

    def forward(self, idx: torch.Tensor, pos: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T) that sit at positions pos..pos+T of the sequence."""
        T = idx.size(1)
        if pos + T > self.config.context:
            raise ValueError(f"sequence of {pos + T} tokens is longer than the context ({self.config.context})")
        positions = torch.arange(pos, pos + T, device=idx.device)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x, pos)
        x = self.norm_f(x)
        return F.linear(x, self.token_embedding.weight)  # the output head shares the embedding matrix

    def setup_kv_cache(self, batch_size: int, max_len: int | None = None):
        """Give every attention layer a cache for batch_size sequences of up to max_len tokens (default: context)."""
        max_len = max_len or self.config.context
        weight = self.token_embedding.weight
        for block in self.blocks:
            head_dim = self.config.n_embd // self.config.n_head
            block.attn.kv_cache = KVCache(batch_size, max_len, self.config.n_head, head_dim, weight.dtype, weight.device)

    def clear_kv_cache(self):
        for block in self.blocks:
            block.attn.kv_cache = None
