"""Tests of the herding baseline method (baselines.herding.herding)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_prepared, tiny_teacher
from torch.testing import assert_close

from baselines.herding import HerdingConfig, herding, herding_select
from wmdd.synthesis.teacher_stats import compute_teacher_stats

CPU = torch.device("cpu")


def _teacher() -> torch.nn.Module:
    return tiny_teacher(res=8)


@pytest.mark.parametrize("batch_size", [5, 256])
def test_selects_the_images_herding_picks_on_teacher_features(batch_size: int) -> None:
    data, teacher, ipc = tiny_prepared(res=8), _teacher(), 3
    stats = compute_teacher_stats(teacher, data, range(4), batch_size=batch_size, device=CPU)
    out = herding(
        teacher=teacher,
        data=data,
        classes=range(4),
        ipc=ipc,
        config=HerdingConfig(),
        seed=0,
        device=CPU,
        teacher_stats=stats,
    )
    assert out.images.shape == (4 * ipc, 3, 8, 8)
    assert out.labels.tolist() == [c for c in range(4) for _ in range(ipc)]
    for c in range(4):
        pool = data.normalize(data.train_of_class(c))  # (12, 3, 8, 8)
        with torch.no_grad():
            phi = teacher.forward_features(pool)  # (12, D), one batch
        pick = herding_select(phi, ipc)
        assert len(set(pick.tolist())) == ipc
        assert_close(out.images[c * ipc : (c + 1) * ipc], pool[pick])
        assert_close(
            out.aux["train_indices"][c * ipc : (c + 1) * ipc],
            torch.nonzero(data.train_y == c).flatten()[pick],
        )
    # The aux indices point at the returned images in the full training set.
    assert_close(out.images, data.normalize(data.train_x[out.aux["train_indices"]]))


def test_sharded_classes_equal_full_run() -> None:
    data, teacher = tiny_prepared(res=8), _teacher()
    kwargs = dict(teacher=teacher, data=data, ipc=4, config=HerdingConfig(), seed=0, device=CPU)
    full = herding(classes=range(4), **kwargs)
    low, high = herding(classes=range(0, 2), **kwargs), herding(classes=range(2, 4), **kwargs)
    assert_close(full.images, torch.cat([low.images, high.images]))
    assert_close(full.labels, torch.cat([low.labels, high.labels]))


def test_ipc_larger_than_class_is_rejected() -> None:
    with pytest.raises(ValueError, match="IPC 13 is larger than the 12 training images"):
        herding(
            teacher=_teacher(),
            data=tiny_prepared(res=8),
            classes=range(4),
            ipc=13,
            config=HerdingConfig(),
            seed=0,
            device=CPU,
        )


def test_needs_a_teacher() -> None:
    with pytest.raises(ValueError, match="needs a teacher"):
        herding(
            teacher=None,
            data=tiny_prepared(res=8),
            classes=range(4),
            ipc=1,
            config=HerdingConfig(),
            seed=0,
            device=CPU,
        )
