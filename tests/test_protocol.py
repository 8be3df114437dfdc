"""Tests of the one relabel/evaluation protocol (wmdd.protocol.soft, wmdd.protocol.hard)."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
from helpers import tiny_prepared, tiny_teacher
from torch.testing import assert_close

from wmdd.config import HardProtocolConfig, ModelConfig, ProtocolConfig, SoftProtocolConfig
from wmdd.models.accuracy import split_validator
from wmdd.models.optim import weight_decay_groups
from wmdd.models.registry import create_model
from wmdd.protocol.hard import train_student_hard
from wmdd.protocol.plan import protocol_hash, protocol_plan, student_seed, view_seed
from wmdd.protocol.runner import build_student
from wmdd.protocol.soft import (
    OnlineLabels,
    StoredLabels,
    kd_loss,
    plan_epoch,
    train_student_soft,
)
from wmdd.utils import derive_seed

CPU = torch.device("cpu")
RES = 16
K = 4  # classes


def _cfg(**kw) -> SoftProtocolConfig:
    base = dict(
        student=ModelConfig("tiny_cnn", {"width": 4}),
        epochs=3,
        batch_size=4,
        crop_scale=(0.25, 1.0),
        flip=True,
        cutmix_alpha=1.0,
        temperature=4.0,
        eval_interval=1,
        eval_batch_size=16,
    )
    base.update(kw)
    return SoftProtocolConfig(**base)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    calibration = torch.randn(16, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    return tiny_teacher(K, 3, RES, width=4, calibrate=calibration)  # non-default BN stats


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, RES, RES, generator=torch.Generator().manual_seed(seed))


def _epochs(labels, images, epochs: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [list(labels.epoch(e, images)) for e in range(epochs)]


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for ea, eb in zip(a, b, strict=True):
        assert len(ea) == len(eb)
        for (va, ta), (vb, tb) in zip(ea, eb, strict=True):
            assert torch.equal(va, vb)
            assert torch.equal(ta, tb) and ta.dtype == tb.dtype


# -- stored == online --------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("label_dtype", ["float16", "float32"])
def test_stored_and_online_give_identical_views_and_targets(
    teacher, label_dtype, channels_last
) -> None:
    cfg = _cfg(label_dtype=label_dtype)
    images = _images(10)
    if channels_last:  # benchmark.channels_last: the teacher in NHWC, in both modes
        teacher = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    stored = StoredLabels.compute(teacher, images, cfg, seed=123, progress=False)
    online = OnlineLabels(teacher, cfg, seed=123)
    s, o = _epochs(stored, images, cfg.epochs), _epochs(online, images, cfg.epochs)
    _assert_same_batches(s, o)
    dtype = getattr(torch, label_dtype)
    for epoch in s:
        assert [len(v) for v, _ in epoch] == [4, 4, 2]
        for views, targets in epoch:
            assert views.shape[1:] == (3, RES, RES)
            assert targets.dtype == dtype and targets.shape == (len(views), K)
    # The targets are the teacher's logits on the views, rounded to the storage dtype.
    with torch.no_grad():
        views, targets = s[1][0]
        assert torch.equal(targets, teacher(views).to(dtype))


@pytest.mark.parametrize("mode", ["stored", "online"])
def test_relabelling_refuses_a_teacher_in_training_mode(mode: str) -> None:
    calibration = torch.randn(16, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    teacher = tiny_teacher(K, 3, RES, width=4, calibrate=calibration).train()
    running = [b.clone() for b in teacher.buffers()]
    with pytest.raises(ValueError, match="teacher in eval mode"):
        if mode == "stored":
            StoredLabels.compute(teacher, _images(8), _cfg(), seed=0, progress=False)
        else:
            _epochs(OnlineLabels(teacher, _cfg(), seed=0), _images(8), 1)
    # ... before a forward could overwrite the teacher's running statistics
    assert all(torch.equal(a, b) for a, b in zip(running, teacher.buffers(), strict=True))


def test_different_seed_gives_different_views(teacher) -> None:
    cfg = _cfg()
    images = _images(10)
    a = _epochs(OnlineLabels(teacher, cfg, seed=1), images, 1)[0]
    b = _epochs(OnlineLabels(teacher, cfg, seed=2), images, 1)[0]
    assert not all(torch.equal(va, vb) for (va, _), (vb, _) in zip(a, b, strict=True))
    # ... and the epochs of one seed differ from each other.
    e0, e1 = _epochs(OnlineLabels(teacher, cfg, seed=1), images, 2)
    assert not torch.equal(e0[0][0], e1[0][0])


def test_stored_labels_save_load_round_trip(teacher, tmp_path) -> None:
    cfg = _cfg(epochs=2)
    images = _images(10)
    stored = StoredLabels.compute(teacher, images, cfg, seed=7, progress=False)
    path = tmp_path / "labels.pt"
    stored.save(path)
    loaded = StoredLabels.load(path)
    assert loaded.seed == 7 and loaded.batch_size == 4 and loaded.epochs == 2
    for name, value in stored.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert (
                torch.equal(getattr(loaded, name), value)
                and getattr(loaded, name).dtype == value.dtype
            ), name
    _assert_same_batches(_epochs(stored, images, 2), _epochs(loaded, images, 2))
    _assert_same_batches(
        _epochs(loaded, images, 2), _epochs(OnlineLabels(teacher, cfg, seed=7), images, 2)
    )


def test_stored_labels_layout_and_size(teacher) -> None:
    images = _images(10)
    s16 = StoredLabels.compute(teacher, images, _cfg(), seed=0, progress=False)
    s32 = StoredLabels.compute(teacher, images, _cfg(label_dtype="float32"), seed=0, progress=False)
    e, n, b = 3, 10, 3  # epochs, images, batches per epoch
    assert s16.order.shape == (e, n) and s16.boxes.shape == (e, n, 4)
    assert s16.flips.shape == (e, n) and s16.cutmix_perm.shape == (e, n)
    assert s16.cutmix_lam.shape == (e, b) and s16.cutmix_box.shape == (e, b, 4)
    assert s16.logits.shape == (e, n, K) and s16.logits.dtype == torch.float16
    assert s32.nbytes() - s16.nbytes() == e * n * K * (4 - 2)
    expected = sum(
        t.numel() * t.element_size()
        for t in (
            s16.order,
            s16.boxes,
            s16.flips,
            s16.cutmix_lam,
            s16.cutmix_box,
            s16.cutmix_perm,
            s16.logits,
        )
    )
    assert s16.nbytes() == expected


def test_batch_size_is_min_of_setting_and_set_size(teacher) -> None:
    cfg = _cfg(batch_size=100)
    images = _images(10)
    stored = StoredLabels.compute(teacher, images, cfg, seed=0, progress=False)
    assert stored.batch_size == 10
    for epoch in _epochs(stored, images, cfg.epochs):
        assert [len(v) for v, _ in epoch] == [10]
    assert [len(p.indices) for p in plan_epoch(10, RES, cfg, seed=0, epoch=0)] == [10]
    plans = plan_epoch(10, RES, _cfg(batch_size=3), seed=0, epoch=0)
    assert [len(p.indices) for p in plans] == [3, 3, 3, 1]


def test_every_image_once_per_epoch(teacher) -> None:
    cfg = _cfg(epochs=4, batch_size=3)
    stored = StoredLabels.compute(teacher, _images(11), cfg, seed=5, progress=False)
    for e in range(4):
        assert sorted(stored.order[e].tolist()) == list(range(11))
        plans = plan_epoch(11, RES, cfg, seed=5, epoch=e)
        assert torch.equal(torch.cat([p.indices for p in plans]), stored.order[e])
        for p in plans:  # CutMix permutes within its own batch
            assert sorted(p.cutmix.perm.tolist()) == list(range(len(p.indices)))
    assert not torch.equal(stored.order[0], stored.order[1])


def test_plan_respects_flip_and_crop_settings() -> None:
    for p in plan_epoch(12, RES, _cfg(flip=False), seed=0, epoch=0):
        assert not p.flips.any()
    flips = torch.cat([p.flips for p in plan_epoch(200, RES, _cfg(), seed=0, epoch=0)])
    assert 50 < int(flips.sum()) < 150
    plans = plan_epoch(12, RES, _cfg(crop_scale=(1.0, 1.0)), seed=0, epoch=0)
    for p in plans:  # area fraction 1 of a square image: only the full image fits
        assert torch.equal(p.boxes, torch.tensor([[0, 0, RES, RES]] * len(p.indices)))


# -- loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("t2_factor", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_kd_loss_matches_hand_computation(temperature, t2_factor) -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 3
    p_t = torch.softmax(t / temperature, dim=1)
    p_s = torch.softmax(s / temperature, dim=1)
    expected = (p_t * (p_t / p_s).log()).sum(dim=1).mean()
    if t2_factor:
        expected = expected * temperature**2
    assert_close(kd_loss(s, t, temperature, t2_factor), expected.float(), check_dtype=False)


def test_kd_loss_zero_iff_same_logits_and_fp16_targets() -> None:
    s = torch.randn(4, 3)
    assert_close(kd_loss(s, s + 5.0, 2.0), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert kd_loss(s, torch.zeros(4, 3), 2.0) > 0
    loss = kd_loss(s, s.half(), 20.0)  # fp16 stored targets are upcast
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# -- student training --------------------------------------------------------------------


def _train_soft(
    teacher, mode: str, *, seed: int = 11, label_dtype: str = "float16", precision: str = "fp32"
):
    data = tiny_prepared(num_classes=K, per_class=5, channels=3, res=RES, seed=1)
    images = data.normalize(data.train_x)  # (20, 3, 16, 16)
    cfg = _cfg(label_dtype=label_dtype, relabel_mode=mode, batch_size=8, precision=precision)
    if mode == "stored":
        labels = StoredLabels.compute(teacher, images, cfg, seed=seed, progress=False)
    else:
        labels = OnlineLabels(teacher, cfg, seed=seed)
    student = build_student(cfg.student, num_classes=K, in_chans=3, resolution=RES, seed=3)
    result = train_student_soft(
        student=student,
        labels=labels,
        images=images,
        validate=split_validator(data, device=CPU),
        cfg=cfg,
        device=CPU,
        progress=False,
    )
    return student, result


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_student_soft_stored_equals_online(teacher, precision: str) -> None:
    """In every precision mode: the teacher's labels are float32 outputs either way."""
    s_model, s_result = _train_soft(teacher, "stored", precision=precision)
    o_model, o_result = _train_soft(teacher, "online", precision=precision)
    assert s_result == o_result
    s_sd, o_sd = s_model.state_dict(), o_model.state_dict()
    for k in s_sd:
        assert torch.equal(s_sd[k], o_sd[k]), k
    # Training did something: the weights left their (shared) initialisation.
    init = build_student(_cfg().student, num_classes=K, in_chans=3, resolution=RES, seed=3)
    assert not torch.equal(init.state_dict()["classifier.weight"], s_sd["classifier.weight"])


