"""Optimiser parameter groups shared by the teacher recipe and the protocol's student."""

from __future__ import annotations

from torch import nn


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: weight decay on parameters with ``ndim > 1`` (conv and linear
    weights), none on biases and normalisation parameters (the published recipes)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
