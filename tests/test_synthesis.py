"""Tests of the shared image-synthesis loop (wmdd.synthesis.loop)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from wmdd.data.prepared import PreparedData
from wmdd.synthesis.loop import (
    SynthBatch,
    SynthesisConfig,
    batch_views,
    check_aligned,
    class_batches,
    default_jitter,
    pixel_maps,
    real_image_init,
    slot_batches,
    synthesize,
)
from wmdd.utils import cosine_factor, generator

CPU = torch.device("cpu")
SHAPE = (2, 8, 8)
# Per-channel bounds, as data.pixel_bounds() gives them: (1, C, 1, 1) each.
BOUNDS = (torch.tensor([-2.0, -1.5]).view(1, 2, 1, 1), torch.tensor([2.0, 1.0]).view(1, 2, 1, 1))
# No augmentation: the full-image box (scale 1) resizes to itself, no flip, no roll.
NO_AUG = dict(crop_scale=(1.0, 1.0), flip=False, jitter=(0, 0))


def _pairs(batches: list[SynthBatch]) -> list[list[tuple[int, int]]]:
    return [list(zip(b.classes.tolist(), b.slots.tolist(), strict=True)) for b in batches]


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    ("ipc", "per_batch", "num_batches"), [(1, 100, 1), (10, 10, 10), (50, 2, 50), (100, 1, 100)]
)
def test_class_batches_published_layouts(ipc: int, per_batch: int, num_batches: int) -> None:
    batches = class_batches(range(100), ipc)
    assert len(batches) == num_batches
    for g, pairs in enumerate(_pairs(batches)):
        first = g * per_batch
        expected = [(c, s) for c in range(first, first + per_batch) for s in range(ipc)]
        assert pairs == expected


def test_class_batches_is_capped_by_the_number_of_classes() -> None:
    batches = class_batches(range(10), 1)
    assert _pairs(batches) == [[(c, 0) for c in range(10)]]


def test_class_batches_split_a_class_when_ipc_exceeds_the_budget() -> None:
    batches = class_batches(range(2), 250)
    assert [len(b) for b in batches] == [100, 100, 50, 100, 100, 50]
    pairs = _pairs(batches)
    assert pairs[0] == [(0, s) for s in range(100)]
    assert pairs[2] == [(0, s) for s in range(200, 250)]
    assert pairs[3] == [(1, s) for s in range(100)]


def test_slot_batches_layout() -> None:
    batches = slot_batches(range(250), 2)
    chunks = [range(0, 100), range(100, 200), range(200, 250)]
    expected = [[(c, s) for c in chunk] for s in range(2) for chunk in chunks]
    assert _pairs(batches) == expected


@pytest.mark.parametrize("layout", [class_batches, slot_batches])
def test_aligned_shards_give_the_full_runs_batches(layout) -> None:
    full = layout(range(10), 2, 4, num_classes=10)  # groups of 2 (class) / 4 (slot) classes
    shards = layout(range(0, 4), 2, 4, num_classes=10) + layout(range(4, 10), 2, 4, num_classes=10)
    assert sorted(_pairs(full)) == sorted(_pairs(shards))


def test_misaligned_ranges_raise_naming_the_boundary() -> None:
    with pytest.raises(ValueError, match="multiple of 2"):
        class_batches(range(1, 4), 2, 4)  # start 1 splits group [0, 2)
    with pytest.raises(ValueError, match=r"end \(3\)"):
        class_batches(range(0, 3), 2, 4, num_classes=10)
    with pytest.raises(ValueError, match="multiple of 4"):
        slot_batches(range(0, 6), 1, 4, num_classes=10)
    assert check_aligned(range(0, 3), 2, num_classes=3) == range(0, 3)  # dataset end is fine
    with pytest.raises(ValueError, match="consecutive"):
        check_aligned([0, 2], 1)


def test_default_jitter_matches_the_published_conventions() -> None:
    assert default_jitter(224) == (0, 32)
    assert default_jitter(64) == (-4, 4)
    assert default_jitter(16) == (-1, 1)


def test_cosine_factor() -> None:
    assert cosine_factor(0, 10) == 1.0
    assert math.isclose(cosine_factor(5, 10), 0.5)
    assert math.isclose(cosine_factor(10, 10), 0.0, abs_tol=1e-12)
    # The synthesis loop's lr = base * factor equals the published 0.5 * base * (1 + cos).
    for t in range(7):
        assert 0.25 * cosine_factor(t, 7) == 0.5 * 0.25 * (1.0 + math.cos(math.pi * t / 7))


def test_check_ipc_names_the_short_class() -> None:
    data = _tiny_data(per_class=3)
    data.check_ipc(range(2), 3)
    with pytest.raises(ValueError, match="class 0"):
        data.check_ipc(range(2), 4)


# ----------------------------------------------------------------------------- the loop


def _conv_loss(x: Tensor, batch: SynthBatch) -> tuple[Tensor, dict[str, float]]:
    """A simple loss through a fixed conv: every pixel influences it."""
    weight = torch.ones(3, x.shape[1], 3, 3) / 9.0
    target = batch.classes.float().view(-1, 1, 1, 1) * 0.1
    loss = (torch.conv2d(x, weight, padding=1) - target).square().mean()
    return loss, {"mse": float(loss.detach())}


def _run(cfg: SynthesisConfig, batches: list[SynthBatch], seed: int = 0, loss_fn=_conv_loss):
    return synthesize(
        batches=batches,
        loss_fn=loss_fn,
        cfg=cfg,
        seed=seed,
        shape=SHAPE,
        pixel_bounds=BOUNDS,
        device=CPU,
        progress=False,
    )


def test_matches_a_torch_adam_reference_with_cosine_lr_and_clamp() -> None:
    cfg = SynthesisConfig(iterations=2, lr=0.05, **NO_AUG)
    batches = class_batches(range(2), 2)
    images, labels, _ = _run(cfg, batches, seed=3)
    # Reference: torch.optim.Adam on the same initial noise, lr set per step, clamp after.
    init = [
        torch.randn(SHAPE, generator=generator(3, "init", c, s)) for c in (0, 1) for s in (0, 1)
    ]
    x = torch.stack(init).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05, betas=(0.5, 0.9), eps=1e-8)
    for t in range(2):
        opt.param_groups[0]["lr"] = 0.5 * 0.05 * (1 + math.cos(math.pi * t / 2))
        opt.zero_grad()
        _conv_loss(x, batches[0])[0].backward()
        opt.step()
        with torch.no_grad():
            x.data = torch.maximum(torch.minimum(x, BOUNDS[1]), BOUNDS[0])
    assert_close(images, x.detach())
    assert_close(labels, torch.tensor([0, 0, 1, 1]))


def test_loss_decreases_and_every_pixel_moves() -> None:
    cfg = SynthesisConfig(iterations=1, lr=0.01, **NO_AUG)
    batches = class_batches(range(3), 2)
    history: list[float] = []

    def loss_fn(x: Tensor, batch: SynthBatch) -> tuple[Tensor, dict[str, float]]:
        loss, parts = _conv_loss(x, batch)
        history.append(parts["mse"])
        return loss, parts

    images, _, _ = _run(cfg, batches, loss_fn=loss_fn)
    init = torch.stack(
        [
            torch.randn(SHAPE, generator=generator(0, "init", c, s))
            for c in range(3)
            for s in range(2)
        ]
    )
    inside = (init > BOUNDS[0] + 0.02) & (init < BOUNDS[1] - 0.02)  # the clamp leaves alone
    assert bool(((images - init).abs() > 1e-4)[inside].all())  # a gradient reached every pixel
    history.clear()
    _run(
        SynthesisConfig(iterations=8, lr=0.05, crop_scale=(0.5, 1.0), jitter=(-1, 1)),
        batches,
        loss_fn=loss_fn,
    )
    assert history[-1] < 0.5 * history[0]


def test_clamp_keeps_each_channel_in_its_bounds() -> None:
    cfg = SynthesisConfig(iterations=3, lr=5.0)

    def push_out(x: Tensor, batch: SynthBatch) -> tuple[Tensor, dict[str, float]]:
        signs = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)  # channel 0 up, channel 1 down
        return -(x * signs).sum(), {}

    images, _, _ = _run(cfg, class_batches(range(2), 1), loss_fn=push_out)
    assert_close(images[:, 0], BOUNDS[1][0, 0].expand(2, 8, 8))
    assert_close(images[:, 1], BOUNDS[0][0, 1].expand(2, 8, 8))


def test_deterministic_and_seed_dependent() -> None:
    cfg = SynthesisConfig(iterations=3, lr=0.05, jitter=(-1, 1))
    batches = class_batches(range(2), 2)
    first, _, stats = _run(cfg, batches)
    again, _, _ = _run(cfg, batches)
    other, _, _ = _run(cfg, batches, seed=1)
    assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    assert bool(torch.isfinite(first).all())
    assert set(stats) == {
        "iterations",
        "final_loss",
        "final_components",
        "batch_keys",
        "batch_finals",
        "optimise_seconds",
        "curve_sum",
        "curve_batches",
        "curve_names",
    }
    # The loss curve: every iteration of every batch, summed over batches.
    assert stats["curve_sum"].shape == (cfg.iterations, len(stats["curve_names"]))
    assert float(stats["curve_batches"]) == len(batches)
    last = stats["curve_names"].index("loss")
    assert stats["curve_sum"][-1, last] / len(batches) == pytest.approx(stats["final_loss"])
    assert set(stats["final_components"]) == {"mse"}
    assert stats["batch_keys"] == sorted(stats["batch_keys"]) and len(stats["batch_keys"]) == 1
    assert stats["final_loss"] == stats["batch_finals"][0]["loss"]


def test_output_sorted_by_class_and_slot_for_the_slot_layout() -> None:
    def summed(x: Tensor, batch: SynthBatch) -> tuple[Tensor, dict[str, float]]:
        return _conv_loss(x, batch)[0] * len(batch), {}  # separable: a sum over images

    cfg = SynthesisConfig(iterations=2, **NO_AUG)
    by_slot, labels, _ = _run(cfg, slot_batches(range(3), 2), loss_fn=summed)
    by_class, _, _ = _run(
        SynthesisConfig(iterations=2, batch_budget=3, **NO_AUG),
        class_batches(range(3), 2, 3),
        loss_fn=summed,
    )
    assert_close(labels, torch.tensor([0, 0, 1, 1, 2, 2]))
    # Without augmentation a separable loss optimises each image on its own, so both layouts
    # give the same images once sorted by (class, slot).
    assert_close(by_slot, by_class, atol=1e-6, rtol=0)


def test_one_augmentation_draw_for_the_whole_batch() -> None:
    cfg = SynthesisConfig(crop_scale=(0.2, 0.6), flip=True, jitter=(-2, 2))
    one = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0))
    out = batch_views(one.expand(5, *SHAPE).contiguous(), cfg, torch.Generator().manual_seed(1))
    assert_close(out, out[:1].expand_as(out))  # identical inputs -> identical outputs
    assert not torch.allclose(out[0], one[0])


def test_non_finite_loss_stops_the_run() -> None:
    def nan_loss(x: Tensor, batch: SynthBatch) -> tuple[Tensor, dict[str, float]]:
        return x.sum() * float("nan"), {}

    with pytest.raises(FloatingPointError, match="non-finite"):
        _run(SynthesisConfig(iterations=2), class_batches(range(1), 1), loss_fn=nan_loss)


def test_real_init_and_jpeg_roundtrip() -> None:
    data = _tiny_data()
    init = real_image_init(data, seed=0)
    cfg = SynthesisConfig(iterations=1, lr=1e-6, init="real", **NO_AUG)
    batches = class_batches(range(2), 2)
    images, _, _ = synthesize(
        batches=batches,
        loss_fn=_conv_loss,
        cfg=cfg,
        seed=0,
        shape=(3, 8, 8),
        pixel_bounds=data.pixel_bounds(),
        device=CPU,
        real_init=init,
        progress=False,
    )
    expected = torch.stack([init(c, s) for c in range(2) for s in range(2)])
    assert_close(images, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected[0], expected[1])  # distinct slots, distinct images
    jpeg = SynthesisConfig(iterations=1, jpeg_quality=75, **NO_AUG)
    with pytest.raises(ValueError, match="to_pixels"):
        _run(jpeg, batches)  # JPEG needs the dataset's normalisation
    to_pixels, from_pixels = pixel_maps(data)
    out, _, _ = synthesize(
        batches=batches,
        loss_fn=_conv_loss,
        cfg=jpeg,
        seed=0,
        shape=(3, 8, 8),
        pixel_bounds=data.pixel_bounds(),
        device=CPU,
        progress=False,
        to_pixels=to_pixels,
        from_pixels=from_pixels,
    )
    levels = to_pixels(out) * 255  # decoded JPEG pixels are whole 8-bit levels
    assert_close(levels, levels.round(), atol=1e-3, rtol=0)


def _tiny_data(per_class: int = 6) -> PreparedData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2 * per_class, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(2).repeat_interleave(per_class)
    return PreparedData(
        name="tiny",
        classes=["a", "b"],
        mean=(0.5, 0.4, 0.3),
        std=(0.25, 0.3, 0.2),
        train_x=x,
        train_y=y,
        val_x=x[:2],
        val_y=y[:2],
    )
