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
caller's business: this module only sees the feature matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
