"""Tests of WMDD (wmdd.method.distill) on a tiny BN CNN teacher."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import tiny_teacher
from torch import Tensor, nn
from torch.testing import assert_close

from wmdd.config import ConfigError, from_dict
from wmdd.data.prepared import PreparedData
from wmdd.method.config import WMDDConfig
from wmdd.method.distill import wmdd_distill
from wmdd.method.loss import (
    WMDDTargets,
    bn_matching_loss,
    grouped_channel_stats,
    teacher_forward,
    wmdd_loss,
)
from wmdd.synthesis.bn_stats import (
    BNInputRecorder,
    BNStats,
    batch_channel_stats,
    per_class_bn_stats,
)
from wmdd.synthesis.loop import SynthBatch, SynthesisConfig, class_batches

CPU = torch.device("cpu")
NUM_CLASSES, PER_CLASS, RES = 4, 10, 8
NO_AUG = dict(crop_scale=(1.0, 1.0), flip=False, jitter=(0, 0))


def _data() -> PreparedData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (NUM_CLASSES * PER_CLASS, 1, RES, RES), generator=g)
    y = torch.arange(NUM_CLASSES).repeat(PER_CLASS)  # interleaved classes
    return PreparedData(
        name="tiny",
        classes=[f"c{i}" for i in range(NUM_CLASSES)],
        mean=(0.4,),
        std=(0.3,),
        train_x=x.to(torch.uint8),
        train_y=y,
        val_x=x[:4].to(torch.uint8),
        val_y=y[:4],
    )


def _teacher() -> nn.Module:
    return tiny_teacher(NUM_CLASSES, 1, RES, running_stats=1.0)


def _config(iterations: int = 2, **overrides) -> WMDDConfig:
    synthesis = SynthesisConfig(iterations=iterations, lr=0.1, batch_budget=4, jitter=(-1, 1))
    return WMDDConfig(synthesis=synthesis, **overrides)


def _random_targets(first_class: int, rows: int, k: int, seed: int = 2) -> WMDDTargets:
    g = torch.Generator().manual_seed(seed)
    channels = (8, 16)  # tiny_cnn's two BN layers
    bn = BNStats(
        layer_names=("features.1", "features.4"),
        mean=[torch.randn(rows, c, generator=g) for c in channels],
        var=[torch.rand(rows, c, generator=g) + 0.1 for c in channels],
    )
    return WMDDTargets(
        first_class=first_class,
        bn=bn,
        barycenters=torch.randn(rows, k, 16, generator=g),
        class_means=torch.randn(rows, 16, generator=g),
    )


def _batch(classes: list[int], k: int) -> SynthBatch:
    return SynthBatch(
        classes=torch.tensor(classes).repeat_interleave(k),
        slots=torch.arange(k).repeat(len(classes)),
    )


def _images(n: int, seed: int = 3) -> Tensor:
    return torch.randn(n, 1, RES, RES, generator=torch.Generator().manual_seed(seed))


def _loss(
    teacher: nn.Module, x: Tensor, batch: SynthBatch, targets: WMDDTargets, config: WMDDConfig
) -> tuple[Tensor, dict[str, float]]:
    with BNInputRecorder(teacher) as recorder:
        return wmdd_loss(
            *teacher_forward(teacher, recorder, x), batch, targets=targets, config=config
        )


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("squared", [False, True])
def test_feature_term_is_one_frobenius_norm_over_the_batch(squared: bool) -> None:
    teacher, x = _teacher(), _images(4)
    batch = _batch([1, 2], k=2)  # rows 0, 1 of a range starting at class 1
    targets = _random_targets(first_class=1, rows=2, k=2)
    _, parts = _loss(teacher, x, batch, targets, _config(squared=squared))
    b = targets.barycenters[[0, 0, 1, 1], [0, 1, 0, 1]]  # (4, D): image m of class c -> b_{c,m}
    expected = torch.linalg.norm(teacher.forward_features(x) - b)
    assert_close(torch.tensor(parts["feature"]), expected**2 if squared else expected)


@pytest.mark.parametrize("squared", [False, True])
def test_bn_term_matches_a_hand_computation_on_a_two_class_batch(squared: bool) -> None:
    teacher, x = _teacher(), _images(6)
    batch = _batch([0, 1], k=3)
    targets = _random_targets(first_class=0, rows=2, k=3)
    _, parts = _loss(teacher, x, batch, targets, _config(squared=squared))
    f = teacher.features  # conv, bn, relu, conv, bn, relu, pool
    z1 = f[0](x)
    z2 = f[3](f[2](f[1](z1)))
    expected = torch.zeros(())
    for z, mu_t, var_t in zip((z1, z2), targets.bn.mean, targets.bn.var, strict=True):
        for diff in ("var", "mean"):
            norms = []
            for c, idx in ((0, slice(0, 3)), (1, slice(3, 6))):
                zc = z[idx]  # (3, C_l, H, W): the class's images x H x W
                stat = (
                    zc.var(dim=(0, 2, 3), unbiased=False) if diff == "var" else zc.mean((0, 2, 3))
                )
                target = var_t[c] if diff == "var" else mu_t[c]
                norm = torch.linalg.norm(stat - target)
                norms.append(norm**2 if squared else norm)
            expected = expected + torch.stack(norms).mean()
    assert_close(torch.tensor(parts["bn"]), expected)
    assert_close(torch.tensor(parts["total"]), torch.tensor(parts["feature"] + 10.0 * parts["bn"]))


def test_grouped_channel_stats_equal_batch_channel_stats_per_group() -> None:
    z = torch.randn(6, 5, 3, 4, generator=torch.Generator().manual_seed(4))  # 3 groups of 2
    mean, var = grouped_channel_stats(z, 3)  # (G, C) each
    for g in range(3):
        ref_mean, ref_var = batch_channel_stats(z[2 * g : 2 * g + 2])
        assert_close(mean[g], ref_mean)
        assert_close(var[g], ref_var)


def _two_pass_stats(z: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """The former grouped statistics: mean, then the mean of squared deviations."""
    zg = z.reshape(groups, z.shape[0] // groups, z.shape[1], -1)  # (G, m, C, H*W)
    mean = zg.mean(dim=(1, 3))
    return mean, (zg - mean[:, None, :, None]).square().mean(dim=(1, 3))


@pytest.mark.parametrize("offset", [0.0, 10.0])  # BN inputs centred, or mean 10x their std
@pytest.mark.parametrize("squared", [False, True])
def test_bn_loss_equals_the_former_two_pass_form_with_its_gradient(
    monkeypatch, offset: float, squared: bool
) -> None:
    g = torch.Generator().manual_seed(int(offset) + squared)
    groups, per_group = 10, 10
    sizes = [(64, 16), (128, 8), (256, 4), (512, 2)]  # ResNet-18's BN inputs at 64 px
    bn_inputs = [
        (torch.randn(groups * per_group, c, s, s, generator=g) + offset).requires_grad_(True)
        for c, s in sizes
    ]
    rows = torch.arange(groups).repeat_interleave(per_group)
    targets = BNStats(
        layer_names=tuple(f"bn{i}" for i in range(len(sizes))),
        mean=[torch.randn(groups, c, generator=g) + offset for c, _ in sizes],
        var=[torch.rand(groups, c, generator=g) + 0.5 for c, _ in sizes],
    )
    new = bn_matching_loss(bn_inputs, targets, rows, squared=squared)
    new_grads = torch.autograd.grad(new, bn_inputs)
    monkeypatch.setattr("wmdd.method.loss.grouped_channel_stats", _two_pass_stats)
    old = bn_matching_loss(bn_inputs, targets, rows, squared=squared)
    old_grads = torch.autograd.grad(old, bn_inputs)
    assert_close(new, old, rtol=2e-5, atol=1e-6)
    for a, b in zip(new_grads, old_grads, strict=True):
        assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    # the comparison can fail: dropping the variance term changes the value
    monkeypatch.setattr(
        "wmdd.method.loss.grouped_channel_stats", lambda z, n: (_two_pass_stats(z, n)[0],) * 2
    )
    assert not torch.allclose(bn_matching_loss(bn_inputs, targets, rows, squared=squared), old)


def test_grouped_statistics_hand_written_backward_is_the_exact_gradient() -> None:
    """torch.autograd.gradcheck (float64, finite differences) of the mean and mean square."""
    from wmdd.method.loss import _GroupMoments

    z = torch.randn(6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _GroupMoments.apply(x, 3), (z,))
    cl = z.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: grouped_channel_stats(x, 2), (cl,))


def test_bn_matching_loss_rejects_interleaved_classes() -> None:
    targets = _random_targets(first_class=0, rows=2, k=2)
    z = [torch.randn(4, 8, 2, 2), torch.randn(4, 16, 1, 1)]
    with pytest.raises(ValueError, match="contiguous"):
        bn_matching_loss(z, targets.bn, torch.tensor([0, 1, 0, 1]))


def test_mmd_matches_class_means_and_equals_wasserstein_at_ipc_1() -> None:
    teacher, x = _teacher(), _images(4)
    targets = _random_targets(first_class=0, rows=2, k=2)
    _, mmd = _loss(teacher, x, _batch([0, 1], k=2), targets, _config(feature_loss="mmd"))
    means = teacher.forward_features(x).view(2, 2, -1).mean(dim=1)  # (G, D)
    assert_close(torch.tensor(mmd["feature"]), torch.linalg.norm(means - targets.class_means))
    # With one image per class the class mean is the single point: both terms coincide.
    one = dataclasses.replace(targets, class_means=targets.barycenters[:, 0])
    _, mmd1 = _loss(teacher, x[:2], _batch([0, 1], k=1), one, _config(feature_loss="mmd"))
    _, wass1 = _loss(teacher, x[:2], _batch([0, 1], k=1), one, _config())
    assert_close(torch.tensor(mmd1["feature"]), torch.tensor(wass1["feature"]))


def test_r_ce_zero_by_default_and_ce_feature_loss() -> None:
    teacher, x = _teacher(), _images(4)
    batch, targets = _batch([0, 1], k=2), _random_targets(first_class=0, rows=2, k=2)
    assert WMDDConfig().r_ce == 0.0
    loss0, parts0 = _loss(teacher, x, batch, targets, _config())
    loss1, parts1 = _loss(teacher, x, batch, targets, _config(r_ce=1.0))
    ce = nn.functional.cross_entropy(teacher(x), batch.classes)
    assert parts0["ce"] == 0.0
    assert_close(loss1, loss0 + ce)
    _, parts_ce = _loss(teacher, x, batch, targets, _config(feature_loss="ce"))
    assert_close(torch.tensor(parts_ce["feature"]), ce)


@pytest.mark.parametrize("feature_loss", ["wasserstein", "ce", "mmd"])
def test_every_pixel_gets_a_finite_gradient(feature_loss: str) -> None:
    teacher = _teacher()
    x = _images(4).requires_grad_(True)
    targets = _random_targets(first_class=0, rows=2, k=2)
    loss, _ = _loss(teacher, x, _batch([0, 1], k=2), targets, _config(feature_loss=feature_loss))
    (grad,) = torch.autograd.grad(loss, [x])
    assert bool(torch.isfinite(grad).all())
    assert bool((grad != 0).all())
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------- the method


def _distill(
    classes=range(NUM_CLASSES),
    ipc: int = 2,
    config: WMDDConfig | None = None,
    teacher: nn.Module | None = None,
):
    return wmdd_distill(
        teacher=teacher or _teacher(),
        data=_data(),
        classes=classes,
        ipc=ipc,
        config=config or _config(),
        seed=0,
        device=CPU,
        progress=False,
    )


def test_loss_decreases_over_a_few_steps() -> None:
    synthesis = SynthesisConfig(iterations=1, lr=0.1, batch_budget=4, **NO_AUG)
    first = _distill(config=WMDDConfig(synthesis=synthesis))
    later = _distill(config=WMDDConfig(synthesis=dataclasses.replace(synthesis, iterations=12)))
    assert later.aux["synthesis"]["final_loss"] < 0.7 * first.aux["synthesis"]["final_loss"]
    assert bool(torch.isfinite(later.images).all())


def test_sharded_runs_equal_the_full_run_exactly() -> None:
    full = _distill(ipc=2)  # batch_budget 4, ipc 2 -> groups of 2 classes
    parts = [_distill(classes=range(0, 2)), _distill(classes=range(2, 4))]
    assert_close(torch.cat([p.images for p in parts]), full.images, rtol=0, atol=0)
    assert_close(torch.cat([p.labels for p in parts]), full.labels, rtol=0, atol=0)
    bary = torch.cat([p.aux["barycenters"] for p in parts])
    assert_close(bary, full.aux["barycenters"], rtol=0, atol=0)


def test_misaligned_range_and_training_teacher_raise() -> None:
    with pytest.raises(ValueError, match="splits a batch group"):
        _distill(classes=range(1, 3))
    with pytest.raises(ValueError, match="eval mode"):
        _distill(teacher=_teacher().train())


@pytest.mark.parametrize("bn_target", ["per_class", "global"])
@pytest.mark.parametrize("feature_loss", ["wasserstein", "ce", "mmd"])
def test_every_ablation_runs_end_to_end(feature_loss: str, bn_target: str) -> None:
    config = _config(feature_loss=feature_loss, bn_target=bn_target)
    out = _distill(ipc=2, config=config)
    assert out.images.shape == (NUM_CLASSES * 2, 1, RES, RES)
    assert_close(out.labels, torch.arange(NUM_CLASSES).repeat_interleave(2))
    assert bool(torch.isfinite(out.images).all())
    assert ("barycenters" in out.aux) == (feature_loss == "wasserstein")
    assert ("class_means" in out.aux) == (feature_loss == "mmd")
    assert BNStats(**out.aux["bn_stats"]).num_rows == (
        NUM_CLASSES if bn_target == "per_class" else 1
    )


def test_aux_holds_barycenters_exact_bn_stats_and_timings() -> None:
    data, teacher = _data(), _teacher()
    out = _distill(ipc=3, teacher=teacher)
    assert out.aux["barycenters"].shape == (NUM_CLASSES, 3, 16)  # (C, k, D)
    assert set(out.aux["timings"]) == {"teacher_stats", "barycenters", "optimise"}
    stats = BNStats(**out.aux["bn_stats"])
    reference = per_class_bn_stats(
        teacher, data.normalize(data.train_x), data.train_y, num_classes=NUM_CLASSES, progress=False
    )
    for got, want in zip(stats.var + stats.mean, reference.var + reference.mean, strict=True):
        assert_close(got, want)
    assert_close(out.aux["classes"], torch.arange(NUM_CLASSES))
    assert class_batches(range(NUM_CLASSES), 3, 4)[0].classes.tolist() == [0, 0, 0]


def test_config_parses_a_nested_params_section_strictly() -> None:
    section = {"lambda_bn": 10, "synthesis": {"iterations": 5, "jitter": [-1, 1], "flip": False}}
    config = from_dict(WMDDConfig, section, path="methods.wmdd")
    assert config.synthesis == SynthesisConfig(iterations=5, jitter=(-1, 1), flip=False)
    assert config.lambda_bn == 10.0 and config.r_ce == 0.0
    with pytest.raises(ConfigError, match=r"methods\.wmdd\.synthesis: unknown key"):
        from_dict(WMDDConfig, {"synthesis": {"iters": 5}}, path="methods.wmdd")


def test_bf16_synthesis_runs_under_autocast_with_float32_statistics() -> None:
    z = torch.randn(20, 8, 4, 4, generator=torch.Generator().manual_seed(3)) + 2.0
    mean32, var32 = grouped_channel_stats(z, 4)
    mean16, var16 = grouped_channel_stats(z.bfloat16(), 4)
    assert mean16.dtype == var16.dtype == torch.float32  # float32 accumulation of bf16 inputs
    assert_close(mean16, mean32, rtol=2e-2, atol=2e-2)
    assert_close(var16, var32, rtol=5e-2, atol=5e-2)
    synthesis = SynthesisConfig(iterations=4, lr=0.1, batch_budget=4, **NO_AUG)
    fp32 = _distill(config=WMDDConfig(synthesis=synthesis))
    bf16 = _distill(config=WMDDConfig(synthesis=dataclasses.replace(synthesis, precision="bf16")))
    assert bf16.images.dtype == torch.float32 and bool(torch.isfinite(bf16.images).all())
    assert not torch.equal(bf16.images, fp32.images)  # autocast changed the numerics
    final = [s.aux["synthesis"]["final_loss"] for s in (fp32, bf16)]
    assert final[1] == pytest.approx(final[0], rel=0.1)


def test_global_bn_target_is_the_official_bn_ablation() -> None:
    """``bn_target="global"`` matches the statistics of the WHOLE batch, which holds one image
    per class (SRe2L's layout), to the running statistics with the first BN layer weighted
    10; before, each class's images were matched separately with every layer weighted 1."""
    from wmdd.method.distill import class_group, synthesis_batches
    from wmdd.method.loss import GLOBAL_FIRST_BN_MULTIPLIER
    from wmdd.synthesis.bn_stats import global_bn_loss, global_bn_stats

    config = _config(bn_target="global")
    batches = synthesis_batches(range(NUM_CLASSES), 3, config, num_classes=NUM_CLASSES)
    assert [b.classes.tolist() for b in batches] == [list(range(NUM_CLASSES))] * 3
    assert [b.slots.tolist() for b in batches] == [[s] * NUM_CLASSES for s in range(3)]
    assert class_group(config, 3) == config.synthesis.batch_budget
    teacher = _teacher()
    running = global_bn_stats(teacher)
    targets = WMDDTargets(
        first_class=0,
        bn=running,
        barycenters=torch.randn(NUM_CLASSES, 3, 16, generator=torch.Generator().manual_seed(1)),
    )
    x = torch.randn(NUM_CLASSES, 1, RES, RES, generator=torch.Generator().manual_seed(2))
    with BNInputRecorder(teacher) as recorder:
        features, logits, inputs = teacher_forward(teacher, recorder, x)
        _, parts = wmdd_loss(features, logits, inputs, batches[1], targets=targets, config=config)
        want = global_bn_loss(inputs, running, GLOBAL_FIRST_BN_MULTIPLIER)
    assert GLOBAL_FIRST_BN_MULTIPLIER == 10.0
    assert parts["bn"] == pytest.approx(float(want), rel=1e-6)
    out = _distill(ipc=2, config=config)
    assert BNStats(**out.aux["bn_stats"]).num_rows == 1


def test_weighted_barycenter_weights_reach_the_set_and_the_kd_loss() -> None:
    """The optimised barycenter weights are the images' KD weights (``k * w``, mean 1), as in
    the official code; before, they were computed and dropped."""
    from wmdd.protocol.soft import kd_loss

    plain = _distill(ipc=3)
    assert plain.weights is None
    out = _distill(ipc=3, config=_config(weighted_barycenter=True))
    mass = out.aux["barycenter_weights"]  # (C, k)
    assert mass.shape == (NUM_CLASSES, 3)
    assert_close(mass.sum(dim=1), torch.ones(NUM_CLASSES))
    assert out.weights is not None and out.weights.shape == (NUM_CLASSES * 3,)
    assert_close(out.weights, 3 * mass.flatten())  # ordered by (class, slot)
    # The soft protocol's loss: each view's KL times its image's weight; weights of 1 give
    # the unweighted loss.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    w = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0, 1.0])
    per_view = torch.stack([kd_loss(s[i : i + 1], t[i : i + 1], 4.0) for i in range(6)])
    assert_close(kd_loss(s, t, 4.0, weights=w), (w * per_view).mean())
    assert_close(kd_loss(s, t, 4.0, weights=torch.ones(6)), kd_loss(s, t, 4.0))
