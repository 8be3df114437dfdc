"""Tests for wmdd.synthesis.bn_stats (BN-input recorder, per-class and global BN statistics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from wmdd.synthesis.bn_stats import (
    BNInputRecorder,
    BNStats,
    batch_channel_stats,
    global_bn_stats,
    per_class_bn_stats,
)

CLASS_SIZES = (7, 12, 5)
BATCH = 4  # 7 = 4 + 3, 12 = 3 * 4, 5 = 4 + 1: partial batches


class TinyNet(nn.Module):
    """Three conv-BN blocks, the second BN inside a nested module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5))
        self.conv3 = nn.Conv2d(5, 6, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def bn_inputs(self, x: Tensor) -> list[Tensor]:
        """Independent reference: the BN inputs via a manual forward of the submodules."""
        z1 = self.conv1(x)
        z2 = self.block[0](torch.relu(self.bn1(z1)))
        z3 = self.conv3(torch.relu(self.block[1](z2)))
        return [z1, z2, z3]

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.block(x))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))


def _tiny_net() -> TinyNet:
    net = TinyNet()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # re-draw every parameter from a local generator (no global RNG)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    for bn in (net.bn1, net.block[1], net.bn3):
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(c, generator=g))
    return net.eval()


def _class_images() -> list[Tensor]:
    """Per-class images whose brightness drifts within a class (batch means differ)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for c, n in enumerate(CLASS_SIZES):
        drift = torch.linspace(-2.0, 2.0, n).view(n, 1, 1, 1)
        out.append(torch.randn(n, 3, 8, 8, generator=g) + drift + c)  # (n, 3, 8, 8)
    return out


def _dataset() -> tuple[Tensor, Tensor]:
    """Interleave classes so per-class grouping is actually exercised."""
    imgs = _class_images()
    images = torch.cat(imgs)
    labels = torch.cat([torch.full((len(x),), c) for c, x in enumerate(imgs)])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))
    return images[perm], labels[perm]


@pytest.fixture(scope="module")
def net() -> TinyNet:
    return _tiny_net()


def test_exact_pooling_matches_full_class_stats(net: TinyNet) -> None:
    images, labels = _dataset()
    stats = per_class_bn_stats(
        net, images, labels, num_classes=3, batch_size=BATCH, device="cpu", progress=False
    )
    assert stats.layer_names == ("bn1", "block.1", "bn3")
    with torch.no_grad():
        refs = [net.bn_inputs(x) for x in _class_images()]
    for layer in range(3):
        want_mean = torch.stack([r[layer].mean((0, 2, 3)) for r in refs])  # (3, C_l)
        want_var = torch.stack([r[layer].var((0, 2, 3), unbiased=False) for r in refs])
        torch.testing.assert_close(stats.mean[layer], want_mean)
        torch.testing.assert_close(stats.var[layer], want_var)


def _batch_mean_reference(net: TinyNet, x: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """Official-code pooling by hand: per-batch stats averaged with each batch weighted by
    its number of images (the official loop accumulates ``stat * batch_size`` and divides by
    the class's image count)."""
    means, vars_, sizes = [], [], []
    for start in range(0, len(x), BATCH):
        z = net.bn_inputs(x[start : start + BATCH])[layer]
        means.append(z.mean((0, 2, 3)))
        vars_.append(z.var((0, 2, 3), unbiased=False))
        sizes.append(len(z))
    w = torch.tensor(sizes, dtype=torch.float32)[:, None] / sum(sizes)  # (batches, 1)
    return (torch.stack(means) * w).sum(0), (torch.stack(vars_) * w).sum(0)


def test_batch_mean_pooling_reproduces_official_and_underestimates(net: TinyNet) -> None:
    images, labels = _dataset()
    kwargs = {"num_classes": 3, "batch_size": BATCH, "progress": False}
    official = per_class_bn_stats(net, images, labels, pooling="batch_mean", **kwargs)
    exact = per_class_bn_stats(net, images, labels, pooling="exact", **kwargs)
    assert official.pooling == "batch_mean" and exact.pooling == "exact"
    with torch.no_grad():
        for c in range(3):
            x = images[labels == c]  # batches follow dataset order within the class
            for layer in range(3):
                want_mean, want_var = _batch_mean_reference(net, x, layer)
                torch.testing.assert_close(official.mean[layer][c], want_mean)
                torch.testing.assert_close(official.var[layer][c], want_var)
    # Size weighting, not one vote per batch: class 2's 5 images come as batches of 4 and 1,
    # so its mean is the exact class mean (an unweighted average of the two batch means is not).
    with torch.no_grad():
        x = images[labels == 2]
        for layer in range(3):
            z = net.bn_inputs(x)[layer]
            torch.testing.assert_close(official.mean[layer][2], z.mean((0, 2, 3)))
            assert not torch.allclose(
                official.mean[layer][2],
                torch.stack([z[:4].mean((0, 2, 3)), z[4:].mean((0, 2, 3))]).mean(0),
            )
    # Class 1 has 3 full batches: by the law of total variance, the official average of
    # within-batch variances misses exactly the spread of the batch means (an underestimate).
    with torch.no_grad():
        x = images[labels == 1]
        for layer in range(3):
            batch_means = torch.stack(
                [net.bn_inputs(x[s : s + BATCH])[layer].mean((0, 2, 3)) for s in (0, 4, 8)]
            )  # (3, C_l)
            spread = batch_means.var(0, unbiased=False)  # (C_l,)
            assert bool((spread > 0).all())
            torch.testing.assert_close(official.mean[layer][1], exact.mean[layer][1])
            torch.testing.assert_close(official.var[layer][1] + spread, exact.var[layer][1])


def test_exact_pooling_is_batch_size_invariant(net: TinyNet) -> None:
    images, labels = _dataset()
    small = per_class_bn_stats(net, images, labels, num_classes=3, batch_size=3, progress=False)
    large = per_class_bn_stats(net, images, labels, num_classes=3, batch_size=100, progress=False)
    for s_var, l_var in zip(small.var, large.var, strict=True):
        torch.testing.assert_close(s_var, l_var)


def test_per_class_rejects_bad_arguments(net: TinyNet) -> None:
    images, labels = _dataset()
    with pytest.raises(ValueError, match="eval mode"):
        per_class_bn_stats(_tiny_net().train(), images, labels, num_classes=3, progress=False)
    with pytest.raises(ValueError, match="no images"):
        per_class_bn_stats(net, images, labels, num_classes=4, progress=False)
    bad_pooling: Any = "avg"
    with pytest.raises(ValueError, match="pooling"):
        per_class_bn_stats(net, images, labels, num_classes=3, pooling=bad_pooling, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        per_class_bn_stats(net, images, labels, num_classes=2, progress=False)


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_recorder_removes_hooks_and_keeps_grad(net: TinyNet) -> None:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with BNInputRecorder(net) as rec:
        assert rec.layers == ["bn1", "block.1", "bn3"]
        assert _all_hooks(net) == 4  # three BN forward hooks + one clearing pre-hook
        net(x)
        inputs = rec.inputs
    assert _all_hooks(net) == 0
    ref = net.bn_inputs(x)
    for got, want in zip(inputs, ref, strict=True):
        torch.testing.assert_close(got, want)
    loss = sum(batch_channel_stats(z)[1].sum() for z in inputs)
    loss.backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_recorder_clear_and_missing_forward(net: TinyNet) -> None:
    with BNInputRecorder(net) as rec:
        with pytest.raises(RuntimeError, match="forward"):
            _ = rec.inputs
        with torch.no_grad():
            net(torch.zeros(1, 3, 8, 8))
        assert len(rec.inputs) == 3
        rec.clear()
        with pytest.raises(RuntimeError, match="forward"):
            _ = rec.inputs


def test_recorder_rejects_model_without_bn() -> None:
    with pytest.raises(ValueError, match="BatchNorm2d"):
        BNInputRecorder(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))


def test_batch_channel_stats_is_biased() -> None:
    x = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(5))
    mean, var = batch_channel_stats(x)
    flat = x.transpose(0, 1).reshape(2, -1)  # (C, N*H*W)
    torch.testing.assert_close(mean, flat.mean(1))
    torch.testing.assert_close(var, ((flat - flat.mean(1, keepdim=True)) ** 2).mean(1))
    with pytest.raises(ValueError, match="N, C, H, W"):
        batch_channel_stats(x[0])


