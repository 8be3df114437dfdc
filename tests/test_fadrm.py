"""Tests of FADRM (``baselines.fadrm``) and the loop's cosine window it runs its stages on:
the patch start, the residual merge between resolution stages, one cosine over all stages,
class shards and input errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import tiny_prepared, tiny_teacher
from torch import Tensor
from torch.testing import assert_close

from baselines.fadrm import FADRMConfig, fadrm, resize
from baselines.rded import RDEDConfig, rded_class
from wmdd.synthesis.loop import SynthesisConfig, slot_batches, synthesize

CPU = torch.device("cpu")


def _config(**synthesis) -> FADRMConfig:
    loop = dict(iterations=3, batch_budget=2, crop_scale=(0.5, 1.0), jitter=(-1, 1))
    return FADRMConfig(
        synthesis=SynthesisConfig(**{**loop, **synthesis}),
        r_bn=0.01,
        stage_sizes=(4, 8, 8),
        patches=RDEDConfig(candidates=12, crops=2, factor=2),
    )


def _data_and_teacher():
    data = tiny_prepared(res=8, per_class=12)
    return data, tiny_teacher(res=8, calibrate=data.normalize(data.train_x))


def test_stages_merge_the_resized_images_with_the_patches() -> None:
    # With a vanishing learning rate the optimiser barely moves the images, so the set is the
    # merges alone: x0 = p at 4 px; x1 = a up(x0) + (1 - a) p; x2 = a x1 + (1 - a) p (8 px).
    data, teacher = _data_and_teacher()
    config = dataclasses.replace(_config(lr=1e-12), merge=0.25)
    out = fadrm(teacher=teacher, data=data, classes=range(4), ipc=1, config=config, seed=3,
                device=CPU, progress=False)  # fmt: skip
    p = out.aux["patches"]
    patches = [rded_class(teacher, data, c, 1, config.patches, 3, CPU, window="median")[0]
               for c in range(4)]  # fmt: skip
    assert_close(p, torch.cat(patches))
    x1 = 0.25 * resize(resize(p, 4), 8) + 0.75 * p
    x2 = 0.25 * x1 + 0.75 * p
    assert_close(out.images, x2, atol=1e-6, rtol=0)
    assert not torch.allclose(out.images, p, atol=1e-3)  # the 4 px stage left its mark
    assert out.labels.tolist() == [0, 1, 2, 3]
    assert out.aux["train_indices"].shape == (4, 4)  # one source per patch
    curves = out.aux["synthesis"]["curve_sum"]
    assert curves.shape[0] == 3 * 3 and out.aux["synthesis"]["iterations"] == 9


def test_median_and_best_windows_start_from_different_patches() -> None:
    data, teacher = _data_and_teacher()
    config = _config(lr=1e-12)
    kwargs = dict(teacher=teacher, data=data, classes=range(2), ipc=1, seed=0, device=CPU,
                  progress=False)  # fmt: skip
    median = fadrm(config=config, **kwargs)
    best = fadrm(config=dataclasses.replace(config, patch_window="best"), **kwargs)
    rded_best = rded_class(teacher, data, 0, 1, config.patches, 0, CPU)[0]
    assert_close(best.aux["patches"][:1], rded_best)
    assert not torch.equal(median.aux["patches"], best.aux["patches"])


def _first_step_size(window: tuple[int, int] | None, total_iterations: int = 1) -> float:
    """The largest pixel change of one Adam step (Adam's first step is lr_t * sign(grad))."""
    x0 = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))

    def loss_fn(x: Tensor, batch) -> tuple[Tensor, dict[str, float]]:
        del batch
        loss = (x * torch.linspace(1, 2, x.numel()).view_as(x)).sum()
        return loss, {"lin": float(loss.detach())}

    cfg = SynthesisConfig(iterations=total_iterations, lr=0.1, flip=False, jitter=(0, 0),
                          crop_scale=(1.0, 1.0), init="real")  # fmt: skip
    images, _, _ = synthesize(
        batches=slot_batches(range(2), 1, 2), loss_fn=loss_fn, cfg=cfg, seed=0,
        shape=(1, 6, 6), pixel_bounds=(torch.full((1, 1, 1, 1), -99.0),
                                       torch.full((1, 1, 1, 1), 99.0)),
        device=CPU, real_init=lambda c, s: x0[c], progress=False, cosine_window=window,
    )  # fmt: skip
    return float((images - x0).abs().max())


def test_cosine_window_sets_each_stages_learning_rate_on_one_schedule() -> None:
    assert _first_step_size(None) == pytest.approx(0.1, rel=1e-4)  # step 0 of 1: lr
    assert _first_step_size((0, 4)) == pytest.approx(0.1, rel=1e-4)
    assert _first_step_size((2, 4)) == pytest.approx(0.05, rel=1e-4)  # half way: lr / 2
    assert _first_step_size((3, 4)) == pytest.approx(0.1 * 0.1464466, rel=1e-4)
    with pytest.raises(ValueError, match="cosine_window"):
        _first_step_size((4, 4))


def test_class_ranges_on_batch_boundaries_equal_the_full_run() -> None:
    data, teacher = _data_and_teacher()
    kwargs = dict(teacher=teacher, data=data, ipc=2, config=_config(), seed=1, device=CPU,
                  progress=False)  # fmt: skip
    full = fadrm(classes=range(4), **kwargs)
    low, high = fadrm(classes=range(2), **kwargs), fadrm(classes=range(2, 4), **kwargs)
    assert_close(full.images, torch.cat([low.images, high.images]))
    lo, hi = data.pixel_bounds()
    assert ((full.images >= lo - 1e-6) & (full.images <= hi + 1e-6)).all()


def test_inputs_it_cannot_use_are_errors_naming_the_setting() -> None:
    data, teacher = _data_and_teacher()
    kwargs = dict(data=data, classes=range(2), ipc=1, seed=0, device=CPU, progress=False)
    with pytest.raises(ValueError, match="stage_sizes: the last stage must run at .* 8"):
        fadrm(teacher=teacher, config=dataclasses.replace(_config(), stage_sizes=(8, 4)), **kwargs)
    with pytest.raises(ValueError, match="eval mode"):
        fadrm(teacher=teacher.train(), config=_config(), **kwargs)
    with pytest.raises(ValueError, match="stage_sizes: expected positive ints"):
        dataclasses.replace(_config(), stage_sizes=())
    with pytest.raises(ValueError, match="merge"):
        dataclasses.replace(_config(), merge=1.5)
    with pytest.raises(ValueError, match="synthesis.init"):
        FADRMConfig(synthesis=SynthesisConfig(init="real"))
