"""Tests of Differentiable Siamese Augmentation (wmdd.augment.dsa)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from wmdd.augment.dsa import (
    FAMILIES,
    DSAConfig,
    DSAParams,
    choose_family,
    crop_shifts,
    cutout_mask,
    dsa,
    dsa_augment,
    sample_dsa_params,
)

H = W = 16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, H, W, generator=_gen(seed))  # (n, 3, H, W)


def _crop_draw(shift: int, pad: int) -> float:
    """The U[0, 1) draw that crop_shifts maps to ``shift`` (centre of its bin)."""
    return (shift + pad + 0.5) / (2 * pad + 1)


# ----------------------------------------------------------------------------- siamese


@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_params_give_same_transform_across_batches_of_different_sizes(family: str) -> None:
    real, syn = _images(8, seed=1), _images(3, seed=2)
    shared_image = _images(1, seed=3)[0]
    real[5] = shared_image
    syn[1] = shared_image
    params = sample_dsa_params(family, 8, generator=_gen(0), config=DSAConfig(), siamese=True)
    assert params.shared and params.num_sets == 1

    real_aug, syn_aug = dsa_augment(real, params), dsa_augment(syn, params)

    assert real_aug.shape == real.shape and syn_aug.shape == syn.shape
    assert_close(real_aug[5], syn_aug[1])
    # One transform for every image: batched result equals image-by-image application.
    for i in range(real.shape[0]):
        assert_close(real_aug[i : i + 1], dsa_augment(real[i : i + 1], params))


def test_dsa_default_is_siamese_and_reusable_on_another_batch() -> None:
    real, syn = _images(8, seed=1), _images(3, seed=2)
    syn[0] = real[2]
    real_aug, params = dsa(real, generator=_gen(5), family="rotate")
    syn_aug, same = dsa(syn, params=params)
    assert same is params
    assert_close(real_aug[2], syn_aug[0])


def test_per_sample_params_differ_per_image_and_reject_other_batch_sizes() -> None:
    params = sample_dsa_params("scale", 8, generator=_gen(0), siamese=False)
    assert params.num_sets == 8 and not params.shared
    assert torch.unique(params.scale[:, 0]).numel() == 8
    dsa_augment(_images(8, seed=1), params)  # the batch size it was drawn for is fine
    with pytest.raises(ValueError, match="siamese"):
        dsa_augment(_images(3, seed=1), params)


# ---------------------------------------------------------------------- differentiability


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_reaches_synthetic_images(family: str) -> None:
    syn = _images(3, seed=2).requires_grad_(True)
    params = sample_dsa_params(family, 3, generator=_gen(0), siamese=True)
    weights = torch.randn(3, 3, H, W, generator=_gen(9))

    (dsa_augment(syn, params) * weights).sum().backward()

    assert syn.grad is not None
    assert torch.isfinite(syn.grad).all()
    assert syn.grad.abs().max() > 0


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("siamese", [True, False])
def test_same_seed_same_output(siamese: bool) -> None:
    x = _images(4, seed=1)
    out_a, params_a = dsa(x, generator=_gen(123), siamese=siamese)
    out_b, params_b = dsa(x, generator=_gen(123), siamese=siamese)
    assert params_a.family == params_b.family
    assert_close(out_a, out_b, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["color", "crop", "scale", "rotate"])
def test_different_seeds_different_output(family: str) -> None:
    x = _images(4, seed=1)
    out_a, _ = dsa(x, generator=_gen(0), family=family, siamese=False)
    out_b, _ = dsa(x, generator=_gen(1), family=family, siamese=False)
    assert not torch.allclose(out_a, out_b)


def test_family_draw_covers_the_strategy() -> None:
    generator = _gen(0)
    config = DSAConfig(strategy="crop_flip_scale")
    drawn = {choose_family(config, generator) for _ in range(200)}
    assert drawn == {"crop", "flip", "scale"}


def test_unknown_family_in_strategy_is_rejected() -> None:
    with pytest.raises(ValueError, match="blur"):
        DSAConfig(strategy="color_blur")


# ------------------------------------------------------------------------- known answers


def test_forced_flip_mirrors_width_and_no_flip_is_identity() -> None:
    x = _images(5, seed=1)
    flipped, _ = dsa(x, params=DSAParams(family="flip", flip=torch.tensor([True])))
    kept, _ = dsa(x, params=DSAParams(family="flip", flip=torch.tensor([False])))
    assert_close(flipped, x.flip(-1), rtol=0, atol=0)
    assert_close(kept, x, rtol=0, atol=0)


def test_per_sample_flip_mirrors_only_selected_images() -> None:
    x = _images(3, seed=1)
    params = DSAParams(family="flip", flip=torch.tensor([True, False, True]))
    out = dsa_augment(x, params)
    assert_close(out[0], x[0].flip(-1))
    assert_close(out[1], x[1])
    assert_close(out[2], x[2].flip(-1))


def test_unit_scale_is_identity() -> None:
    x = _images(4, seed=1)
    out = dsa_augment(x, DSAParams(family="scale", scale=torch.ones(1, 2)))
    assert_close(out, x, rtol=0, atol=1e-5)


def test_zero_rotation_is_identity() -> None:
    x = _images(4, seed=1)
    out = dsa_augment(x, DSAParams(family="rotate", rotate=torch.zeros(1)))
    assert_close(out, x, rtol=0, atol=1e-5)


def test_quarter_rotation_matches_rot90() -> None:
    x = _images(2, seed=1)
    out = dsa_augment(x, DSAParams(family="rotate", rotate=torch.tensor([math.pi / 2])))
    assert_close(out, torch.rot90(x, k=1, dims=(2, 3)), rtol=0, atol=1e-5)


def test_scale_two_zooms_out_with_zero_border() -> None:
    # Sampling grid diag(2, 2) shows the input at half size; the outer ring is padding (0).
    x = torch.ones(1, 1, 9, 9)
    out = dsa_augment(x, DSAParams(family="scale", scale=torch.full((1, 2), 2.0)))
    assert_close(out[0, 0, 2:7, 2:7], torch.ones(5, 5), rtol=0, atol=1e-5)
    assert out[0, 0, 0].abs().max() < 1e-5 and out[0, 0, :, 0].abs().max() < 1e-5


def test_crop_is_integer_translation_with_zero_fill() -> None:
    x = _images(1, seed=1)
    pad = int(0.125 * H + 0.5)  # 2
    draws = torch.tensor([[_crop_draw(1, pad), _crop_draw(-2, pad)]])  # (1, 2)
    params = DSAParams(family="crop", crop=draws)
    assert crop_shifts(params, H, W).tolist() == [[1, -2]]

    out = dsa_augment(x, params)

    expected = torch.zeros_like(x)
    expected[:, :, : H - 1, 2:] = x[:, :, 1:, : W - 2]  # y[i, j] = x[i + 1, j - 2]
    assert_close(out, expected, rtol=0, atol=1e-5)


def test_sampled_crop_shifts_cover_the_official_range() -> None:
    params = sample_dsa_params("crop", 2000, generator=_gen(0), siamese=False)
    shifts = crop_shifts(params, H, W)  # (2000, 2)
    assert set(shifts.flatten().tolist()) == {-2, -1, 0, 1, 2}


def test_cutout_zeroes_exactly_the_mask() -> None:
    x = _images(2, seed=1)
    params = DSAParams(family="cutout", cutout=torch.full((1, 2), 0.5))
    mask = cutout_mask(params, H, W)  # (1, H, W); side 8, centre 8 -> rows/cols 4..11
    expected_mask = torch.zeros(H, W, dtype=torch.bool)
    expected_mask[4:12, 4:12] = True
    assert torch.equal(mask[0], expected_mask)

    out = dsa_augment(x, params)

    assert_close(out, x * (~mask).float().unsqueeze(1), rtol=0, atol=0)


def test_cutout_near_border_is_clipped() -> None:
    params = DSAParams(family="cutout", cutout=torch.zeros(1, 2))  # centre (0, 0)
    mask = cutout_mask(params, H, W)[0]
    assert mask[:4, :4].all() and mask.sum() == 16


# --------------------------------------------------------------------------------- color


def _color(brightness: list[float], saturation: list[float], contrast: list[float]) -> DSAParams:
    return DSAParams(
        family="color",
        brightness=torch.tensor(brightness),
        saturation=torch.tensor(saturation),
        contrast=torch.tensor(contrast),
    )


def test_brightness_adds_a_constant_per_sample() -> None:
    x = _images(2, seed=1)
    out = dsa_augment(x, _color([0.3, -0.2], [1.0, 1.0], [1.0, 1.0]))
    assert_close(out[0], x[0] + 0.3)
    assert_close(out[1], x[1] - 0.2)


def test_zero_saturation_gives_channel_mean_and_zero_contrast_gives_image_mean() -> None:
    x = _images(2, seed=1)
    gray = dsa_augment(x, _color([0.0], [0.0], [1.0]))
    assert_close(gray, x.mean(dim=1, keepdim=True).expand_as(x))
    flat = dsa_augment(x, _color([0.0], [1.0], [0.0]))
    assert_close(flat, x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x))


def test_sampled_color_params_lie_in_official_ranges() -> None:
    config = DSAConfig()
    params = sample_dsa_params("color", 1000, generator=_gen(0), config=config, siamese=False)
    assert params.brightness.abs().max() <= 0.5 * config.brightness
    assert params.saturation.min() >= 0 and params.saturation.max() <= config.saturation
    assert config.contrast <= params.contrast.min() and params.contrast.max() <= 1 + config.contrast


def test_sampled_geometry_params_lie_in_official_ranges() -> None:
    config = DSAConfig()
    scale = sample_dsa_params("scale", 1000, generator=_gen(0), siamese=False).scale
    angle = sample_dsa_params("rotate", 1000, generator=_gen(0), siamese=False).rotate
    flip = sample_dsa_params("flip", 1000, generator=_gen(0), siamese=False).flip
    assert 1 / config.ratio_scale <= scale.min() and scale.max() <= config.ratio_scale
    assert angle.abs().max() <= math.radians(config.ratio_rotate)
    assert 0.4 < flip.float().mean() < 0.6


def test_params_missing_family_fields_are_rejected() -> None:
    with pytest.raises(ValueError, match="brightness"):
        DSAParams(family="color", saturation=torch.ones(1), contrast=torch.ones(1))
