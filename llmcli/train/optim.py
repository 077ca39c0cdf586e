"""The optimizer and its learning-rate schedule: AdamW with weight decay on matrices only, or Muon for the blocks'
matrices and AdamW for the rest (as nanochat's setup_optimizer splits them); warmup, then cosine, linear or
warmup-stable-decay."""

import math

import torch

from llmcli.config import TrainConfig
from llmcli.model.transformer import Transformer


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then down to cfg.lr * cfg.min_lr_ratio at cfg.max_steps: by a cosine, a straight
    line, or (wsd) flat until the last decay_fraction of the steps and a straight line from there."""
    warmup = cfg.warmup
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - int(cfg.decay_fraction * cfg.max_steps)
        decay_start = max(decay_start, warmup)
        progress = min(1.0, max(0, step - decay_start) / max(1, cfg.max_steps - decay_start))
        return cfg.lr - (cfg.lr - min_lr) * progress
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


class MuonAdamW:
    """Muon for the blocks' matrices and AdamW for the other weights, stepped as one optimizer. `optimizers` lists
    the two (the checkpoint code saves and loads each one's state)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.optimizers = [muon, adamw]
        self.param_groups = muon.param_groups + adamw.param_groups

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def make_optimizer(model: Transformer, cfg: TrainConfig):
    """AdamW with weight decay on matrices (weights, embeddings) only; or (cfg.optimizer muon) torch.optim.Muon for
    the 2-D weights of the blocks at cfg.muon_lr and AdamW at cfg.lr for the rest, as nanochat's setup_optimizer
    splits them. Each group's lr_scale is its learning rate over cfg.lr: train_step follows the schedule with it."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = {id(p) for block in model.blocks for p in block.parameters() if p.dim() == 2} \
        if cfg.optimizer == "muon" else set()
    groups = [
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in matrices], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              fused=True)
    if not matrices:
        return adamw
    # Muon's own momentum and Newton-Schulz defaults (nanochat's too); lr scaled by the matrix's shape as nanochat's
    muon = torch.optim.Muon([p for p in params if id(p) in matrices], lr=cfg.muon_lr,
                            weight_decay=cfg.weight_decay, adjust_lr_fn="original")
    muon.param_groups[0]["lr_scale"] = cfg.muon_lr / cfg.lr
    return MuonAdamW(muon, adamw)