def test_save_load_round_trip(net: TinyNet, tmp_path: Path) -> None:
    images, labels = _dataset()
    stats = per_class_bn_stats(net, images, labels, num_classes=3, batch_size=BATCH, progress=False)
    path = tmp_path / "bn_stats.pt"
    stats.save(path)
    loaded = BNStats.load(path)
    assert loaded.layer_names == stats.layer_names and loaded.pooling == stats.pooling
    assert loaded.num_rows == 3
    for a, b in zip(loaded.mean + loaded.var, stats.mean + stats.var, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved = loaded.to("cpu")
    assert moved.mean[0].device.type == "cpu"


def test_global_bn_stats_equal_running_stats(net: TinyNet) -> None:
    stats = global_bn_stats(net)
    assert stats.layer_names == ("bn1", "block.1", "bn3") and stats.pooling == "running"
    for m, v, bn in zip(stats.mean, stats.var, (net.bn1, net.block[1], net.bn3), strict=True):
        assert m.shape == (1, bn.num_features)
        torch.testing.assert_close(m[0], bn.running_mean)
        torch.testing.assert_close(v[0], bn.running_var)
    assert stats.mean[0].data_ptr() != net.bn1.running_mean.data_ptr()  # a copy, not a view


def test_bnstats_validates_shapes() -> None:
    with pytest.raises(ValueError, match="one entry per layer"):
        BNStats(layer_names=("a",), mean=[], var=[])
    with pytest.raises(ValueError, match="same number of rows"):
        BNStats(
            layer_names=("a", "b"),
            mean=[torch.zeros(2, 3), torch.zeros(1, 3)],
            var=[torch.zeros(2, 3), torch.zeros(1, 3)],
        )
