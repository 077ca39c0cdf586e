"""Weight-only int8 and int4 quantization for decoding on a CPU, as gpt-fast's int8 and int4 modes.

A decode step at batch 1 reads every weight once, so its time is the weights' bytes over memory bandwidth: int8 (one
scale per output feature) reads a quarter of the bytes of float32, int4 (groups of 32 inputs with a scale and an
offset each, the layout of llama.cpp's Q4_1) about a sixth; a language model's output head is int8 in both modes
(head_mode). torch's weight-only kernels multiply bfloat16 activations by the packed weights (their float32 paths
are 10-40x slower here); norms, attention and the residual stream stay float32. The token embedding becomes int8
rows too (a lookup reads one row), shared with a tied int8 output head, so no float32 copy of any quantized matrix
is kept. Bits per byte and speed: README, benchmarks/generate.py.

Loading (`materialize`): the loaders of llmcli/formats/ build the model on the meta device and hand a function that
reads one tensor, or a block of its rows, from the file; each matrix is quantized a block of rows at a time as it is
read, so neither the float32 model nor even one whole float32 matrix is ever in memory; a matrix the file holds in
int4's groups already (GGUF's Q4_0 and Q4_1) is packed for the int4 kernel as it is (StoredGroups).
"""

import dataclasses
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.errors import LLMError
from llmcli.model.lora import merge_lora

MODES = ("int8", "int4")
GROUP_SIZE = 32  # int4: inputs that share a scale and an offset (llama.cpp's Q4_0/Q4_1 blocks are 32 too)
BLOCK_VALUES = 1 << 20  # weights quantized at a time (4 MB of float32)
# torch's CPU kernels (bfloat16 activations), as op overloads looked up once: a decode step calls them 121 times
INT8_MM = torch.ops.aten._weight_int8pack_mm.default
INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


class StoredMatrix:
    """A float32 matrix still in its file, read a block of rows at a time: `read(rows, out)` reads rows[slice] into
    `out`. The quantizers below take it where they take a tensor (they only index it by rows, and use a block before
    asking for the next): each block is read into the same memory, `scratch` (a 1-element list, shared by the
    matrices of a model), which is not allocated and faulted in anew for every block."""

    dtype = torch.float32  # of `out`, a view of the float32 scratch (a 4-byte type)

    def __init__(self, shape: tuple[int, int], read, scratch: list):
        self.shape, self.read, self.scratch = torch.Size(shape), read, scratch

    def size(self, dim: int) -> int:
        return self.shape[dim]

    def __getitem__(self, rows: slice):
        start, stop, _ = rows.indices(self.shape[0])
        size = (stop - start) * self.shape[1]
        if self.scratch[0].numel() < size:
            self.scratch[0] = torch.empty(size)
        return self.read(rows, out=self.scratch[0][:size].view(self.dtype).view(stop - start, self.shape[1]))


def int8_rows(weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (out, in), float32 scales (out,)) of a float32 weight (a tensor or a StoredMatrix): each row over its
    largest |w| / 127, rounded."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.size(0))
    blocks = chunks(*weight.shape)
    scaled = torch.empty((blocks[0].stop - blocks[0].start) * weight.size(1) if blocks else 0)  # one memory for all
    for rows in blocks:
        w = weight[rows].detach().float()
        # (amax and amin apart: several times faster than aminmax along rows, in torch 2.13 on this CPU)
        scale = scales[rows] = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).clamp(min=1e-12) / 127
        q[rows] = torch.div(w, scale[:, None], out=scaled[:w.numel()].view(w.shape)).round_()
    return q, scales


PACK_ROWS = 64  # int4's CPU packing interleaves rows 64 at a time: blocks packed apart join only at multiples of it


