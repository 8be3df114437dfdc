"""The hard-label protocol of the DC / DSA / DM lineage (secondary).

A fresh ConvNet trained with cross-entropy on the synthetic images' hard labels: SGD
(lr 0.01, momentum 0.9, weight decay 5e-4), batch 256, 1000 epochs, lr x0.1 at the
midpoint, DSA on every batch (one family per batch, per-image parameters, as the official
``evaluate_synset``), final-epoch accuracy on the full validation split. It exists to tie
DM back to its published numbers; the soft-label protocol is the suite's headline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from wmdd.augment.dsa import DSAConfig, dsa
from wmdd.checkpoint import Checkpointer, loop_state, restore_loop
from wmdd.config import HardProtocolConfig
from wmdd.models.accuracy import Accuracy
from wmdd.protocol.soft import student_result
from wmdd.utils import autocast, generator


def train_student_hard(
    *,
    student: nn.Module,
    images: Tensor,
    labels: Tensor,
    validate: Callable[[nn.Module, int], Accuracy],
    cfg: HardProtocolConfig,
    seed: int,
    device: torch.device,
    progress: bool = True,
    checkpoint: Checkpointer | None = None,
) -> dict:
    """Trains ``student`` on ``(images, labels)`` with cross-entropy; same result dict as
    :func:`wmdd.protocol.soft.train_student_soft` (``best_*`` from the final evaluation only;
    ``validate`` and ``checkpoint`` as there)."""
    student.to(device).train()
    opt = torch.optim.SGD(
        student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[cfg.epochs // 2], gamma=0.1)
    gen = generator(seed, "hard-label")
    images, labels = images.to(device), labels.to(device)
    dsa_cfg = DSAConfig(strategy=cfg.dsa_strategy) if cfg.dsa_strategy else None
    first, total = 0, 0.0
    if checkpoint is not None and (state := checkpoint.load()) is not None:
        restore_loop(state, model=student, optimizer=opt, scheduler=sched, generator=gen)
        first, total = state["epoch"], state["last_loss"]
    epochs = range(first, cfg.epochs)
    bar = tqdm(epochs, desc="student (hard)", unit="epoch", disable=not progress, initial=first)
    for e in bar:
        order = torch.randperm(len(images), generator=gen).to(device)
        total = 0.0
        for start in range(0, len(images), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = images[idx]
            if dsa_cfg is not None:
                x, _ = dsa(x, generator=gen, config=dsa_cfg, siamese=False)
            with autocast(cfg.precision, device):
                logits = student(x)
            loss = F.cross_entropy(logits.float(), labels[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"student (hard): non-finite loss at epoch {e}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if checkpoint is not None:
            checkpoint.step(
                functools.partial(
                    loop_state,
                    f"epoch {e + 1} of {cfg.epochs}",
                    model=student,
                    optimizer=opt,
                    scheduler=sched,
                    generator=gen,
                    epoch=e + 1,
                    last_loss=total,
                )
            )
    acc = validate(student, cfg.eval_batch_size)
    history = [
        {"epoch": cfg.epochs, "loss": total / len(images), "top1": acc.top1, "top5": acc.top5}
    ]
    return student_result(history)
