"""Tests of the seeded, batched augmentations (wmdd.augment.views)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from wmdd.augment.views import (
    CutMixParams,
    apply_cutmix,
    apply_flips,
    random_roll,
    resized_crops,
    sample_crop_boxes,
    sample_cutmix,
    sample_flips,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grid_sample_reference(
    image: torch.Tensor, box: tuple[int, int, int, int], size: int
) -> torch.Tensor:
    """Bilinear sampling of the box at ``size`` x ``size`` bin centres with torch's
    ``grid_sample`` (border padding; pixel centres at integer coordinates). This is what a
    crop + bilinear resize means when the output is at least as large as the box (one
    sample per output pixel). image (1, C, H, W) -> (1, C, size, size)."""
    top, left, h, w = box
    H, W = image.shape[-2:]
    ys = top - 0.5 + (torch.arange(size, dtype=torch.float64) + 0.5) * h / size  # (size,)
    xs = left - 0.5 + (torch.arange(size, dtype=torch.float64) + 0.5) * w / size
    gy = (2 * ys + 1) / H - 1  # pixel -> normalised coordinates (align_corners=False)
    gx = (2 * xs + 1) / W - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (size, size, 2)
    return F.grid_sample(
        image.double(), grid[None], mode="bilinear", padding_mode="border", align_corners=False
    )


# -- resized_crops -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_box_same_size_is_identity(dtype) -> None:
    x = torch.randn(3, 2, 12, 12, generator=_gen(), dtype=dtype)
    boxes = torch.tensor([[0, 0, 12, 12]] * 3)
    assert_close(resized_crops(x, boxes, 12), x)


def test_full_box_upscale_matches_interpolate() -> None:
    """Upscaling the whole image 10 -> 16 px equals bilinear ``F.interpolate``."""
    x = torch.randn(2, 3, 10, 10, generator=_gen(), dtype=torch.float64)
    boxes = torch.tensor([[0, 0, 10, 10]] * 2)
    ref = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    assert_close(resized_crops(x, boxes, 16), ref)


def test_full_box_halving_is_2x2_average_pooling() -> None:
    """Shrinking by 2 averages 2x2 samples per output pixel, at the pixel centres."""
    x = torch.randn(2, 3, 16, 16, generator=_gen(), dtype=torch.float64)
    boxes = torch.tensor([[0, 0, 16, 16]] * 2)
    assert_close(resized_crops(x, boxes, 8), F.avg_pool2d(x, 2))


@pytest.mark.parametrize("box", [(2, 3, 7, 5), (0, 0, 9, 16), (8, 4, 8, 12), (5, 5, 1, 1)])
def test_crop_matches_grid_sample_reference(box) -> None:
    """A crop no larger than the output equals bilinear sampling of the box (grid_sample)."""
    x = torch.randn(2, 3, 16, 16, generator=_gen(1), dtype=torch.float64)
    boxes = torch.tensor([box, (0, 0, 16, 16)])
    out = resized_crops(x, boxes, 16)
    assert_close(out[:1], _grid_sample_reference(x[:1], box, 16))
    assert_close(out[1], x[1])  # each image gets its own box


def test_crop_of_constant_image_is_constant() -> None:
    x = torch.full((2, 3, 16, 16), 0.7)
    x[1] = -1.25
    boxes = torch.tensor([[3, 2, 9, 11], [0, 5, 16, 4]])
    for size in (5, 8, 24):
        out = resized_crops(x, boxes, size)
        assert_close(out[0], torch.full((3, size, size), 0.7))
        assert_close(out[1], torch.full((3, size, size), -1.25))


@pytest.mark.parametrize("left", [0, 8])
def test_half_box_on_horizontal_gradient(left) -> None:
    """Image value = column index. The half box [left, left + 8) resized to 16 px is strictly
    increasing along x, constant along y, and within the box's span of columns. Known
    answer: output column i samples x = left - 1/4 + i / 2, clamped to the image [0, 15]."""
    x = torch.arange(16, dtype=torch.float32).expand(1, 1, 16, 16).clone()
    out = resized_crops(x, torch.tensor([[0, left, 16, 8]]), 16)[0, 0]  # (16, 16)
    assert (out[:, 1:] > out[:, :-1]).all()
    assert_close(out, out[:1].expand(16, 16))
    assert out.min() >= left - 0.5 and out.max() <= left + 8 - 0.5
    expected = (left - 0.25 + 0.5 * torch.arange(16.0)).clamp(0, 15)
    assert_close(out, expected.expand(16, 16))


def test_gradients_flow_to_images_inside_the_box_only() -> None:
    x = torch.randn(2, 3, 16, 16, generator=_gen(), requires_grad=True)
    boxes = torch.tensor([[4, 6, 6, 5], [0, 0, 16, 16]])
    resized_crops(x, boxes, 8).sum().backward()
    grad = x.grad
    assert torch.isfinite(grad).all()
    assert (grad[1] > 0).all()
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4 - 1 : 4 + 6 + 1, 6 - 1 : 6 + 5 + 1] = True  # the box plus a 1-px bilinear halo
    assert grad[0][:, ~inside].abs().sum() == 0
    assert grad[0][:, 4:10, 6:11].sum() > 0


def test_gradcheck() -> None:
    x = torch.randn(1, 1, 6, 6, generator=_gen(), dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[1, 2, 4, 3]])
    assert torch.autograd.gradcheck(lambda im: resized_crops(im, boxes, 5), (x,))


# -- sample_crop_boxes -------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(16, 16), (12, 20)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.25, 0.5)])
def test_crop_boxes_inside_image_with_area_and_ratio_in_range(height, width, scale) -> None:
    ratio = (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(300, height, width, scale=scale, ratio=ratio, generator=_gen())
    assert boxes.shape == (300, 4) and boxes.dtype == torch.int64
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # w = round(sqrt(A r)), h = round(sqrt(A / r)): each side is within 0.5 of its real
    # value, which bounds the area and the aspect ratio of the rounded box.
    area = height * width
    hf, wf = h.double(), w.double()
    lo_area = (torch.clamp(hf - 0.5, min=0) * torch.clamp(wf - 0.5, min=0)) / area
    hi_area = (hf + 0.5) * (wf + 0.5) / area
    assert (hi_area >= scale[0]).all() and (lo_area <= scale[1]).all()
    assert ((wf + 0.5) / (hf - 0.5).clamp(min=1e-9) >= ratio[0]).all()
    assert ((wf - 0.5) / (hf + 0.5) <= ratio[1]).all()
    # The draws spread over the range (not all the central/fallback box).
    assert len({tuple(b) for b in boxes.tolist()}) > 50


def test_crop_boxes_deterministic_per_generator() -> None:
    a = sample_crop_boxes(20, 16, 16, scale=(0.08, 1.0), generator=_gen(3))
    b = sample_crop_boxes(20, 16, 16, scale=(0.08, 1.0), generator=_gen(3))
    c = sample_crop_boxes(20, 16, 16, scale=(0.08, 1.0), generator=_gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_crop_boxes_full_scale_and_square_ratio_is_the_whole_image() -> None:
    boxes = sample_crop_boxes(5, 16, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_gen())
    assert torch.equal(boxes, torch.tensor([[0, 0, 16, 16]] * 5))


def test_crop_boxes_fallback_is_central_crop_clipped_to_ratio() -> None:
    """No sample can fit (aspect >= 10 at >= 90% of the area): torchvision's fallback, the
    central crop with the aspect ratio clipped to the range: w = 8, h = round(8 / 10) = 1."""
    boxes = sample_crop_boxes(3, 8, 8, scale=(0.9, 1.0), ratio=(10.0, 20.0), generator=_gen())
    assert torch.equal(boxes, torch.tensor([[3, 0, 1, 8]] * 3))
    boxes = sample_crop_boxes(2, 8, 8, scale=(0.9, 1.0), ratio=(0.05, 0.1), generator=_gen())
    assert torch.equal(boxes, torch.tensor([[0, 3, 8, 1]] * 2))  # h = 8, w = round(8 * 0.1)


# -- flips -------------------------------------------------------------------------------


def test_apply_flips_only_flagged() -> None:
    x = torch.randn(4, 2, 5, 7, generator=_gen())
    flags = torch.tensor([True, False, False, True])
    out = apply_flips(x, flags)
    for i in range(4):
        expected = x[i, :, :, torch.arange(6, -1, -1)] if flags[i] else x[i]
        assert torch.equal(out[i], expected)


def test_sample_flips() -> None:
    assert not sample_flips(50, generator=_gen(), p=0.0).any()
    assert sample_flips(50, generator=_gen(), p=1.0).all()
    f = sample_flips(400, generator=_gen(), p=0.5)
    assert f.dtype == torch.bool and 120 < int(f.sum()) < 280
    assert torch.equal(f, sample_flips(400, generator=_gen(), p=0.5))


# -- CutMix ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_pastes_the_permuted_source(seed) -> None:
    x = torch.randn(5, 3, 12, 10, generator=_gen(seed))
    params = sample_cutmix(5, 12, 10, alpha=1.0, generator=_gen(seed))
    y1, y2, x1, x2 = params.box
    assert 0 <= y1 <= y2 <= 12 and 0 <= x1 <= x2 <= 10
    assert 0.0 <= params.lam <= 1.0
    assert sorted(params.perm.tolist()) == list(range(5))
    cut = math.sqrt(1 - params.lam)  # box sides (before clipping) = sqrt(1 - lambda) * side
    assert y2 - y1 <= int(12 * cut) and x2 - x1 <= int(10 * cut)
    out = apply_cutmix(x, params)
    inside = torch.zeros(12, 10, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    for i in range(5):
        src = int(params.perm[i])
        assert torch.equal(out[i][:, inside], x[src][:, inside])
        assert torch.equal(out[i][:, ~inside], x[i][:, ~inside])


def test_cutmix_explicit_params() -> None:
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 4).clone()
    params = CutMixParams(lam=0.75, box=(1, 3, 0, 2), perm=torch.tensor([2, 0, 1]))
    out = apply_cutmix(x, params)
    expected = x.clone()
    expected[0, :, 1:3, 0:2] = 2.0
    expected[1, :, 1:3, 0:2] = 0.0
    expected[2, :, 1:3, 0:2] = 1.0
    assert torch.equal(out, expected)
    assert torch.equal(x, torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 4))  # not in place


def test_cutmix_deterministic_and_lambda_spread() -> None:
    a = sample_cutmix(8, 16, 16, alpha=1.0, generator=_gen(5))
    b = sample_cutmix(8, 16, 16, alpha=1.0, generator=_gen(5))
    assert a.lam == b.lam and a.box == b.box and torch.equal(a.perm, b.perm)
    gen = _gen(0)
    lams = torch.tensor(
        [sample_cutmix(4, 16, 16, alpha=1.0, generator=gen).lam for _ in range(400)]
    )
    # Beta(1, 1) is uniform: mean 1/2, variance 1/12.
    assert abs(float(lams.mean()) - 0.5) < 0.05
    assert abs(float(lams.var()) - 1 / 12) < 0.02


# -- random_roll -------------------------------------------------------------------------


def test_random_roll_equals_torch_roll_by_the_drawn_shift() -> None:
    x = torch.randn(3, 2, 9, 11, generator=_gen())
    for seed in range(5):
        out = random_roll(x, max_shift=(-4, 4), generator=_gen(seed))
        dy, dx = torch.randint(-4, 5, (2,), generator=_gen(seed)).tolist()
        assert torch.equal(out, torch.roll(x, shifts=(dy, dx), dims=(-2, -1)))


def test_random_roll_shift_range_is_inclusive() -> None:
    """Recover (dy, dx) from a rolled index image: uniform over [lo, hi], both ends hit."""
    h, w = 40, 40
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    gen = _gen(0)
    shifts = []
    for _ in range(300):
        out = random_roll(x, max_shift=(-3, 2), generator=gen)
        pos = int((out[0, 0] == 0).nonzero()[0, 0]), int((out[0, 0] == 0).nonzero()[0, 1])
        shifts += [(pos[0] + 3) % h - 3, (pos[1] + 3) % w - 3]  # back to [-3, h - 4]
    assert set(shifts) == set(range(-3, 3))
