"""Herding coreset selection (Welling, ICML 2009; as used by iCaRL, Rebuffi et al. 2017).

Given the features :math:`\\phi_1, \\dots, \\phi_n \\in \\mathbb{R}^D` of one class and their
mean :math:`\\mu = \\frac{1}{n} \\sum_i \\phi_i`, herding greedily picks, at step
:math:`t = 1, \\dots, k`,

.. math::

    i_t = \\operatorname*{arg\\,min}_{i \\notin S_{t-1}}
          \\Big\\| \\mu - \\frac{1}{t} \\Big( \\sum_{j \\in S_{t-1}} \\phi_j + \\phi_i \\Big) \\Big\\|_2,
    \\qquad S_t = S_{t-1} \\cup \\{i_t\\},

so that the running mean of the selected features tracks the class mean. Ties go to the
lowest index. Feature extraction (and any normalisation, e.g. iCaRL's L2 normalisation) is the
caller's business: :func:`herding_select` only sees the feature matrix.

The benchmark method :func:`herding` uses the teacher's penultimate features
:math:`\\phi(x)` (``teacher.forward_features``, eval mode, no L2 normalisation) of every training
image of a class, in the dataset's normalised space, and returns the selected real images. The
features are the ones WMDD uses, computed once per teacher by the ``teacher_stats`` stage
(:mod:`wmdd.synthesis.teacher_stats`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wmdd.data.prepared import TrainingImages
from wmdd.synthesis.teacher_stats import TeacherStats, teacher_stats_for
from wmdd.synthetic_set import SyntheticSet


@dataclass(frozen=True)
class HerdingConfig:
    """Settings of the herding baseline: none (the teacher's features come from the shared
    ``teacher_stats`` stage, whose batch size does not change them)."""


def herding_select(features: Tensor, k: int) -> Tensor:
    """Selects ``k`` distinct rows of ``features`` by greedy herding.

    Each step evaluates all candidates at once in :math:`O(nD)`; the computation runs in
    float64 so that the greedy order does not depend on the input precision.

    Args:
        features: (n, D) feature matrix of one class.
        k: Number of rows to select, ``1 <= k <= n``.

    Returns:
        (k,) long tensor of distinct row indices, in selection order, on ``features.device``.

    Raises:
        ValueError: If ``features`` is not 2-D or ``k`` is outside ``[1, n]``.
    """
    if features.dim() != 2:
        raise ValueError(f"features must have shape (n, D), got {tuple(features.shape)}")
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"herding needs 1 <= k <= n, got k={k} with n={n} samples")
    phi = features.detach().to(torch.float64)  # (n, D)
    mu = phi.mean(dim=0)  # (D,)
    running_sum = torch.zeros_like(mu)  # (D,) sum of the selected features
    available = torch.ones(n, dtype=torch.bool, device=phi.device)  # (n,)
    selected: list[int] = []
    for t in range(1, k + 1):
        candidate_means = (running_sum + phi) / t  # (n, D)
        distances = (mu - candidate_means).pow(2).sum(dim=1)  # (n,) squared L2, same argmin
        distances = distances.masked_fill(~available, float("inf"))
        index = _first_argmin(distances)
        selected.append(index)
        available[index] = False
        running_sum = running_sum + phi[index]
    return torch.tensor(selected, dtype=torch.long, device=features.device)


def _first_argmin(values: Tensor) -> int:
    """Index of the smallest entry of a 1-D tensor; the lowest index among exact ties."""
    minimum = values.min()
    return int(torch.nonzero(values == minimum)[0, 0].item())


def herding(
    *,
    teacher: nn.Module | None,
    data: TrainingImages,
    classes: Sequence[int],
    ipc: int,
    config: HerdingConfig,
    seed: int,
    device: torch.device,
    progress: bool = False,
    teacher_stats: TeacherStats | None = None,
) -> SyntheticSet:
    """Selects ``ipc`` real images per class by herding on the teacher's features.

    Deterministic (``seed`` is unused) and per class, so any class range equals that slice of
    a full run.

    Args:
        teacher: Pretrained teacher in eval mode, with ``forward_features``.
        data: The prepared dataset.
        classes: Classes to select from.
        ipc: Images per class (at most the class's training images).
        config: No settings (kept for the method contract).
        seed: Unused (herding is deterministic).
        device: Where the teacher runs.
        progress: tqdm bar when the features are computed here.
        teacher_stats: The ``teacher_stats`` stage's features (shared with WMDD); computed
            here for ``classes`` when not given.

    Returns:
        Images (len(classes) * ipc, C, H, W) in normalised space, ordered by (class, herding
        order), with ``aux["train_indices"]`` (train-split positions) and
        ``aux["timings"]`` (seconds: teacher_stats (0 when given), select).
    """
    del seed, config
    if teacher is None:
        raise ValueError("herding needs a teacher (its penultimate features are herded)")
    classes = list(classes)
    data.check_ipc(classes, ipc)
    start = time.perf_counter()
    stats = teacher_stats_for(teacher_stats, teacher, data, classes, device=device,
                              progress=progress)  # fmt: skip
    timings = {"teacher_stats": 0.0 if teacher_stats is not None else time.perf_counter() - start}
    start = time.perf_counter()
    images, labels, indices = [], [], []
    for c, phi in zip(classes, stats.class_features(classes), strict=True):
        index = data.train_indices_of_class(c)  # (n_c,) train positions, dataset order
        pick = herding_select(phi, ipc)  # (ipc,) indices within the class
        images.append(data.normalize(data.train_images(index[pick])))
        labels.append(torch.full((ipc,), c, dtype=torch.long))
        indices.append(index[pick])
    timings["select"] = time.perf_counter() - start
    aux = {"train_indices": torch.cat(indices), "timings": timings}
    return SyntheticSet(torch.cat(images), torch.cat(labels), aux=aux)
