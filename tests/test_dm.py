"""Tests of Distribution Matching (baselines.dm)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_prepared
from torch.testing import assert_close

from baselines import dm as dm_module
from baselines.dm import (
    DMConfig,
    dm,
    dm_loss,
    embedder_depth,
    make_embedder,
    siamese_dsa,
)
from wmdd.augment.dsa import FAMILIES, DSAConfig
from wmdd.models.registry import create_model

CPU = torch.device("cpu")


def _small_config(**overrides) -> DMConfig:
    base = dict(iterations=3, real_per_class=6, embed_width=8, embed_depth=2)
    return DMConfig(**{**base, **overrides})


def test_dm_loss_equals_squared_distance_of_class_means() -> None:
    real_a = torch.tensor([[0.0, 0.0], [2.0, 4.0]])  # mean (1, 2)
    syn_a = torch.tensor([[1.0, 1.0]])  # mean (1, 1) -> 1
    real_b = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])  # mean (2, 1)
    syn_b = torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # mean (0, 1) -> 4
    loss = dm_loss([real_a, real_b], [syn_a, syn_b])
    assert_close(loss, torch.tensor(5.0))


def test_dm_loss_gradient_reaches_synthetic_embeddings() -> None:
    real = [torch.randn(5, 3, generator=torch.Generator().manual_seed(1))]
    syn = [torch.zeros(2, 3, requires_grad=True)]
    dm_loss(real, syn).backward()
    # d/ds_i ||m_r - mean(s)||^2 = -2 (m_r - mean(s)) / k
    assert_close(syn[0].grad, (-(real[0].mean(0)) * 2 / 2).expand(2, 3))


@pytest.mark.parametrize(
    ("resolution", "depth"), [(32, 3), (64, 4), (128, 5), (224, 6), (16, 2), (8, 1), (4, 1)]
)
def test_embedder_depth_by_resolution(resolution: int, depth: int) -> None:
    assert embedder_depth(resolution) == depth
    assert embedder_depth(resolution, 2) == 2


def test_fresh_embedder_is_deterministic_and_differs_between_iterations() -> None:
    data, config = tiny_prepared(res=8), _small_config()
    first = make_embedder(data, config, seed=0, iteration=0, device=CPU)
    again = make_embedder(data, config, seed=0, iteration=0, device=CPU)
    second = make_embedder(data, config, seed=0, iteration=1, device=CPU)
    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        assert_close(a, b)
    conv_first, conv_second = first.features[0].weight, second.features[0].weight
    assert not torch.allclose(conv_first, conv_second)
    assert all(not p.requires_grad for p in first.parameters())


def test_loop_draws_a_new_embedder_every_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, torch.Tensor]] = []
    original = dm_module.make_embedder

    def recording(*args, **kwargs):
        net = original(*args, **kwargs)
        calls.append((kwargs["iteration"], net.features[0].weight.clone()))
        return net

    monkeypatch.setattr(dm_module, "make_embedder", recording)
    dm(
        teacher=None,
        data=tiny_prepared(res=8),
        classes=range(4),
        ipc=2,
        config=_small_config(iterations=2),
        seed=3,
        device=CPU,
    )
    assert [it for it, _ in calls] == [0, 1]
    assert not torch.allclose(calls[0][1], calls[1][1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", range(3))
def test_siamese_dsa_applies_one_transform_to_real_and_synthetic(family: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(7, 3, 8, 8, generator=g)
    syn = real[2:4].clone()  # the synthetic batch holds copies of two real images
    real_aug, syn_aug = siamese_dsa(
        real, syn, generator=torch.Generator().manual_seed(seed), config=DSAConfig(strategy=family)
    )
    assert real_aug.shape == real.shape and syn_aug.shape == syn.shape
    assert_close(syn_aug, real_aug[2:4])


def test_loop_uses_siamese_dsa_once_per_class_and_iteration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, int]] = []
    original = dm_module.siamese_dsa

    def recording(real, syn, **kwargs):
        real_aug, syn_aug = original(real, syn, **kwargs)
        calls.append((real.shape[0], syn.shape[0]))
        return real_aug, syn_aug

    monkeypatch.setattr(dm_module, "siamese_dsa", recording)
    dm(
        teacher=None,
        data=tiny_prepared(res=8),
        classes=range(4),
        ipc=2,
        config=_small_config(iterations=2),
        seed=0,
        device=CPU,
    )
    assert calls == [(6, 2)] * 8
    calls.clear()
    dm(
        teacher=None,
        data=tiny_prepared(res=8),
        classes=range(4),
        ipc=2,
        config=_small_config(iterations=2, dsa=False),
        seed=0,
        device=CPU,
    )
    assert calls == []


@pytest.mark.parametrize("classes_per_iteration", [0, 2])
def test_sharded_classes_equal_full_run(classes_per_iteration: int) -> None:
    data = tiny_prepared(res=8)
    config = _small_config(iterations=4, classes_per_iteration=classes_per_iteration)
    kwargs = dict(teacher=None, data=data, ipc=2, config=config, seed=5, device=CPU)
    full = dm(classes=range(4), **kwargs)
    low, high = dm(classes=range(0, 2), **kwargs), dm(classes=range(2, 4), **kwargs)
    assert_close(full.images, torch.cat([low.images, high.images]))
    assert_close(full.labels, torch.cat([low.labels, high.labels]))
    assert full.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_images_move_from_real_init_and_stay_finite() -> None:
    data = tiny_prepared(res=8)
    out = dm(
        teacher=None, data=data, classes=range(4), ipc=3, config=_small_config(), seed=1, device=CPU
    )
    init = dm_module.real_init(data, range(4), 3, seed=1, device=CPU)
    assert out.images.shape == (12, 3, 8, 8) and out.labels.dtype == torch.long
    assert torch.isfinite(out.images).all()
    assert (out.images - init).abs().max() > 1e-3
    # The initial images are real images of the right class.
    pool0 = data.normalize(data.train_of_class(0))
    assert all(any(torch.equal(img, p) for p in pool0) for img in init[:3])
    assert out.aux["used"]["embed_depth"] == 2 and out.aux["used"]["iterations"] == 3
    assert out.aux["loss"].shape == (3,) and torch.isfinite(out.aux["loss"]).all()


def test_bf16_runs_the_embedder_in_bf16_and_keeps_loss_and_pixels_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``precision="bf16"``: the embedder's convolutions return bfloat16 (autocast is on for
    the real and the synthetic forward), the class means and the loss are float32, the
    pixels stay float32 and end near the float32 run's; the float32 run records no
    precision in ``aux["used"]`` (its set file is what it was before the setting)."""
    data = tiny_prepared(res=8)
    seen: list[torch.dtype] = []
    make = dm_module.make_embedder

    def recording_embedder(*args, **kwargs):
        net = make(*args, **kwargs)
        first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        return net

    monkeypatch.setattr(dm_module, "make_embedder", recording_embedder)
    run = dict(teacher=None, data=data, classes=range(4), ipc=2, seed=1, device=CPU)
    fp32 = dm(config=_small_config(), **run)
    assert set(seen) == {torch.float32} and "precision" not in fp32.aux["used"]
    seen.clear()
    bf16 = dm(config=_small_config(precision="bf16"), **run)
    assert set(seen) == {torch.bfloat16} and len(seen) == 2 * 4 * 3  # real + syn, 4 classes, 3 its
    assert bf16.images.dtype == torch.float32 and bf16.aux["loss"].dtype == torch.float32
    assert bf16.aux["used"]["precision"] == "bf16"
    assert not torch.equal(bf16.images, fp32.images)  # another arithmetic...
    assert_close(bf16.images, fp32.images, atol=0.05, rtol=0)  # ...the same optimisation
    assert_close(bf16.aux["loss"], fp32.aux["loss"], rtol=0.05, atol=1e-3)


