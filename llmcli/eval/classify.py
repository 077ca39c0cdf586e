"""Labelling text with a classifier (llmcli/model/heads.py): probabilities, metrics and a report."""

import math

import torch

from llmcli import runtime
from llmcli.model.heads import Classifier, encode_text, pad_batch


@torch.no_grad()
def predict(model: Classifier, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Probabilities (len(texts), n_labels)."""
    model.eval()
    device = model.token_embedding.weight.device
    out = []
    for i in range(0, len(texts), batch_size):
        runtime.follow_load()  # a long loop: on the cores other processes leave idle
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
    from llmcli.train.finetune import read_classification

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
