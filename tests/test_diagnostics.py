"""The teacher's verdict on a distilled set (``wmdd.protocol.diagnostics``), on hand-made answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wmdd.protocol.diagnostics import set_diagnostics


class _PickChannel(nn.Module):
    """Logits = 10 x the per-channel means: the class is the brightest channel."""

    def __init__(self) -> None:
        super().__init__()
        self.train()  # set_diagnostics must switch to eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training
        return 10.0 * x.mean(dim=(2, 3))


def _images(channels: list[int], value: float = 2.0) -> torch.Tensor:
    """One 4x4 image per entry, zero except ``value`` in the given channel."""
    x = torch.zeros(len(channels), 3, 4, 4)
    for i, c in enumerate(channels):
        x[i, c] = value
    return x


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_agreement_and_probabilities_by_hand(batch_size: int) -> None:
    images = _images([0, 1, 2, 2])
    labels = torch.tensor([0, 1, 2, 0])  # the last image shows class 2, labelled 0
    out = set_diagnostics(
        _PickChannel(), images, labels, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=batch_size
    )
    p_top = torch.softmax(torch.tensor([20.0, 0.0, 0.0]), 0)  # logits of a one-hot image
    assert out["teacher_agreement"] == pytest.approx(75.0)
    assert out["teacher_confidence"] == pytest.approx(p_top[0].item(), rel=1e-6)
    expected_label_prob = (3 * p_top[0] + p_top[1]) / 4
    assert out["teacher_label_prob"] == pytest.approx(expected_label_prob.item(), rel=1e-6)
    assert out["images"] == 4.0


def test_pixel_range_is_measured_in_pixel_units() -> None:
    # Normalised value v maps to v * std + mean: with mean 0.5, std 0.25 the valid range
    # [0, 1] is [-2, 2] in normalised units.
    images = torch.zeros(2, 3, 2, 2)
    images[0, 0, 0, 0] = 3.0  # pixel 1.25: outside
    images[1, 2, 1, 1] = -2.0  # pixel 0.0: inside (the boundary)
    images[1, 1, 0, 1] = -2.4  # pixel -0.1: outside
    out = set_diagnostics(
        _PickChannel(), images, torch.tensor([0, 1]), mean=(0.5,) * 3, std=(0.25,) * 3
    )
    assert out["pixels_outside"] == pytest.approx(100.0 * 2 / images.numel())
    assert out["pixel_max"] == pytest.approx(1.25)
    assert out["pixel_min"] == pytest.approx(-0.1)


def test_rounding_error_of_a_real_image_is_not_outside() -> None:
    # A real image normalised and mapped back lands on [0, 1] only up to float rounding.
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    pixels = torch.tensor([0.0, 1.0]).repeat(3, 2, 1).unsqueeze(0)  # (1, 3, 2, 2)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    images = (pixels - m) / s
    images[0, 0, 0, 0] -= 1e-5  # a value a hair below 0 stays inside
    images[0, 1, 1, 1] += 3.0 / 255 / s[0, 1, 0, 0]  # 3 grey levels above 1: outside
    out = set_diagnostics(_PickChannel(), images, torch.tensor([0]), mean=mean, std=std)
    assert out["pixels_outside"] == pytest.approx(100.0 / images.numel())


def test_a_clean_set_has_no_pixels_outside() -> None:
    images = torch.rand(5, 3, 4, 4)  # pixels in [0, 1) with mean 0, std 1
    out = set_diagnostics(
        _PickChannel(), images, torch.zeros(5, dtype=torch.long), mean=(0.0,) * 3, std=(1.0,) * 3
    )
    assert out["pixels_outside"] == 0.0
    assert 0.0 <= out["pixel_min"] <= out["pixel_max"] < 1.0


@pytest.mark.parametrize(
    ("images", "labels", "mean", "match"),
    [
        (torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long), (0.0,) * 3, "non-empty"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.long), (0.0,) * 3, r"\(3,\)"),
        (
            torch.zeros(2, 3, 4, 4),
            torch.zeros(2, dtype=torch.long),
            (0.0,),
            "1/1 channels, the images 3",
        ),
    ],
)
def test_bad_input_is_refused(images, labels, mean, match: str) -> None:
    std = (1.0,) * len(mean)
    with pytest.raises(ValueError, match=match):
        set_diagnostics(_PickChannel(), images, labels, mean=mean, std=std)


class _MeanFeatures(nn.Module):
    """Features = per-channel means; head = identity (the class is the largest feature)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return f


def test_barycenter_diagnostics_by_hand() -> None:
    from wmdd.protocol.diagnostics import barycenter_diagnostics

    # 2 classes x 2 points in a 3-D feature space; point (1, 1) is ambiguous (class 1's but
    # its largest coordinate is 0).
    bary = torch.tensor([[[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [[0.0, 3.0, 0.0], [4.0, 1.0, 0.0]]])
    labels = torch.tensor([0, 0, 1, 1])
    # Images whose features are the points, except image 2: (0, 3, 0) -> (0, 1.5, 0).
    images = bary.reshape(4, 3)[:, :, None, None].expand(4, 3, 2, 2).clone()
    images[2] = images[2] / 2
    out = barycenter_diagnostics(_MeanFeatures(), images, labels, bary, torch.tensor([0, 1]))
    assert out["barycenter_agreement"] == pytest.approx(75.0)  # 3 of 4 points
    assert out["feature_distance"] == pytest.approx(0.0)  # median of (0, 0, 0.5, 0)
    with pytest.raises(ValueError, match="3 images for 2 classes x 2"):
        barycenter_diagnostics(_MeanFeatures(), images[:3], labels[:3], bary, torch.tensor([0, 1]))