def test_teacher_feature_space_runs_and_needs_a_teacher() -> None:
    data = tiny_prepared(res=8)
    teacher = create_model("tiny_cnn", num_classes=4, in_chans=3, resolution=8).eval()
    teacher.requires_grad_(False)
    config = _small_config(feature_space="teacher")
    out = dm(teacher=teacher, data=data, classes=range(4), ipc=1, config=config, seed=0, device=CPU)
    assert out.images.shape == (4, 3, 8, 8) and out.aux["used"]["embed_depth"] is None
    with pytest.raises(ValueError, match="needs a teacher"):
        dm(teacher=None, data=data, classes=range(4), ipc=1, config=config, seed=0, device=CPU)


def test_ipc_larger_than_class_is_rejected() -> None:
    with pytest.raises(ValueError, match="IPC 13"):
        dm(
            teacher=None,
            data=tiny_prepared(res=8),
            classes=range(4),
            ipc=13,
            config=_small_config(),
            seed=0,
            device=CPU,
        )


def test_instance_norm_makes_dm_grow_its_images_and_renorm_holds_their_scale() -> None:
    """DM's embedder normalises each image, so its gradient is nearly orthogonal to the image
    and every step grows the image's norm (the IPC-1 drift of the report); ``renorm`` puts
    each image back to its initial norm after every step and still moves the images."""
    data = tiny_prepared(res=8)
    kwargs = dict(teacher=None, data=data, classes=range(4), ipc=1, seed=1, device=CPU)
    init = dm_module.real_init(data, range(4), 1, seed=1, device=CPU)
    config = _small_config(iterations=20, lr=10.0)
    faithful = dm(config=config, **kwargs)
    renormed = dm(config=_small_config(iterations=20, lr=10.0, renorm=True), **kwargs)

    def norms(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).norm(dim=1)

    assert bool((norms(faithful.images) > norms(init) * 1.05).all())
    assert_close(norms(renormed.images), norms(init))
    assert (renormed.images - init).abs().max() > 1e-2
    assert renormed.aux["used"]["renorm"] and not faithful.aux["used"]["renorm"]


def test_large_ipc_learning_rate_is_off_unless_configured() -> None:
    from baselines.dm import pixel_lr

    assert pixel_lr(DMConfig(), 100) == 1.0  # large_ipc 0: never
    assert pixel_lr(DMConfig(large_ipc=100), 100) == 10.0
    assert pixel_lr(DMConfig(large_ipc=100), 99) == 1.0