def chunks(n: int, width: int) -> list[slice]:
    """Rows of a (n, width) matrix are quantized about BLOCK_VALUES at a time, so that the temporaries of a 50,000-row
    output head stay small; in whole blocks of PACK_ROWS rows."""
    step = max(PACK_ROWS, BLOCK_VALUES // max(width, 1) // PACK_ROWS * PACK_ROWS)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a scale per row (the row's largest |w| / 127)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: tuple | None = None):
        super().__init__()
        q, scales = rows if rows is not None else int8_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(torch.bfloat16))  # the kernel wants the activations' dtype
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x.reshape(-1, x.size(-1))).to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, in) -> rows W^T (M, out), float32, without the bias."""
        return INT8_MM(rows.to(torch.bfloat16), self.weight, self.scales).float()


class StoredGroups(StoredMatrix):
    """An int4 matrix that its file already holds in Int4Linear's form (llama.cpp's Q4_0 and Q4_1 blocks are its
    groups of 32), read a block of rows at a time as StoredMatrix is: `read(rows, out)` gives int4_groups' (q, scales,
    zeros) of rows[slice], q written into `out` (int32, (rows, in)), so that nothing is dequantized to float32 and
    quantized again."""

    dtype = torch.int32


def int4_groups(weight: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(q, scales, zeros) of float32 rows (rows, in): q int32 (rows, in) in 0..15, scales and zeros float32
    (rows, in / GROUP_SIZE), each group of GROUP_SIZE weights w = (q - 8) * scale + zero with scale = (max - min) / 15
    and zero = min + 8 * scale of the group. scratch: float32 memory of 2 * weight.numel() values or more for the
    temporaries, q among them (reused across blocks: not allocated and faulted in anew for each)."""
    groups = weight.detach().float().unflatten(1, (-1, GROUP_SIZE))  # (rows, in / GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(dim=2, keepdim=True), groups.amax(dim=2, keepdim=True)  # (faster than aminmax)
    scales = ((high - low) / 15).clamp(min=1e-12)
    n = weight.numel()
    scratch = torch.empty(2 * n) if scratch is None else scratch
    scaled = torch.sub(groups, low, out=scratch[:n].view(groups.shape)).div_(scales).round_().clamp_(0, 15)
    q = scratch[n:2 * n].view(torch.int32).view(weight.shape).copy_(scaled.view(weight.shape))
    return q, scales.squeeze(2), (low + 8 * scales).squeeze(2)


