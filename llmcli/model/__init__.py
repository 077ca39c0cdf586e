"""The model: the Transformer and what transforms it (LoRA, heads, quantization); tensors and modules only."""
