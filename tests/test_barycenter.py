"""Tests for wmdd.method.barycenter (per-class free-support W2 barycenters)."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from torch import Tensor

from wmdd.method.barycenter import (
    Barycenter,
    class_barycenters,
    initial_support,
    stack_supports,
    wasserstein_barycenter,
)


def _features(n: int, dim: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g)  # (n, D)


def _sort_rows(x: Tensor) -> Tensor:
    """Sort rows lexicographically (by first column; ties are measure-zero for random data)."""
    return x[torch.argsort(x[:, 0])]


def _plan(features: Tensor, bary: Barycenter) -> np.ndarray:
    """Exact OT plan (k, n) between the barycenter and the uniform empirical measure."""
    y = features.double().numpy()
    x = bary.support.double().numpy()
    a = np.full(y.shape[0], 1.0 / y.shape[0])
    return ot.emd(bary.weights.double().numpy(), a, ot.dist(x, y))


def test_matches_pot_called_directly() -> None:
    feats = _features(60, 8, seed=0)
    k, seed = 6, 123
    ours = wasserstein_barycenter(feats, k, seed=seed)
    x_init = initial_support(k, 8, seed).numpy()
    ref = ot.lp.free_support_barycenter(
        [feats.double().numpy()], [np.full(60, 1 / 60)], x_init, numItermax=100, stopThr=1e-7
    )
    assert ours.support.shape == (k, 8) and ours.support.dtype == torch.float32
    torch.testing.assert_close(ours.support, torch.from_numpy(ref).float())
    torch.testing.assert_close(ours.weights, torch.full((k,), 1.0 / k))


def test_initial_support_is_seeded_standard_normal() -> None:
    g = torch.Generator().manual_seed(7)
    torch.testing.assert_close(
        initial_support(3, 4, 7), torch.randn(3, 4, generator=g, dtype=torch.float64)
    )


def test_k_equals_n_recovers_the_points() -> None:
    feats = _features(10, 3, seed=1)
    bary = wasserstein_barycenter(feats, 10, seed=5)
    torch.testing.assert_close(_sort_rows(bary.support), _sort_rows(feats))


def test_two_point_masses_k1_gives_midpoint() -> None:
    feats = torch.tensor([[-1.0], [1.0]])
    bary = wasserstein_barycenter(feats, 1, seed=0)
    torch.testing.assert_close(bary.support, torch.zeros(1, 1))


def test_same_seed_is_deterministic_and_seed_matters() -> None:
    feats = _features(50, 4, seed=2)
    first = wasserstein_barycenter(feats, 5, seed=11)
    again = wasserstein_barycenter(feats, 5, seed=11)
    torch.testing.assert_close(first.support, again.support, rtol=0, atol=0)
    assert not torch.equal(initial_support(5, 4, 11), initial_support(5, 4, 12))


def test_does_not_touch_global_rng() -> None:
    state = torch.get_rng_state()
    wasserstein_barycenter(_features(20, 2, seed=3), 4, seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_equal_mass_assignment_and_centroids() -> None:
    n, k = 40, 5
    feats = _features(n, 3, seed=4)
    bary = wasserstein_barycenter(feats, k, seed=9)
    plan = _plan(feats, bary)  # (k, n)
    assign = plan * n  # 0/1 at an optimal vertex: every point goes wholly to one support point
    np.testing.assert_allclose(assign, np.round(assign), atol=1e-9)
    np.testing.assert_array_equal((assign > 0.5).sum(axis=1), np.full(k, n // k))
    np.testing.assert_array_equal((assign > 0.5).sum(axis=0), np.ones(n))
    # Fixed point of the barycenter iteration: each support point is its cluster's centroid.
    centroids = torch.from_numpy((assign @ feats.double().numpy()) / (n // k)).float()
    torch.testing.assert_close(bary.support, centroids)


def test_lower_cost_than_initialisation() -> None:
    feats = _features(30, 2, seed=6)
    bary = wasserstein_barycenter(feats, 3, seed=1)
    init = Barycenter(initial_support(3, 2, 1).float(), torch.full((3,), 1 / 3))
    y = feats.double().numpy()
    a = np.full(30, 1 / 30)
    b = np.full(3, 1 / 3)
    cost = ot.emd2(b, a, ot.dist(bary.support.double().numpy(), y))
    cost_init = ot.emd2(b, a, ot.dist(init.support.double().numpy(), y))
    assert cost < cost_init


def _cost(features: Tensor, bary: Barycenter) -> float:
    return float(
        np.sum(
            _plan(features, bary)
            * ot.dist(bary.support.double().numpy(), features.double().numpy())
        )
    )


def test_weighted_variant_weights_on_simplex() -> None:
    g = torch.Generator().manual_seed(8)
    big = torch.randn(40, 2, generator=g) * 0.1 + torch.tensor([5.0, 0.0])
    small = torch.randn(8, 2, generator=g) * 0.1 - torch.tensor([5.0, 0.0])
    feats = torch.cat([big, small])  # imbalanced clusters: 1/4 mass each is suboptimal
    bary = wasserstein_barycenter(feats, 4, seed=0, weighted=True)
    assert bary.weights.shape == (4,) and bary.support.shape == (4, 2)
    assert bool((bary.weights > 0).all())
    torch.testing.assert_close(bary.weights.sum(), torch.tensor(1.0))
    assert not torch.allclose(bary.weights, torch.full((4,), 0.25), atol=1e-2)
    uniform = wasserstein_barycenter(feats, 4, seed=0)
    assert _cost(feats, bary) < _cost(feats, uniform)


def test_class_barycenters_and_stack() -> None:
    feats = [_features(12, 3, seed=s) for s in range(3)]
    barys = class_barycenters(feats, 2, seeds=[0, 1, 2], progress=False)
    assert len(barys) == 3
    torch.testing.assert_close(
        barys[1].support, wasserstein_barycenter(feats[1], 2, seed=1).support
    )
    assert stack_supports(barys).shape == (3, 2, 3)
    with pytest.raises(ValueError, match="one seed per class"):
        class_barycenters(feats, 2, seeds=[0, 1], progress=False)


@pytest.mark.parametrize(
    ("features", "k", "match"),
    [
        (torch.zeros(5, 2), 0, "k"),
        (torch.zeros(5), 2, "rank 2"),
        (torch.zeros(2, 5, 2), 2, "rank 2"),
        (torch.zeros(0, 3), 1, "non-empty"),
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, "non-finite"),
        (torch.tensor([[0.0, float("inf")], [1.0, 1.0]]), 1, "non-finite"),
    ],
)
def test_invalid_inputs_raise(features: Tensor, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        wasserstein_barycenter(features, k, seed=0)
