"""Classification head: the Transformer with a linear layer over the hidden state of a text's last token.

The classifier reads a text as the language model does (after its start-of-text token) and puts a linear layer on
the hidden state of the text's last token, the one position that has seen every other; training minimises
-log P(label | text). A batch is right-padded with PAD, so causal attention never lets padding reach a real token.
"""

import torch
import torch.nn as nn

from llmcli.errors import LLMError
from llmcli.model.transformer import ModelConfig, Transformer, meta_device

PAD = -1  # input id of padding in a classification batch


class Classifier(Transformer):
    def __init__(self, config: ModelConfig, n_labels: int = 2):
        super().__init__(config)
        self.classifier = nn.Linear(config.n_embd, n_labels)
        nn.init.zeros_(self.classifier.weight)  # start from uniform probabilities
        nn.init.zeros_(self.classifier.bias)

    def setup_kv_cache(self, *args, **kwargs):
        raise LLMError("this checkpoint is a classifier: it labels text (llm classify), it does not generate")

    def forward(self, idx: torch.Tensor, pos: int = 0) -> torch.Tensor:
        """Label logits (B, n_labels) of texts idx (B, T), right-padded with PAD."""
        lengths = (idx != PAD).sum(dim=1)
        hidden = self.features(idx.clamp(min=0))
        return self.classifier(hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1])


def from_language_model(lm: Transformer, n_labels: int) -> Classifier:
    """A classifier with lm's body and a new, zero head. It takes over lm's tensors rather than copying them (as
    LoRA's add_lora changes its model in place): train one or the other."""
    device = lm.token_embedding.weight.device
    with meta_device():  # no memory and no random init for a body about to be replaced
        model = Classifier(lm.config, n_labels=n_labels)
    model.load_state_dict(lm.state_dict(), strict=False, assign=True)
    model.classifier = nn.Linear(lm.config.n_embd, n_labels, device=device)
    nn.init.zeros_(model.classifier.weight)  # start from uniform probabilities
    nn.init.zeros_(model.classifier.bias)
    return model.to(device)  # (the fixed tables are computed on the CPU)


def encode_text(tokenizer, text: str, context: int) -> list[int]:
    start = [tokenizer.start_of_text] if tokenizer.start_of_text is not None else []
    return (start + tokenizer.encode(text))[:context]


def pad_batch(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows], dtype=torch.long)