class Int4Linear(nn.Module):
    """y = x W^T + b with each group of GROUP_SIZE weights of a row stored as 4-bit q in 0..15 and
    w = (q - 8) * scale + zero (int4_groups), packed for torch's CPU kernel (_weight_int4pack_mm_for_cpu, as
    gpt-fast's int4 mode); the scales and zeros in bfloat16, the activations' dtype. weight: float32 (a tensor or a
    StoredMatrix), quantized here, or a StoredGroups, taken as it is."""

    def __init__(self, weight, bias: torch.Tensor | None):
        super().__init__()
        packed, pairs = [], []
        blocks = chunks(*weight.shape)  # (the kernel packs each row alone); the first is the largest
        stored = isinstance(weight, StoredGroups)  # (which brings its own scratch)
        scratch = None if stored else torch.empty(2 * (blocks[0].stop if blocks else 0) * weight.shape[1])
        for rows in blocks:
            q, scales, zeros = weight[rows] if stored else int4_groups(weight[rows], scratch)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            pairs.append(torch.stack([scales, zeros], dim=2).to(torch.bfloat16))
        self.register_buffer("weight", torch.cat(packed))
        # (in / GROUP_SIZE, out, 2): the kernel's layout of (scale, zero) pairs
        self.register_buffer("scales_and_zeros", torch.cat(pairs).transpose(0, 1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x.reshape(-1, x.size(-1))).to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, in) -> rows W^T (M, out), float32, without the bias."""
        return INT4_MM(rows.to(torch.bfloat16), self.weight, GROUP_SIZE, self.scales_and_zeros).float()


class Int8Embedding(nn.Module):
    """A token embedding stored as int8 rows with a scale each; a lookup dequantizes the rows it reads (float32)."""

    def __init__(self, weight: torch.Tensor, rows: tuple | None = None):
        super().__init__()
        q, scales = rows if rows is not None else int8_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("row_scales", scales.float())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight).float() * F.embedding(idx, self.row_scales[:, None])


def check_mode(mode: str):
    if mode not in MODES:
        raise LLMError(f"--quantize must be one of {', '.join(MODES)}, not {mode!r}")


def quantizable(linear: nn.Module, mode: str) -> bool:
    """Whether the kernel of `mode` takes this layer (others stay float32)."""
    return isinstance(linear, nn.Linear) and kernel_takes(linear.in_features, linear.out_features, mode)


def kernel_takes(in_features: int, out_features: int, mode: str) -> bool:
    """int8's kernel reads the input 16 values at a time (other widths crash it); int4's wants whole groups and its
    16-row tiles."""
    if mode == "int4":
        return in_features % GROUP_SIZE == 0 and out_features % 16 == 0
    return in_features % 16 == 0


def quantized_linear(weight, bias: torch.Tensor | None, mode: str) -> nn.Module:
    return Int4Linear(weight, bias) if mode == "int4" else Int8Linear(weight, bias)


def head_mode(parent: nn.Module, name: str, mode: str) -> str:
    """The mode of layer `name` of `parent`: a language model's output head is int8 in both modes. The head's errors
    go straight into every token's logits: on SmolLM2-135M (bits per byte of 20 kB of TinyStories) an int4 head cost
    +2.9% over float32, an int8 head with int4 elsewhere +0.07%, for 28 MB more read a token (README)."""
    return "int8" if name == "lm_head" and hasattr(parent, "blocks") else mode


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """The model with its linear layers, and the output head, in `mode` (in place; for inference only).

    LoRA layers are merged into their base first. The token embedding becomes an Int8Embedding; a tied output head
    becomes a quantized layer of its own (for int8 sharing the embedding's int8 rows). Each float32 matrix is freed
    as soon as it is replaced, but the float32 model was whole before: llmcli.formats.load_model(..., quantize=mode)
    quantizes as it reads instead (materialize).
    """
    check_mode(mode)
    if model.norm_f.weight.device.type != "cpu":
        raise LLMError(f"--quantize {mode} runs on the CPU only")
    merge_lora(model)  # (a no-op without adapters)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            layer_mode = head_mode(module, name, mode)
            if quantizable(child, layer_mode):
                setattr(module, name, quantized_linear(child.weight, child.bias, layer_mode))
    if not isinstance(model.token_embedding, Int8Embedding):
        quantize_embedding(model, mode, model.token_embedding.weight)
    return model.eval()


def quantize_embedding(model: nn.Module, mode: str, weight) -> bool:
    """The token embedding (its float32 weight given, a tensor or a StoredMatrix) to int8 rows, and a tied output
    head, of a language model (not a classifier), to a quantized layer of its own; if the kernel cannot take that
    head, both stay float32 and nothing changes (False)."""
    tied_head = model.config.tie_embeddings and not hasattr(model, "classifier")
    if tied_head and not kernel_takes(model.config.n_embd, model.config.vocab_size, "int8"):
        return False
    rows = int8_rows(weight)
    if tied_head:  # int8 in both modes (head_mode), sharing the embedding's rows
        model.lm_head = Int8Linear(None, None, rows)
        model.config = dataclasses.replace(model.config, tie_embeddings=False)  # the head is now its own
    model.token_embedding = Int8Embedding(None, rows)
    return True


def materialize(model: nn.Module, read, mode: str | None = None, read_groups=None) -> nn.Module:
    """A model built on the meta device (llmcli.model.transformer.meta_device) given its weights, in eval mode.

    read(name, rows=None, out=None) returns our tensor `name` (a key of the model's state_dict) as float32, or only its
    rows `rows` (a slice of the first dimension), read into `out` when given (a float32 tensor of that shape); a whole
    tensor becomes the parameter's storage as it is, uncopied.
    mode ("int8", "int4"): the token embedding and every layer the kernel takes are quantized a block of rows at a
    time as they are read (StoredMatrix), so that no float32 matrix of theirs exists whole; the result equals
    quantize() of the float32 model exactly. The model's buffers (the rotary and position tables) must be real.
    read_groups(name, scratch): for int4, a StoredGroups of matrix `name` (on `scratch`) if the file holds it in
    int4's groups already (a GGUF file's Q4_0 and Q4_1 tensors), which is then packed as it is; None for the others.
    """
    if mode is not None:
        check_mode(mode)
        scratch = [torch.empty(0)]
        weight = StoredMatrix(model.token_embedding.weight.shape, partial(read, "token_embedding.weight"), scratch)
        quantize_embedding(model, mode, weight)
        for prefix, module in list(model.named_modules()):
            for name, child in list(module.named_children()):
                layer_mode = head_mode(module, name, mode)
                if quantizable(child, layer_mode) and child.weight.is_meta:
                    path = f"{prefix}.{name}" if prefix else name
                    weight = read_groups(f"{path}.weight", scratch) if layer_mode == "int4" and read_groups else None
                    if weight is None:
                        weight = StoredMatrix(child.weight.shape, partial(read, f"{path}.weight"), scratch)
                    bias = read(f"{path}.bias") if child.bias is not None else None
                    setattr(module, name, quantized_linear(weight, bias, layer_mode))
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            module, _, attr = name.rpartition(".")
            model.get_submodule(module)._parameters[attr] = nn.Parameter(read(name))
    assert not any(b.is_meta for b in model.buffers()), "the model's tables must be computed, not meta"
    return model.eval()