def test_train_student_soft_result(teacher) -> None:
    _, result = _train_soft(teacher, "online", label_dtype="float32")
    assert set(result) == {"top1", "top5", "best_top1", "best_epoch", "history"}
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    for h in result["history"]:
        assert set(h) == {"epoch", "loss", "top1", "top5"}
        assert 0.0 <= h["top1"] <= h["top5"] <= 100.0 and h["loss"] >= 0
    assert result["top1"] == result["history"][-1]["top1"]
    assert result["top5"] == result["history"][-1]["top5"]
    best = max(result["history"], key=lambda h: h["top1"])
    assert (result["best_top1"], result["best_epoch"]) == (best["top1"], best["epoch"])
    # 12 validation images: accuracies are multiples of 100 / 12.
    assert result["top1"] * 12 / 100 == pytest.approx(round(result["top1"] * 12 / 100))


def test_build_student_is_seeded_and_leaves_global_rng_alone() -> None:
    cfg = ModelConfig("tiny_cnn", {"width": 4})
    state = torch.get_rng_state()
    a = build_student(cfg, num_classes=K, in_chans=3, resolution=RES, seed=1)
    b = build_student(cfg, num_classes=K, in_chans=3, resolution=RES, seed=1)
    c = build_student(cfg, num_classes=K, in_chans=3, resolution=RES, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_adamw_decays_only_matrices_and_kernels() -> None:
    model = create_model("tiny_cnn", num_classes=K, in_chans=3, resolution=RES, width=4)
    opt = torch.optim.AdamW(weight_decay_groups(model, 0.01), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_train_student_hard_runs() -> None:
    data = tiny_prepared(num_classes=K, per_class=5, channels=3, res=RES, seed=2)
    images = data.normalize(data.train_x)
    cfg = HardProtocolConfig(
        student=ModelConfig("convnet", {"width": 8, "depth": 2}),
        epochs=2,
        batch_size=8,
        eval_batch_size=16,
    )
    results, weights = [], []
    for _ in range(2):
        student = build_student(cfg.student, num_classes=K, in_chans=3, resolution=RES, seed=0)
        before = student.classifier.weight.detach().clone()
        result = train_student_hard(
            student=student,
            images=images,
            labels=data.train_y,
            validate=split_validator(data, device=CPU),
            cfg=cfg,
            seed=4,
            device=CPU,
            progress=False,
        )
        assert not torch.equal(before, student.classifier.weight)
        results.append(result)
        weights.append(student.classifier.weight.detach())
    result = results[0]
    assert set(result) == {"top1", "top5", "best_top1", "best_epoch", "history"}
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert result["best_epoch"] == 2 and result["best_top1"] == result["top1"]
    assert results[0] == results[1] and torch.equal(weights[0], weights[1])  # seeded


# -- seeds and hashes --------------------------------------------------------------------


def _protocol(**soft_kw) -> ProtocolConfig:
    hard = HardProtocolConfig(student=ModelConfig("convnet", {"width": 8}))
    return ProtocolConfig(kind="soft", soft=_cfg(**soft_kw), hard=hard)


def test_protocol_hash() -> None:
    base = protocol_hash(_protocol(), eval_seeds=(0, 1, 2), base_seed=0)
    assert base == protocol_hash(_protocol(), eval_seeds=[0, 1, 2], base_seed=0)
    assert base != protocol_hash(_protocol(temperature=5.0), eval_seeds=(0, 1, 2), base_seed=0)
    assert base != protocol_hash(_protocol(epochs=4), eval_seeds=(0, 1, 2), base_seed=0)
    student = ModelConfig("tiny_cnn", {"width": 8})
    assert base != protocol_hash(_protocol(student=student), eval_seeds=(0, 1, 2), base_seed=0)
    assert base != protocol_hash(_protocol(), eval_seeds=(0, 1, 3), base_seed=0)
    assert base != protocol_hash(_protocol(), eval_seeds=(0, 1), base_seed=0)
    assert base != protocol_hash(_protocol(), eval_seeds=(0, 1, 2), base_seed=1)
    hard = dataclasses.replace(_protocol(), kind="hard")
    assert base != protocol_hash(hard, eval_seeds=(0, 1, 2), base_seed=0)
    # The unselected protocol's settings are not part of the soft protocol.
    other_hard = dataclasses.replace(
        _protocol(), hard=HardProtocolConfig(student=ModelConfig("convnet", {"width": 16}))
    )
    assert base == protocol_hash(other_hard, eval_seeds=(0, 1, 2), base_seed=0)
    # The protocol can be named (both are evaluated): the hash is the named protocol's.
    assert base == protocol_hash(hard, eval_seeds=(0, 1, 2), base_seed=0, kind="soft")
    assert protocol_hash(hard, eval_seeds=(0, 1, 2), base_seed=0) == protocol_hash(
        _protocol(), eval_seeds=(0, 1, 2), base_seed=0, kind="hard"
    )
    # Nothing about a method can enter: the hash takes no method argument.
    assert set(inspect.signature(protocol_hash).parameters) == {
        "protocol",
        "eval_seeds",
        "base_seed",
        "kind",
    }


def test_relabel_and_student_seeds() -> None:
    assert set(inspect.signature(view_seed).parameters) == {
        "base_seed",
        "profile",
        "ipc",
        "eval_seed",
    }
    assert view_seed(0, "digits", 10, 1) == derive_seed(0, "digits", 10, "relabel", 1)
    seeds = {view_seed(0, "digits", 10, e) for e in range(5)}
    assert len(seeds) == 5
    assert view_seed(0, "digits", 10, 0) != view_seed(0, "digits", 1, 0)
    assert view_seed(0, "digits", 10, 0) != view_seed(1, "digits", 10, 0)
    assert view_seed(0, "digits", 10, 0) != view_seed(0, "cifar10", 10, 0)
    assert view_seed(0, "digits", 10, 0) != student_seed(0, "digits", 10, 0)
    assert 0 <= view_seed(0, "digits", 10, 0) < 2**63


def test_plan_decides_the_protocol_once() -> None:
    """Soft/stored, soft/online and hard plans: what each stage loads, and the seeds."""
    stored = protocol_plan(_protocol(), profile="digits", ipc=10, eval_seeds=(0, 2), base_seed=0)
    assert (stored.kind, stored.mode, stored.stores_labels) == ("soft", "stored", True)
    assert stored.relabel_needs_teacher and not stored.evaluate_needs_teacher
    assert [s.eval_seed for s in stored.seeds] == [0, 2]
    assert stored.seeds[1].view_seed == view_seed(0, "digits", 10, 2)
    assert stored.seeds[1].student_seed == student_seed(0, "digits", 10, 2)
    assert stored.hash == protocol_hash(_protocol(), eval_seeds=(0, 2), base_seed=0)
    online = protocol_plan(
        _protocol(relabel_mode="online"), profile="digits", ipc=10, eval_seeds=(0,), base_seed=0
    )
    assert (online.mode, online.stores_labels) == ("online", False)
    assert online.evaluate_needs_teacher and not online.relabel_needs_teacher
    hard_cfg = HardProtocolConfig(student=ModelConfig("convnet", {"width": 8, "depth": 2}))
    hard = protocol_plan(
        ProtocolConfig(kind="hard", soft=_protocol().soft, hard=hard_cfg),
        profile="digits",
        ipc=10,
        eval_seeds=(0,),
        base_seed=0,
    )
    assert (hard.mode, hard.stores_labels, hard.evaluate_needs_teacher) == (None, False, False)
    assert hard.hard is hard_cfg
    with pytest.raises(ValueError, match="not 'soft'"):
        _ = hard.soft
    params = hard.mlflow_params()
    assert params["protocol.kind"] == "hard" and params["protocol.epochs"] == hard_cfg.epochs
    assert not any(k.startswith("protocol.soft") or "temperature" in k for k in params)


def test_bf16_student_trains_differently_and_only_bf16_enters_the_protocol_hash(teacher) -> None:
    from wmdd.config import ProtocolConfig
    from wmdd.protocol.plan import protocol_hash

    fp32_model, _ = _train_soft(teacher, "stored")
    bf16_model, _ = _train_soft(teacher, "stored", precision="bf16")
    w32, w16 = fp32_model.state_dict(), bf16_model.state_dict()
    assert not torch.equal(w32["classifier.weight"], w16["classifier.weight"])  # autocast ran
    assert w16["classifier.weight"].dtype == torch.float32  # float32 master weights
    hashes = {
        p: protocol_hash(
            ProtocolConfig(kind="soft", soft=_cfg(precision=p)), eval_seeds=[0], base_seed=0
        )  # fmt: skip
        for p in ("fp32", "bf16")
    }
    assert hashes["fp32"] != hashes["bf16"]
    # fp32 is the protocol as it was before the setting existed: the same hash
    from wmdd.config import short_hash, to_dict

    before = to_dict(_cfg())
    del before["precision"], before["schedule_epochs"]
    assert hashes["fp32"] == short_hash(
        {"kind": "soft", "settings": before, "eval_seeds": [0], "base_seed": 0}
    )
