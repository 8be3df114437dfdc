"""Tests of greedy herding selection (baselines.herding)."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.herding import herding_select


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))  # (n, d)


def _brute_force_herding(features: torch.Tensor, k: int) -> list[int]:
    """Reference: plain Python loops over candidates, strict '<' keeps the lowest index."""
    rows = features.double().tolist()
    n, d = len(rows), len(rows[0])
    mu = [sum(row[j] for row in rows) / n for j in range(d)]
    chosen: list[int] = []
    total = [0.0] * d
    for t in range(1, k + 1):
        best_index, best_distance = -1, math.inf
        for i in range(n):
            if i in chosen:
                continue
            mean = [(total[j] + rows[i][j]) / t for j in range(d)]
            distance = math.sqrt(sum((mu[j] - mean[j]) ** 2 for j in range(d)))
            if distance < best_distance:
                best_index, best_distance = i, distance
        chosen.append(best_index)
        total = [total[j] + rows[best_index][j] for j in range(d)]
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_reference(seed: int) -> None:
    features = _features(20, 5, seed)
    selected = herding_select(features, 6)
    assert selected.dtype == torch.long and selected.shape == (6,)
    assert selected.tolist() == _brute_force_herding(features, 6)


def test_selected_indices_are_distinct() -> None:
    selected = herding_select(_features(20, 5, 0), 15)
    assert len(set(selected.tolist())) == 15


def test_k_equal_n_selects_everything() -> None:
    features = _features(20, 5, 0)
    selected = herding_select(features, 20)
    assert sorted(selected.tolist()) == list(range(20))
    assert selected.tolist() == _brute_force_herding(features, 20)


def test_first_pick_is_closest_to_mean() -> None:
    features = _features(20, 5, 3)
    closest = int(torch.linalg.vector_norm(features - features.mean(0), dim=1).argmin())
    assert int(herding_select(features, 1)[0]) == closest


def test_ties_go_to_lowest_index() -> None:
    # Mean is 0; every point is equidistant at step 1, so index 0 wins; then the running mean
    # is pulled back to 0 by index 2 (lowest of the two (-1, 0) rows); then 1, then 3.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    assert herding_select(features, 4).tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize("k", [21, 0, -1])
def test_invalid_k_raises(k: int) -> None:
    with pytest.raises(ValueError, match=rf"k={k}.*n=20"):
        herding_select(_features(20, 5, 0), k)


def test_non_matrix_features_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        herding_select(torch.zeros(4), 1)
