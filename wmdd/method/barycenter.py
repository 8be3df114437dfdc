r"""Per-class Wasserstein barycenters of teacher features (WMDD, arXiv 2311.18531).

For a class :math:`c` with real features :math:`y_1, \dots, y_n \in \mathbb{R}^D` we form the
empirical measure :math:`\mu_c = \frac{1}{n} \sum_{i=1}^n \delta_{y_i}` and solve the free-support
barycenter problem with a *single* input measure and uniform barycenter weights:

.. math::

    X^\star = \arg\min_{X \in \mathbb{R}^{k \times D}}
        W_2^2\Big(\mu_c,\; \tfrac{1}{k} \textstyle\sum_{j=1}^k \delta_{x_j}\Big),

    W_2^2(\mu, \nu) = \min_{P \in \Pi(a, b)} \sum_{i, j} P_{ij} \lVert y_i - x_j \rVert_2^2 .

With one input measure this is *equal-mass optimal quantisation*: every support point carries
mass :math:`1/k`, so (when :math:`k` divides :math:`n`) each support point is the centroid of exactly
:math:`n/k` real features. Unlike k-means, no cluster may grab more or less mass than its share.

The solver is POT's ``ot.lp.free_support_barycenter`` (Cuturi & Doucet, ICML 2014, Alg. 2 with
step :math:`\theta = 1`, i.e. the fixed-point iteration
:math:`X \leftarrow \operatorname{diag}(1/b)\, P^\star Y` with :math:`P^\star` the exact OT plan from
``ot.emd``), run in float64 NumPy with POT's defaults ``numItermax=100``, ``stopThr=1e-7``
(stop when :math:`\lVert X_{t+1} - X_t \rVert_F^2 \le` ``stopThr``).

Initial support (our choice, documented): ``g = torch.Generator().manual_seed(seed)`` and
``torch.randn(k, D, generator=g, dtype=torch.float64)``, i.e. :math:`X_0 \sim \mathcal{N}(0, I)`
drawn from a per-call generator, never the global RNG.

Optional weighted variant (``weighted=True``; **not** used by the released configuration): the
paper also describes optimising the barycenter weights :math:`b \in \Delta_k`. We alternate a POT
free-support step at fixed :math:`b` with an exponentiated-gradient (mirror-descent) step on
:math:`b`, using the dual potential :math:`u` of the exact OT problem (``ot.emd(..., log=True)``),
which is a (sub)gradient of :math:`b \mapsto W_2^2(\mu_c, \sum_j b_j \delta_{x_j})`, and keep the
lowest-cost pair; see :func:`_weighted_barycenter` and :func:`_exp_gradient_step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ot
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "Barycenter",
    "class_barycenters",
    "initial_support",
    "stack_supports",
    "wasserstein_barycenter",
]


@dataclass(frozen=True)
class Barycenter:
    """A discrete barycenter measure :math:`\\sum_j w_j \\delta_{x_j}`.

    Attributes:
        support: Support points :math:`x_j`, float32, shape (k, D).
        weights: Weights :math:`w_j` (positive, sum to 1), float32, shape (k,). Uniform
            :math:`1/k` unless the optional weighted variant was used.
    """

    support: Tensor  # (k, D)
    weights: Tensor  # (k,)

    def __post_init__(self) -> None:
        if self.support.ndim != 2 or self.weights.shape != (self.support.shape[0],):
            raise ValueError(
                "Barycenter expects support (k, D) and weights (k,); got "
                f"{tuple(self.support.shape)} and {tuple(self.weights.shape)}"
            )

    def to(self, device: torch.device | str) -> Barycenter:
        """Return a copy with both tensors moved to ``device``."""
        return Barycenter(self.support.to(device), self.weights.to(device))


def initial_support(k: int, dim: int, seed: int) -> Tensor:
    """Draw the initial barycenter support :math:`X_0 \\sim \\mathcal{N}(0, I)`.

    Args:
        k: Number of support points.
        dim: Feature dimension D.
        seed: Seed of a fresh ``torch.Generator`` (the global RNG is never touched).

    Returns:
        Float64 tensor of shape (k, D).
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, dim, generator=g, dtype=torch.float64)  # (k, D)


