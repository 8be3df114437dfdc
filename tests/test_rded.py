"""Tests of the RDED method (``baselines.rded``): the patch order, the padded realism score,
the selection against scores computed here, seeding, class shards and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_prepared, tiny_teacher
from torch import Tensor, nn
from torch.testing import assert_close

from baselines.rded import RDEDConfig, patch_sides, rded, realism_scores, stitch
from wmdd.augment.views import resized_crops, sample_crop_boxes
from wmdd.utils import generator

CPU = torch.device("cpu")


class MeanTeacher(nn.Module):
    """Logits that are a fixed linear function of each channel's mean: scores known here."""

    def __init__(self, num_classes: int = 4, channels: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(num_classes, channels, generator=g) * 4)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3)) @ self.weight.T


def test_patch_sides_put_the_remainder_first() -> None:
    assert patch_sides(8, 2) == [4, 4]
    assert patch_sides(7, 2) == [4, 3]
    assert patch_sides(10, 3) == [4, 3, 3]
    assert patch_sides(16, 1) == [16]


def test_stitch_fills_patch_k_of_image_t_with_ranked_crop_k_times_ipc_plus_t() -> None:
    ipc, factor, side = 3, 2, 4
    crops = torch.arange(ipc * factor**2, dtype=torch.float32).view(-1, 1, 1, 1)
    crops = crops.expand(-1, 2, side, side).clone()  # crop r is the constant r
    out = stitch(crops, factor, 2 * side)
    assert out.shape == (ipc, 2, 8, 8)
    for t in range(ipc):
        for k, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            patch = out[t, :, row * side : (row + 1) * side, col * side : (col + 1) * side]
            assert (patch == k * ipc + t).all()


def test_stitch_resizes_crops_nearest_when_the_side_does_not_divide() -> None:
    crops = torch.rand(4, 1, 3, 3)  # one image, factor 2, size 7: patch rows/cols 4 and 3
    out = stitch(crops, 2, 7)
    assert_close(out[0, :, :4, :4], F.interpolate(crops[:1], size=(4, 4), mode="nearest")[0])
    assert_close(out[0, :, :4, 4:], F.interpolate(crops[1:2], size=(4, 3), mode="nearest")[0])
    assert_close(out[0, :, 4:, 4:], crops[3])
    with pytest.raises(ValueError, match="do not fill"):
        stitch(torch.rand(5, 1, 3, 3), 2, 6)


def test_realism_score_is_the_cross_entropy_of_the_zero_padded_crop() -> None:
    teacher = MeanTeacher()
    crops = torch.randn(5, 3, 4, 4)
    scores = realism_scores(teacher, crops, 2, size=7, batch_size=2)
    padded = torch.zeros(5, 3, 7, 7)
    padded[:, :, 1:5, 1:5] = crops  # pad 3: one before, two after (centred, official split)
    expected = F.cross_entropy(teacher(padded), torch.full((5,), 2), reduction="none")
    assert_close(scores, expected.detach(), rtol=1e-5, atol=1e-5)


def test_factor_one_whole_image_crops_keep_the_images_the_teacher_finds_most_real() -> None:
    # Crops of the whole image at full size are the images themselves: RDED then keeps the
    # ipc images of the class with the lowest cross-entropy, best first.
    data, teacher, ipc = tiny_prepared(res=8, per_class=12), MeanTeacher(), 3
    config = RDEDConfig(candidates=12, crops=2, crop_scale=(1.0, 1.0), factor=1)
    out = rded(teacher=teacher, data=data, classes=range(4), ipc=ipc, config=config, seed=5,
               device=CPU)  # fmt: skip
    assert out.images.shape == (4 * ipc, 3, 8, 8)
    assert out.labels.tolist() == [c for c in range(4) for _ in range(ipc)]
    for c in range(4):
        index = torch.nonzero(data.train_y == c).flatten()
        pool = data.normalize(data.train_x[index])
        ce = F.cross_entropy(teacher(pool), torch.full((len(pool),), c), reduction="none")
        best = torch.argsort(ce.detach())[:ipc]
        assert_close(out.images[c * ipc : (c + 1) * ipc], pool[best])
        assert_close(out.aux["train_indices"][c * ipc : (c + 1) * ipc, 0], index[best])
        assert_close(out.aux["realism"][c * ipc : (c + 1) * ipc, 0], ce.detach()[best])


