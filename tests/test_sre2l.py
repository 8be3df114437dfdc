"""Tests of SRe2L recovery (baselines.sre2l)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_prepared, tiny_teacher
from torch import Tensor, nn
from torch.testing import assert_close

from baselines import sre2l as sre2l_module
from baselines.sre2l import SRe2LConfig, sre2l, sre2l_bn_loss, sre2l_loss
from wmdd.data.prepared import PreparedData
from wmdd.synthesis.bn_stats import BNInputRecorder, global_bn_stats
from wmdd.synthesis.loop import SynthBatch, SynthesisConfig

CPU = torch.device("cpu")


def _teacher(data: PreparedData | None = None) -> nn.Module:
    """tiny_cnn whose BN running stats were accumulated on the (normalised) real images."""
    return tiny_teacher(res=8, calibrate=None if data is None else data.normalize(data.train_x))


def _bn_inputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    with BNInputRecorder(model) as rec, torch.no_grad():
        model(x)
        return rec.inputs


def _hand_terms(inputs: list[Tensor], model: nn.Module) -> list[Tensor]:
    """Per-layer ||mu - running_mean|| + ||var - running_var||, written out as the official code."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    terms = []
    for z, bn in zip(inputs, bns, strict=True):
        flat = z.permute(1, 0, 2, 3).reshape(z.shape[1], -1)  # (C, N*H*W)
        mean, var = flat.mean(dim=1), flat.var(dim=1, unbiased=False)
        terms.append(torch.norm(bn.running_mean - mean, 2) + torch.norm(bn.running_var - var, 2))
    return terms


def _x(n: int = 6, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_bn_loss_is_zero_when_batch_stats_equal_running_stats() -> None:
    model, x = _teacher(), _x()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # Layer l's input depends on the running stats of layers < l: set them in order.
    for i, bn in enumerate(bns):
        z = _bn_inputs(model, x)[i]
        bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(z.var(dim=(0, 2, 3), unbiased=False))
    loss = sre2l_bn_loss(_bn_inputs(model, x), global_bn_stats(model), first_multiplier=10.0)
    assert_close(loss, torch.tensor(0.0), atol=1e-5, rtol=0)


def test_bn_loss_grows_linearly_with_a_scaled_shift_of_the_targets() -> None:
    model, x = _teacher(), _x()
    inputs = _bn_inputs(model, x)
    exact_means = [z.mean(dim=(0, 2, 3)) for z in inputs]
    exact_vars = [z.var(dim=(0, 2, 3), unbiased=False) for z in inputs]
    gen = torch.Generator().manual_seed(1)
    dmean = [torch.randn(m.shape, generator=gen) for m in exact_means]
    dvar = [torch.rand(v.shape, generator=gen) for v in exact_vars]
    losses = []
    for t in (0.0, 0.5, 1.0, 2.0, 4.0):
        running = (
            [m + t * d for m, d in zip(exact_means, dmean, strict=True)],
            [v + t * d for v, d in zip(exact_vars, dvar, strict=True)],
        )
        losses.append(sre2l_bn_loss(inputs, running, first_multiplier=10.0))
    expected_unit = sum(
        w * (dm.norm() + dv.norm()) for w, dm, dv in zip((10.0, 1.0), dmean, dvar, strict=True)
    )
    assert_close(
        torch.stack(losses),
        torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0]) * expected_unit,
        atol=1e-4,
        rtol=1e-4,
    )
    assert all(a < b for a, b in pairwise(losses))


def test_first_bn_multiplier_applies_to_the_first_layer_only() -> None:
    data = tiny_prepared(res=8)
    model, x = _teacher(data), _x()
    inputs = _bn_inputs(model, x)
    first, second = _hand_terms(inputs, model)
    running = global_bn_stats(model)
    assert_close(sre2l_bn_loss(inputs, running, first_multiplier=1.0), first + second)
    assert_close(sre2l_bn_loss(inputs, running, first_multiplier=10.0), 10.0 * first + second)
    # The tuple-of-lists form of the running statistics gives the same loss.
    lists = ([m[0] for m in running.mean], [v[0] for v in running.var])
    assert_close(sre2l_bn_loss(inputs, lists, first_multiplier=10.0), 10.0 * first + second)