def _validate(features: Tensor, k: int, num_iter_max: int) -> None:
    """Raise ``ValueError`` on inputs the barycenter is undefined for."""
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k (number of support points) must be an integer >= 1, got {k!r}")
    if num_iter_max < 1:
        raise ValueError(f"num_iter_max must be >= 1, got {num_iter_max}")
    if features.ndim != 2:
        raise ValueError(
            f"features must have shape (n, D) (rank 2), got rank {features.ndim} "
            f"with shape {tuple(features.shape)}"
        )
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain non-finite values (NaN or inf)")


def _free_support_step(
    y: np.ndarray, a: np.ndarray, x0: np.ndarray, b: np.ndarray, num_iter_max: int, stop: float
) -> np.ndarray:
    """One call of POT's free-support solver with a single input measure; returns (k, D)."""
    return ot.lp.free_support_barycenter([y], [a], x0, b=b, numItermax=num_iter_max, stopThr=stop)


def _cost_and_potential(
    y: np.ndarray, a: np.ndarray, x: np.ndarray, b: np.ndarray
) -> tuple[float, np.ndarray]:
    """Exact :math:`W_2^2` between (x, b) and (y, a), and the dual potential of b, shape (k,)."""
    _, log = ot.emd(b, a, ot.dist(x, y), log=True)
    return float(log["cost"]), np.asarray(log["u"])


def _exp_gradient_step(b: np.ndarray, u: np.ndarray, lr: float) -> np.ndarray:
    r"""Mirror-descent (exponentiated-gradient) update of the barycenter weights.

    With :math:`u` the dual potential of the barycenter marginal in the exact OT problem between
    :math:`\sum_j b_j \delta_{x_j}` and :math:`\mu_c` (a subgradient of :math:`W_2^2` in
    :math:`b`) and :math:`g = u - \bar u` (potentials are defined up to a constant), the update is

    .. math:: b_j \leftarrow \frac{b_j \exp(-\eta_t\, g_j / \lVert g \rVert_\infty)}
                               {\sum_l b_l \exp(-\eta_t\, g_l / \lVert g \rVert_\infty)} .

    Normalising by :math:`\lVert g \rVert_\infty` makes :math:`\eta_t` scale free (feature
    distances vary by orders of magnitude between backbones); weights stay positive.
    """
    g = u - u.mean()  # (k,)
    scale = float(np.abs(g).max())
    if scale == 0.0:
        return b
    b_new = b * np.exp(-lr * g / scale)
    return b_new / b_new.sum()


