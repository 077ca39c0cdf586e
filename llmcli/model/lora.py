"""LoRA: low-rank adapters on a frozen model's linear layers, saved alone and merged back into a plain checkpoint.

A target layer y = W x + b becomes y = W x + b + (alpha / r) B A dropout(x), with A (r, in) random and B (out, r)
zero, so training starts from the base model exactly. Only A and B (and a classifier's head) are trained; the
checkpoint stores them alone (see train.saved_weights) with the base's path and a fingerprint of its weights, and
llmcli/formats/adapter.py rebuilds base + adapter. Merging adds (alpha / r) B A into W: the same function, a standalone model.
"""

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.errors import LLMError

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
DEFAULT_TARGETS = ("attn.qkv", "attn.proj")


class LoRALinear(nn.Linear):
    """A linear layer that keeps its weight and bias (same names, so the base's weights still fit) and adds a
    trained low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * self.lora_b @ self.lora_a)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def parse_targets(text: str | None) -> list[str]:
    names = [t.strip() for t in (text or ",".join(DEFAULT_TARGETS)).split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise LLMError(f"unknown LoRA target {bad[0] if bad else text!r}; choose from {', '.join(TARGETS)}")
    return names


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> nn.Module:
    """Put adapters on the target layers of every block and freeze everything else but a classifier's head."""
    if rank < 1:
        raise LLMError(f"--lora-rank must be at least 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and f"{name.rsplit('.', 1)[-1]}.{child_name}" in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
    if hasattr(model, "classifier"):  # a new head has nothing to start from: it is trained whole
        model.classifier.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def fingerprint(model: nn.Module) -> str:
    """A hash of a model's weights: an adapter records its base's, and refuses a base that changed."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
