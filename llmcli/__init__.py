"""llm: a command-line workbench to tokenize, pretrain, fine-tune, sample from and evaluate small language models."""

__version__ = "0.1.0"
