"""Tests of the random real subset baseline (baselines.random_subset)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_prepared

from baselines.random_subset import RandomConfig, random_subset

CPU = torch.device("cpu")


def _draw(data, *, ipc: int, classes=range(4), draw: int = 0, seed: int = 0):
    return random_subset(
        teacher=None,
        data=data,
        classes=list(classes),
        ipc=ipc,
        config=RandomConfig(draw=draw),
        seed=seed,
        device=CPU,
    )


def _match(data, image: torch.Tensor) -> list[int]:
    """Indices of the training images whose normalised form equals ``image`` exactly."""
    normalised = data.normalize(data.train_x)  # (N, C, R, R)
    return (normalised == image).flatten(1).all(dim=1).nonzero().flatten().tolist()


@pytest.mark.parametrize("ipc", [1, 5])
def test_subset_is_distinct_real_images_of_each_class(ipc) -> None:
    data = tiny_prepared(num_classes=4, per_class=12, channels=3, res=8)
    s = _draw(data, ipc=ipc)
    assert s.images.shape == (4 * ipc, 3, 8, 8) and s.images.dtype == torch.float32
    assert torch.equal(s.labels, torch.arange(4).repeat_interleave(ipc))
    assert s.weights is None
    for c in range(4):
        found = []
        for image in s.images[s.labels == c]:
            matches = _match(data, image)
            assert len(matches) == 1  # a real training image (random images are unique)
            assert int(data.train_y[matches[0]]) == c  # ... of the right class
            found += matches
        assert len(set(found)) == ipc  # distinct


def test_deterministic_and_draw_dependent() -> None:
    data = tiny_prepared(num_classes=4, per_class=12, res=8)
    a, b = _draw(data, ipc=3), _draw(data, ipc=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, _draw(data, ipc=3, draw=1).images)
    assert not torch.equal(a.images, _draw(data, ipc=3, seed=1).images)


def test_draws_are_nested_across_ipc() -> None:
    data = tiny_prepared(num_classes=4, per_class=12, res=8)
    small, large = _draw(data, ipc=1), _draw(data, ipc=10)
    for c in range(4):
        assert torch.equal(small.images[small.labels == c][0], large.images[large.labels == c][0])
    mid = _draw(data, ipc=5)
    for c in range(4):
        assert torch.equal(mid.images[mid.labels == c], large.images[large.labels == c][:5])


def test_sharding_by_class_range_equals_full_run() -> None:
    data = tiny_prepared(num_classes=4, per_class=12, res=8)
    full = _draw(data, ipc=4, classes=range(0, 4))
    first, second = _draw(data, ipc=4, classes=range(0, 2)), _draw(data, ipc=4, classes=range(2, 4))
    assert torch.equal(torch.cat([first.images, second.images]), full.images)
    assert torch.equal(torch.cat([first.labels, second.labels]), full.labels)


def test_ipc_equal_to_class_size_takes_the_whole_class() -> None:
    data = tiny_prepared(num_classes=3, per_class=[4, 6, 5], res=8)
    s = _draw(data, ipc=4, classes=[0])
    got = sorted(_match(data, image)[0] for image in s.images)
    assert got == sorted((data.train_y == 0).nonzero().flatten().tolist())


def test_ipc_larger_than_a_class_raises_naming_class_and_count() -> None:
    data = tiny_prepared(num_classes=3, per_class=[8, 3, 8], res=8)
    with pytest.raises(
        ValueError,
        match=r"IPC 5 is larger than the 3 training images of class 1 "
        r"\('c1'\)",
    ):
        _draw(data, ipc=5, classes=range(3))
    assert len(_draw(data, ipc=5, classes=[0, 2]).images) == 10  # that class not requested