def test_factor_two_patches_are_the_best_crops_of_their_source_images() -> None:
    data, teacher, ipc = tiny_prepared(res=8, per_class=12), tiny_teacher(res=8), 2
    config = RDEDConfig(candidates=10, crops=3, factor=2)
    out = rded(teacher=teacher, data=data, classes=[1], ipc=ipc, config=config, seed=0,
               device=CPU)  # fmt: skip
    # Replay the draws: the same generator, the same candidate order and boxes.
    g = generator(0, "rded", 1)
    index = torch.nonzero(data.train_y == 1).flatten()
    drawn = index[torch.randperm(len(index), generator=g)[:10]]
    boxes = sample_crop_boxes(30, 8, 8, scale=(0.08, 1.0), ratio=(1.0, 1.0), generator=g)
    images = data.normalize(data.train_x[drawn])
    crops = torch.stack([resized_crops(images, boxes.view(3, 10, 4)[j], 4) for j in range(3)])
    scores = realism_scores(teacher, crops.flatten(0, 1), 1, size=8, batch_size=100).view(3, 10)
    best, which = scores.min(dim=0)
    rank = torch.argsort(best)[: ipc * 4]
    # aux per image and patch: (ipc, 4), column k = patch k = ranked crop k * ipc + t
    assert_close(out.aux["train_indices"], drawn[rank].view(4, ipc).T)
    assert_close(out.aux["realism"], best[rank].view(4, ipc).T)
    ranked = out.aux["realism"].T.flatten()  # back in rank order
    assert (ranked[:-1] <= ranked[1:]).all()  # best first
    kept = crops[which[rank], rank]
    for k, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for t in range(ipc):
            patch = out.images[t, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
            assert_close(patch, kept[k * ipc + t])


def test_seeded_reproducible_and_class_ranges_equal_the_full_run() -> None:
    data, teacher = tiny_prepared(res=8), tiny_teacher(res=8)
    kwargs = dict(teacher=teacher, data=data, ipc=2, config=RDEDConfig(factor=2), device=CPU)
    full = rded(classes=range(4), seed=1, **kwargs)
    again = rded(classes=range(4), seed=1, **kwargs)
    assert_close(full.images, again.images)
    low, high = (
        rded(classes=range(2), seed=1, **kwargs),
        rded(classes=range(2, 4), seed=1, **kwargs),
    )
    assert_close(full.images, torch.cat([low.images, high.images]))
    other = rded(classes=range(4), seed=2, **kwargs)
    assert not torch.equal(full.images, other.images)


def test_jpeg_quality_round_trips_the_stitched_images() -> None:
    data, teacher = tiny_prepared(res=8), tiny_teacher(res=8)
    kwargs = dict(teacher=teacher, data=data, classes=[0], ipc=2, seed=0, device=CPU)
    lossless = rded(config=RDEDConfig(factor=1), **kwargs)
    jpeg = rded(config=RDEDConfig(factor=1, jpeg_quality=75), **kwargs)
    assert not torch.equal(lossless.images, jpeg.images)
    pixels = data.denormalize(jpeg.images)
    assert_close(pixels, (pixels * 255).round() / 255, atol=1e-5, rtol=0)  # 8-bit values


def test_inputs_it_cannot_use_are_errors_naming_the_setting() -> None:
    data, teacher = tiny_prepared(res=8, per_class=12), tiny_teacher(res=8)
    kwargs = dict(data=data, classes=[0], seed=0, device=CPU)
    with pytest.raises(ValueError, match="needs 16 real images of class 0; it has 12"):
        rded(teacher=teacher, ipc=4, config=RDEDConfig(factor=2), **kwargs)
    with pytest.raises(ValueError, match="methods.rded.candidates = 6 .* at least 8"):
        rded(teacher=teacher, ipc=2, config=RDEDConfig(factor=2, candidates=6), **kwargs)
    with pytest.raises(ValueError, match="needs a teacher"):
        rded(teacher=None, ipc=1, config=RDEDConfig(), **kwargs)
    with pytest.raises(ValueError, match="eval mode"):
        rded(teacher=teacher.train(), ipc=1, config=RDEDConfig(), **kwargs)
    with pytest.raises(ValueError, match="factor: expected a positive int"):
        RDEDConfig(factor=0)
    with pytest.raises(ValueError, match="crop_scale"):
        RDEDConfig(crop_scale=(0.5, 0.2))