def _weighted_barycenter(
    y: np.ndarray,
    a: np.ndarray,
    x: np.ndarray,
    *,
    iters: int,
    lr: float,
    num_iter_max: int,
    stop: float,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Alternate free-support steps and weight steps; return the best (support, weights) pair.

    Iteration :math:`t`: :math:`X_t` = POT free-support barycenter at fixed weights :math:`b_t`
    (warm-started from :math:`X_{t-1}`), then :math:`b_{t+1}` = :func:`_exp_gradient_step` with
    step :math:`\eta_t = \eta / \sqrt{t + 1}` (subgradient mirror descent). Iterates are not
    monotone, so the pair with the lowest exact :math:`W_2^2` is returned. The first pair
    (:math:`b_0` uniform) *is* the unweighted barycenter, so the result is never worse than it.
    """
    k = x.shape[0]
    b = np.full(k, 1.0 / k)  # (k,)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for t in range(iters):
        x = _free_support_step(y, a, x, b, num_iter_max, stop)
        cost, u = _cost_and_potential(y, a, x, b)
        if best is None or cost < best[0]:
            best = (cost, x, b)
        b = _exp_gradient_step(b, u, lr / np.sqrt(t + 1.0))
    assert best is not None
    return best[1], best[2]


def wasserstein_barycenter(
    features: Tensor,
    k: int,
    *,
    seed: int,
    num_iter_max: int = 100,
    stop_threshold: float = 1e-7,
    weighted: bool = False,
    weight_iters: int = 10,
    weight_lr: float = 0.5,
) -> Barycenter:
    """Free-support W2 barycenter of one class's empirical feature distribution.

    Solves :math:`\\min_X W_2^2(\\frac{1}{n}\\sum_i \\delta_{y_i}, \\frac{1}{k}\\sum_j \\delta_{x_j})`
    with ``ot.lp.free_support_barycenter`` (float64 NumPy, one input measure with uniform weights
    :math:`1/n`, barycenter weights :math:`1/k`, initial support from :func:`initial_support`).
    ``k > n`` is allowed (support points then share real points' mass).

    Args:
        features: Real features of one class, shape (n, D); any float dtype/device (detached and
            copied to float64 CPU NumPy).
        k: Number of support points (images per class).
        seed: Seed of the initial support (see :func:`initial_support`).
        num_iter_max: POT ``numItermax`` (fixed-point iterations).
        stop_threshold: POT ``stopThr`` on the squared Frobenius displacement of the support.
        weighted: Optional variant (off by default, not in the released config): also optimise
            the weights by alternating free-support steps with exponentiated-gradient steps
            for ``weight_iters`` outer iterations, keeping the best pair
            (:func:`_weighted_barycenter`); its cost never exceeds the unweighted result's.
        weight_iters: Outer iterations of the weighted variant (>= 1).
        weight_lr: Initial step :math:`\\eta` of the (normalised) exponentiated-gradient update.

    Returns:
        :class:`Barycenter` with float32 CPU ``support`` (k, D) and ``weights`` (k,).

    Raises:
        ValueError: If ``k < 1``, ``features`` is not rank 2 / is empty, or has NaN/inf values,
            or ``num_iter_max``/``weight_iters`` is < 1.
    """
    _validate(features, k, num_iter_max)
    if weighted and weight_iters < 1:
        raise ValueError(f"weight_iters must be >= 1 for the weighted variant, got {weight_iters}")
    y = features.detach().to("cpu", torch.float64).numpy()  # (n, D)
    n, dim = y.shape
    a = np.full(n, 1.0 / n)  # (n,)
    b = np.full(k, 1.0 / k)  # (k,)
    x = initial_support(k, dim, seed).numpy()  # (k, D)
    if weighted:
        x, b = _weighted_barycenter(
            y,
            a,
            x,
            iters=weight_iters,
            lr=weight_lr,
            num_iter_max=num_iter_max,
            stop=stop_threshold,
        )
    else:
        x = _free_support_step(y, a, x, b, num_iter_max, stop_threshold)  # (k, D)
    return Barycenter(
        support=torch.from_numpy(np.asarray(x)).float(),
        weights=torch.from_numpy(np.asarray(b)).float(),
    )


def class_barycenters(
    features_by_class: Sequence[Tensor],
    k: int,
    *,
    seeds: Sequence[int],
    num_iter_max: int = 100,
    stop_threshold: float = 1e-7,
    weighted: bool = False,
    weight_iters: int = 10,
    weight_lr: float = 0.5,
    progress: bool = True,
) -> list[Barycenter]:
    """Compute :func:`wasserstein_barycenter` for every class.

    Args:
        features_by_class: One (n_c, D) tensor per class c (n_c may differ between classes).
        k: Support points per class.
        seeds: One initial-support seed per class (same length as ``features_by_class``).
        num_iter_max: See :func:`wasserstein_barycenter`.
        stop_threshold: See :func:`wasserstein_barycenter`.
        weighted: See :func:`wasserstein_barycenter`.
        weight_iters: See :func:`wasserstein_barycenter`.
        weight_lr: See :func:`wasserstein_barycenter`.
        progress: Show a tqdm progress bar over classes.

    Returns:
        List of C :class:`Barycenter` objects, in class order.

    Raises:
        ValueError: If ``seeds`` and ``features_by_class`` differ in length, or per-class inputs
            are invalid.
    """
    if len(seeds) != len(features_by_class):
        raise ValueError(
            f"need one seed per class: got {len(seeds)} seeds for {len(features_by_class)} classes"
        )
    return [
        wasserstein_barycenter(
            feats,
            k,
            seed=int(seed),
            num_iter_max=num_iter_max,
            stop_threshold=stop_threshold,
            weighted=weighted,
            weight_iters=weight_iters,
            weight_lr=weight_lr,
        )
        for feats, seed in tqdm(
            list(zip(features_by_class, seeds, strict=True)),
            desc="barycenters",
            disable=not progress,
        )
    ]


def stack_supports(barycenters: Sequence[Barycenter]) -> Tensor:
    """Stack per-class supports into one tensor of shape (C, k, D)."""
    return torch.stack([b.support for b in barycenters])  # (C, k, D)
