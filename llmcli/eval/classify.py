"""Text classification: a linear head on the Transformer's last hidden state, its metrics, and labelling new text.

The classifier reads a text as the language model does (after an end-of-text token) and puts a linear layer on the
hidden state of the text's last token, the one position that has seen every other; training minimises
-log P(label | text). A batch is right-padded with -1, so causal attention never lets padding reach a real token.
"""

import math

import torch
import torch.nn as nn

from llmcli.errors import LLMError
from llmcli.model import ModelConfig, Transformer

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
    """A classifier with lm's body and a new, zero head."""
    model = Classifier.empty(lm.config, device=lm.token_embedding.weight.device, n_labels=n_labels)
    model.load_state_dict(lm.state_dict(), strict=False)
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)
    return model


def encode_text(tokenizer, text: str, context: int) -> list[int]:
    start = [tokenizer.start_of_text] if tokenizer.start_of_text is not None else []
    return (start + tokenizer.encode(text))[:context]


def pad_batch(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def predict(model: Classifier, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Probabilities (len(texts), n_labels)."""
    model.eval()
    device = model.token_embedding.weight.device
    out = []
    for i in range(0, len(texts), batch_size):
        rows = [encode_text(tokenizer, t, model.config.context) for t in texts[i:i + batch_size]]
        out.append(model(pad_batch(rows).to(device)).float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.classifier.out_features)


def metrics(labels: list[str], gold: list[int], predicted: list[int]) -> dict:
    """Accuracy, macro F1 (the mean of each label's F1) and the confusion matrix (rows: gold, columns: predicted)."""
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    f1s = []
    for k in range(n):
        tp = confusion[k][k]
        fp = sum(confusion[g][k] for g in range(n)) - tp
        fn = sum(confusion[k]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "examples": len(gold),
        "accuracy": sum(g == p for g, p in zip(gold, predicted)) / max(1, len(gold)),
        "macro_f1": sum(f1s) / n,
        "f1": dict(zip(labels, f1s)),
        "labels": labels,
        "confusion": confusion,
    }


def evaluate_classifier(model: Classifier, tokenizer, labels: list[str], path: str) -> dict:
    from llmcli.finetune import read_classification

    texts, gold = zip(*read_classification(path, labels))
    probs = predict(model, tokenizer, list(texts))
    loss = -sum(math.log(max(probs[i, g].item(), 1e-12)) for i, g in enumerate(gold)) / len(gold)
    return {"file": str(path), **metrics(labels, list(gold), probs.argmax(-1).tolist()), "loss": loss}


def print_report(result: dict):
    """The metrics and the confusion matrix as text on stdout."""
    labels = result["labels"]
    print(f"{result['file']}: {result['examples']} examples, accuracy {result['accuracy']:.4f}, "
          f"macro F1 {result['macro_f1']:.4f}, loss {result['loss']:.4f}")
    corner = "gold \\ predicted"
    width = max(len(corner), *(len(label) for label in labels))
    print(f"{corner:<{width}}  " + "  ".join(f"{label:>{width}}" for label in labels))
    for label, row in zip(labels, result["confusion"]):
        print(f"{label:<{width}}  " + "  ".join(f"{count:>{width}}" for count in row))