def test_loss_is_ce_plus_weighted_bn_term() -> None:
    data = tiny_prepared(res=8)
    model, x = _teacher(data), _x(4)
    batch = SynthBatch(classes=torch.tensor([0, 1, 2, 3]), slots=torch.zeros(4, dtype=torch.long))
    config = SRe2LConfig(r_bn=0.3, first_bn_multiplier=10.0)
    with BNInputRecorder(model) as rec:
        loss, parts = sre2l_loss(
            model, rec, x, batch, running=global_bn_stats(model), config=config
        )
    first, second = _hand_terms(_bn_inputs(model, x), model)
    ce = F.cross_entropy(model(x), batch.classes)
    assert_close(loss, ce + 0.3 * (10.0 * first + second))
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-5)


def _config(**synthesis) -> SRe2LConfig:
    base = dict(iterations=3, lr=0.1, batch_budget=2, jitter=(-1, 1), crop_scale=(0.5, 1.0))
    return SRe2LConfig(synthesis=SynthesisConfig(**{**base, **synthesis}), r_bn=1.0)


def test_end_to_end_batches_hold_one_image_per_class_and_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tiny_prepared(res=8)
    seen: list[list[tuple[int, int]]] = []
    original = sre2l_module.synthesize_dataset

    def recording(data, **kwargs):
        seen.extend(
            list(zip(b.classes.tolist(), b.slots.tolist(), strict=True)) for b in kwargs["batches"]
        )
        return original(data, **kwargs)

    monkeypatch.setattr(sre2l_module, "synthesize_dataset", recording)
    out = sre2l(
        teacher=_teacher(data),
        data=data,
        classes=range(4),
        ipc=2,
        config=_config(),
        seed=0,
        device=CPU,
        progress=False,
    )
    # Slot-major, classes in chunks of batch_budget = 2: one image per class and slot.
    assert seen == [[(0, 0), (1, 0)], [(2, 0), (3, 0)], [(0, 1), (1, 1)], [(2, 1), (3, 1)]]
    assert out.images.shape == (8, 3, 8, 8) and out.labels.dtype == torch.long
    assert out.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.isfinite(out.images).all()
    lo, hi = data.pixel_bounds()
    assert bool((out.images >= lo - 1e-6).all()) and bool((out.images <= hi + 1e-6).all())
    final = out.aux["synthesis"]
    assert torch.isfinite(torch.tensor(final["final_loss"]))
    assert set(final["final_components"]) == {"ce", "bn", "total"}


def test_sharded_class_chunks_equal_full_run() -> None:
    data = tiny_prepared(res=8)
    kwargs = dict(
        teacher=_teacher(data),
        data=data,
        ipc=2,
        config=_config(),
        seed=7,
        device=CPU,
        progress=False,
    )
    full = sre2l(classes=range(4), **kwargs)
    low, high = sre2l(classes=range(0, 2), **kwargs), sre2l(classes=range(2, 4), **kwargs)
    assert_close(full.images, torch.cat([low.images, high.images]))
    assert_close(full.labels, torch.cat([low.labels, high.labels]))
    with pytest.raises(ValueError, match="splits a batch group"):
        sre2l(classes=range(1, 3), **kwargs)


def test_needs_a_teacher_in_eval_mode() -> None:
    data = tiny_prepared(res=8)
    with pytest.raises(ValueError, match="eval mode"):
        sre2l(
            teacher=_teacher(data).train(),
            data=data,
            classes=range(4),
            ipc=1,
            config=_config(),
            seed=0,
            device=CPU,
            progress=False,
        )
