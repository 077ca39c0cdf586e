"""Weight-only int8 quantization for decoding on a CPU, as gpt-fast's int8 mode.

A decode step at batch 1 reads every weight once, so its time is the weights' bytes over memory bandwidth: storing
them as int8 (one scale per output feature) reads a quarter of the bytes of float32. torch's weight-only int8 kernel
multiplies bfloat16 activations by the int8 rows and scales the result; everything else (embeddings, norms,
attention, the residual stream) stays float32. On this project's 2-core machine it decodes 1.9-2.4x faster than
float32 (benchmarks/generate.py); the shipped model's bits per byte go from 0.9293 to 0.9294.
"""

import dataclasses

import torch
import torch.nn as nn

from llmcli.errors import LLMError
from llmcli.model.lora import merge_lora

MODES = ("int8",)


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a scale per row (the row's largest |w| / 127)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scales[:, None]).to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16))  # the kernel wants the activations' dtype
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def check_mode(mode: str):
    if mode not in MODES:
        raise LLMError(f"--quantize must be one of {', '.join(MODES)}, not {mode!r}")


def quantizable(linear: nn.Module) -> bool:
    # the CPU kernel reads the input 16 values at a time: other widths crash it, so those layers stay float32
    return isinstance(linear, nn.Linear) and linear.in_features % 16 == 0


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """The model with its linear layers, and the output head, as Int8Linear (in place; for inference only).

    LoRA layers are merged into their base first. A tied output head gets its own int8 copy of the embedding
    matrix: the float32 embedding stays for looking up input tokens, which reads one row a token.
    """
    check_mode(mode)
    if model.token_embedding.weight.device.type != "cpu":
        raise LLMError("--quantize int8 runs on the CPU only")
    merge_lora(model)  # (a no-op without adapters)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if quantizable(child):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    if model.config.tie_embeddings and model.config.n_embd % 16 == 0 and not hasattr(model, "classifier"):
        model.lm_head = Int8Linear(model.token_embedding.weight, None)
        model.config = dataclasses.replace(model.config, tie_embeddings=False)  # the head is now its own
    return model.eval()
