"""Shared builders of tiny, in-memory test data (no files, no downloads).

Imported by tests as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``
because it has no ``__init__.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from wmdd.data.prepared import PreparedData
from wmdd.models.registry import create_model
from wmdd.utils import seeded_init


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Runs the block with ``n`` intra-op threads, restoring the previous number.

    The test machines have 2 shared cores: with more busy processes than cores, OpenMP's
    spin-waiting makes tiny convolutions ~50x slower with 2 threads than with 1.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_prepared(
    num_classes: int = 4,
    per_class: int | Sequence[int] = 12,
    channels: int = 3,
    res: int = 16,
    seed: int = 0,
    val_per_class: int = 3,
) -> PreparedData:
    """A :class:`PreparedData` of random uint8 images with shuffled (interleaved) labels.

    Args:
        num_classes: number of classes, named ``"c0"``, ``"c1"``, ...
        per_class: training images per class (one int, or one count per class).
        channels: image channels.
        res: image side.
        seed: seed of the images and of the label order.
        val_per_class: validation images per class.
    """
    counts = [per_class] * num_classes if isinstance(per_class, int) else list(per_class)
    assert len(counts) == num_classes
    gen = torch.Generator().manual_seed(seed)
    train_y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    train_y = train_y[torch.randperm(len(train_y), generator=gen)]  # classes interleaved
    val_y = torch.arange(num_classes).repeat_interleave(val_per_class)
    train_x = torch.randint(
        0, 256, (len(train_y), channels, res, res), generator=gen, dtype=torch.uint8
    )
    val_x = torch.randint(
        0, 256, (len(val_y), channels, res, res), generator=gen, dtype=torch.uint8
    )
    mean = tuple(0.4 + 0.05 * i for i in range(channels))
    std = tuple(0.2 + 0.03 * i for i in range(channels))
    return PreparedData(
        name="tiny",
        classes=[f"c{i}" for i in range(num_classes)],
        mean=mean,
        std=std,
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
    )


def tiny_teacher(
    num_classes: int = 4,
    in_chans: int = 3,
    res: int = 8,
    *,
    name: str = "tiny_cnn",
    seed: int = 0,
    running_stats: float | None = None,
    calibrate: Tensor | None = None,
    **kwargs,
) -> nn.Module:
    """A frozen teacher in eval mode, built through the model registry from ``seed``.

    Args:
        running_stats: give every BN layer seeded random running statistics (means
            ``running_stats * N(0, 1)``, variances ``U(0.5, 1.5)``) instead of the defaults.
        calibrate: images (normalised) forwarded three times in train mode first, so the
            running statistics are the data's (what a trained teacher's BN layers hold).
        **kwargs: architecture options of ``name``.
    """
    with seeded_init(seed):
        model = create_model(
            name, num_classes=num_classes, in_chans=in_chans, resolution=res, **kwargs
        )
    if running_stats is not None:
        g = torch.Generator().manual_seed(seed + 1)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.copy_(running_stats * torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    if calibrate is not None:
        with torch.no_grad():
            model.train()
            for _ in range(3):
                model(calibrate)
    return model.eval().requires_grad_(False)
