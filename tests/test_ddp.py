"""Data-parallel students (``wmdd.distributed``): 2 gloo ranks on the CPU against one
process, and the split of the protocol's batches."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_prepared, tiny_teacher
from torch.testing import assert_close

from wmdd.config import ModelConfig, SoftProtocolConfig
from wmdd.distributed import Ranks
from wmdd.models.accuracy import split_validator
from wmdd.protocol.runner import build_student
from wmdd.protocol.soft import OnlineLabels, plan_epoch, train_student_soft

STUDENT = ModelConfig("convnet", {"width": 8, "depth": 2, "norm": "none"})  # no BatchNorm
CFG = SoftProtocolConfig(
    student=STUDENT, epochs=4, batch_size=8, crop_scale=(0.5, 1.0), relabel_mode="online"
)


def train(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank (or the single process, world 1) of the same training."""
    torch.set_num_threads(1)
    ranks = None
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
        ranks = Ranks(rank, world)
    data = tiny_prepared(num_classes=3, per_class=6, res=8, seed=3)
    images = data.normalize(data.train_x[:12])  # batches of 8 and 4
    labels = OnlineLabels(tiny_teacher(3, 3, 8, running_stats=0.5), CFG, seed=11)
    student = build_student(STUDENT, num_classes=3, in_chans=3, resolution=8, seed=5)
    result = train_student_soft(
        student=student,
        labels=labels,
        images=images,
        validate=split_validator(data, device=torch.device("cpu")),
        cfg=CFG,
        device=torch.device("cpu"),
        progress=False,
        ranks=ranks,
    )
    if rank == 0:
        torch.save({"weights": student.state_dict(), "result": result}, out)
    else:
        assert result == {}
    if world > 1:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    train(0, 1, "", str(tmp_path / "one.pt"))
    mp.spawn(train, args=(2, str(tmp_path / "init"), str(tmp_path / "two.pt")), nprocs=2, join=True)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for name, weight in one["weights"].items():
        assert_close(two["weights"][name], weight, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(
        one["weights"]["classifier.weight"],
        build_student(STUDENT, num_classes=3, in_chans=3, resolution=8, seed=5).classifier.weight,
    )  # it trained
    assert [h["epoch"] for h in two["result"]["history"]] == [1, 2, 3, 4]


@pytest.mark.parametrize(("n", "world"), [(8, 2), (7, 2), (10, 3), (3, 3)])
def test_ranks_split_each_batch_into_the_protocols_views(n: int, world: int) -> None:
    parts = [Ranks(r, world).part(n) for r in range(world)]
    assert parts[0].start == 0 and parts[-1].stop == n
    assert all(a.stop == b.start for a, b in pairwise(parts))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # DDP averages the ranks' gradients of scale * (mean loss of the part): every image then
    # weighs 1 / n, as in the whole batch's mean.
    for r, s in enumerate(sizes):
        assert Ranks(r, world).scale(n) / (world * s) == pytest.approx(1 / n)
    # Every rank draws the same plan, so the parts cover the protocol's batch exactly.
    plan = plan_epoch(n, 8, CFG, seed=1, epoch=0)[0]
    joined = torch.cat([plan.indices[p] for p in parts])
    assert torch.equal(joined, plan.indices)


def test_a_batch_smaller_than_the_ranks_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        Ranks(0, 4).part(3)
