"""Random real subset: ``k`` training images per class drawn uniformly without replacement.

The reference row every table needs: under a soft-label protocol a random real subset is
far stronger than the hard-label numbers papers quote for it (DD-Ranking measured ~28% vs
SRe2L's 21.3% on ImageNet-1K at IPC 10), so it keeps every other row honest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from wmdd.data.prepared import TrainingImages
from wmdd.synthetic_set import SyntheticSet
from wmdd.utils import generator


@dataclass(frozen=True)
class RandomConfig:
    draw: int = 0  # which subset: each value gives an independent, reproducible draw


def random_subset(
    *,
    teacher: nn.Module | None,
    data: TrainingImages,
    classes: Sequence[int],
    ipc: int,
    config: RandomConfig,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> SyntheticSet:
    """Draws ``ipc`` distinct training images of each class in ``classes``.

    The draw for class ``c`` uses a generator derived from ``(seed, config.draw, c)``, so
    any class range gives the same images as a full run.
    """
    del teacher, device, progress
    data.check_ipc(classes, ipc)
    images, labels = [], []
    for c in classes:
        index = data.train_indices_of_class(c)  # (n_c,) train positions, dataset order
        pick = torch.randperm(len(index), generator=generator(seed, config.draw, c))[:ipc]
        images.append(data.normalize(data.train_images(index[pick])))
        labels.append(torch.full((ipc,), c, dtype=torch.long))
    return SyntheticSet(torch.cat(images), torch.cat(labels))
