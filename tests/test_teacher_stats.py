"""The shared teacher statistics (wmdd.synthesis.teacher_stats): one pass equals the two
passes it replaced, bit for bit, and the methods read it instead of recomputing."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_prepared, tiny_teacher
from torch import nn

from baselines.herding import HerdingConfig, herding
from wmdd.method.config import WMDDConfig
from wmdd.method.distill import wmdd_distill
from wmdd.synthesis.bn_stats import BNStats, per_class_bn_stats
from wmdd.synthesis.features import class_features
from wmdd.synthesis.loop import SynthesisConfig
from wmdd.synthesis.teacher_stats import (
    DEFAULT_BATCH_SIZE,
    TeacherStats,
    compute_teacher_stats,
    load_teacher_stats,
)
from wmdd.utils import ArtifactError, file_digest

CPU = torch.device("cpu")
CLASSES = range(4)


def _two_passes(teacher: nn.Module, data, batch_size: int, pooling: str) -> tuple[list, BNStats]:
    """What WMDD computed before the shared stage: the features, then the per-class BN
    statistics of each class, each pass in batches of ``batch_size`` images of one class."""
    feats = class_features(
        teacher, data, CLASSES, batch_size=batch_size, device=CPU, progress=False
    )
    per_class = [
        per_class_bn_stats(
            teacher,
            data.normalize(data.train_of_class(c)),
            torch.zeros(len(data.train_of_class(c)), dtype=torch.long),
            num_classes=1,
            batch_size=batch_size,
            pooling=pooling,  # type: ignore[arg-type]
            progress=False,
        )
        for c in CLASSES
    ]
    layers = range(len(per_class[0].layer_names))
    bn = BNStats(
        layer_names=per_class[0].layer_names,
        mean=[torch.cat([s.mean[i] for s in per_class]) for i in layers],
        var=[torch.cat([s.var[i] for s in per_class]) for i in layers],
        pooling=pooling,
    )
    return feats, bn


def _assert_bn_equal(got: BNStats, want: BNStats) -> None:
    assert got.layer_names == want.layer_names
    for a, b in zip(got.mean + got.var, want.mean + want.var, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "kwargs", "res"),
    [
        ("tiny_cnn", {}, 8),
        ("resnet18", {"stem": "imagenet"}, 32),
        ("convnet", {"width": 16, "depth": 3, "norm": "batch"}, 16),
    ],
)
@pytest.mark.parametrize("pooling", ["exact", "batch_mean"])
def test_one_pass_is_bit_identical_to_the_two_passes(name, kwargs, res, pooling) -> None:
    data = tiny_prepared(res=res, per_class=[12, 7, 5, 11])  # partial last batches
    calib = data.normalize(data.train_x[:16])
    teacher = tiny_teacher(4, 3, res, name=name, calibrate=calib, **kwargs)
    batch_size = 5
    stats = compute_teacher_stats(teacher, data, CLASSES, batch_size=batch_size, device=CPU,
                                  progress=False)  # fmt: skip
    feats, bn = _two_passes(teacher, data, batch_size, pooling)
    for got, want in zip(stats.class_features(CLASSES), feats, strict=True):
        assert torch.equal(got, want)
    _assert_bn_equal(stats.bn_stats(CLASSES, pooling), bn)  # type: ignore[arg-type]


def test_the_two_poolings_differ_so_the_test_above_can_tell_them_apart() -> None:
    data = tiny_prepared(res=8, per_class=[12, 7, 5, 11])
    teacher = tiny_teacher(res=8, calibrate=data.normalize(data.train_x[:16]))
    stats = compute_teacher_stats(teacher, data, CLASSES, batch_size=5, device=CPU, progress=False)
    assert not torch.equal(stats.bn["exact"].var[0], stats.bn["batch_mean"].var[0])


def _stats_file(tmp_path, teacher, data, batch_size: int = 5) -> tuple:
    teacher_file = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), teacher_file)
    stats = compute_teacher_stats(teacher, data, CLASSES, batch_size=batch_size, device=CPU,
                                  teacher_digest=file_digest(teacher_file), progress=False)  # fmt: skip
    path = tmp_path / "teacher_stats.pt"
    stats.save(path)
    return stats, path, teacher_file


def test_save_load_round_trip_and_refusals(tmp_path) -> None:
    data = tiny_prepared(res=8)
    teacher = tiny_teacher(res=8, running_stats=0.1)
    stats, path, teacher_file = _stats_file(tmp_path, teacher, data)
    loaded = load_teacher_stats(path, teacher_file)
    assert loaded.classes == stats.classes and loaded.batch_size == 5
    for a, b in zip(loaded.features, stats.features, strict=True):
        assert torch.equal(a, b)
    for pooling in ("exact", "batch_mean"):
        _assert_bn_equal(loaded.bn[pooling], stats.bn[pooling])
    # Another teacher checkpoint: refused, naming both files.
    torch.save(tiny_teacher(res=8, seed=1).state_dict(), teacher_file)
    with pytest.raises(
        ArtifactError, match=r"teacher_stats\.pt: computed from a teacher .*teacher\.pt"
    ):
        load_teacher_stats(path, teacher_file)
    # Other data (a class with another image count): refused, naming the class.
    with pytest.raises(ValueError, match="class 1 has 12 feature rows but the dataset has 7"):
        loaded.check(tiny_prepared(res=8, per_class=[12, 7, 12, 12]), CLASSES)
    # A truncated file: one line naming the file and the stage.
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="teacher_stats stage"):
        TeacherStats.load(path)


@pytest.mark.parametrize("pooling", ["exact", "batch_mean"])
def test_wmdd_and_herding_from_the_stage_output_equal_their_own_passes(tmp_path, pooling) -> None:
    data = tiny_prepared(res=8)
    teacher = tiny_teacher(res=8, running_stats=0.1)
    # the stage's batch size is the one the methods use without it (params.yaml: 100)
    stats, path, teacher_file = _stats_file(tmp_path, teacher, data, DEFAULT_BATCH_SIZE)
    stats = load_teacher_stats(path, teacher_file)  # as the distill stage reads it
    synthesis = SynthesisConfig(iterations=3, lr=0.1, batch_budget=4, jitter=(-1, 1), flip=False)
    config = WMDDConfig(synthesis=synthesis, bn_pooling=pooling)  # type: ignore[arg-type]
    kwargs = dict(teacher=teacher, data=data, classes=CLASSES, ipc=2, seed=0, device=CPU)
    shared = wmdd_distill(**kwargs, config=config, progress=False, teacher_stats=stats)
    own = wmdd_distill(**kwargs, config=config, progress=False)
    assert shared.aux["timings"]["teacher_stats"] == 0.0
    assert torch.equal(shared.images, own.images)
    assert torch.equal(shared.aux["barycenters"], own.aux["barycenters"])
    herd = dict(teacher=teacher, data=data, classes=CLASSES, ipc=3, config=HerdingConfig(), seed=0,
                device=CPU)  # fmt: skip
    assert torch.equal(herding(**herd, teacher_stats=stats).images, herding(**herd).images)
