"""Tests of the model registry (wmdd.models.registry) and strict teacher checkpoints (wmdd.models.teacher)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import tiny_prepared
from torch import nn
from torch.testing import assert_close

from wmdd.config import ModelConfig
from wmdd.models.registry import ConvNet, count_parameters, create_model, list_models
from wmdd.models.teacher import load_teacher, save_teacher, teacher_checkpoint_info

# Small options per model so the full matrix stays fast on CPU.
# (resnet18's stride-1 "small" stem is 16x the compute of the imagenet stem: it is
# exercised separately at 16 px.)
SMALL_KWARGS = {
    "convnet": {"width": 8, "depth": 2},
    "resnet18": {"stem": "imagenet"},
    # timm zero-initialises each block's last BN scale, which blocks the gradient of the
    # block's other layers at init; switched off so the every-parameter invariant applies.
    "timm": {"model_name": "resnet18", "zero_init_last": False},
    "tiny_cnn": {"width": 4},
}
FEATURE_DIMS = {
    "convnet": lambda res: 8 * (res // 4) ** 2,
    "resnet18": lambda res: 512,
    "timm": lambda res: 512,
    "tiny_cnn": lambda res: 8,
}


def test_registry_contents() -> None:
    assert list_models() == sorted(list_models())
    assert {"convnet", "resnet18", "tiny_cnn"} <= set(list_models())
    assert set(list_models()) <= set(SMALL_KWARGS), "add new models to SMALL_KWARGS"


def test_unknown_model_lists_registered() -> None:
    with pytest.raises(
        ValueError, match=r"unknown model 'vgg11'; registered models: " + ", ".join(list_models())
    ):
        create_model("vgg11", num_classes=10, in_chans=3, resolution=32)


def test_bad_option_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"model 'convnet': bad options \{'widht': 3\}"):
        create_model("convnet", num_classes=10, in_chans=3, resolution=32, widht=3)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("resolution", [16, 32])
def test_forward_is_head_of_features(name, in_chans, resolution) -> None:
    torch.manual_seed(0)
    model = create_model(
        name, num_classes=5, in_chans=in_chans, resolution=resolution, **SMALL_KWARGS[name]
    ).eval()
    x = torch.randn(3, in_chans, resolution, resolution)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
        assert feats.shape == (3, FEATURE_DIMS[name](resolution))
        assert out.shape == (3, 5)
        assert_close(out, model.forward_head(feats))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_every_parameter_gets_a_finite_gradient(name) -> None:
    torch.manual_seed(0)
    model = create_model(
        name, num_classes=4, in_chans=3, resolution=16, **SMALL_KWARGS[name]
    ).train()
    x = torch.randn(4, 3, 16, 16)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_convnet_resolution_too_small() -> None:
    with pytest.raises(ValueError, match=r"convnet: resolution 4 is too small for depth 3"):
        create_model("convnet", num_classes=10, in_chans=3, resolution=4, depth=3)


def test_convnet_pooling_floors_odd_sides() -> None:
    """AvgPool2d(2) floors: 20 -> 10 -> 5 -> 2 at depth 3 (as the official code at 224 px)."""
    model = create_model("convnet", num_classes=10, in_chans=3, resolution=20, width=4, depth=3)
    assert model.num_features == 4 * 2 * 2
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 20, 20)).shape == (2, 16)


def test_convnet_structure_and_feature_size() -> None:
    model = create_model("convnet", num_classes=10, in_chans=3, resolution=32, width=16, depth=3)
    assert isinstance(model, ConvNet)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.AvgPool2d)]
    assert len(convs) == 3 and len(pools) == 3
    assert [c.in_channels for c in convs] == [3, 16, 16]
    assert model.num_features == 16 * 4 * 4
    assert model.classifier.in_features == 16 * 4 * 4 and model.classifier.out_features == 10


@pytest.mark.parametrize(
    ("norm", "layer"), [("instance", nn.GroupNorm), ("batch", nn.BatchNorm2d), ("none", None)]
)
def test_convnet_norm_variants(norm, layer) -> None:
    model = create_model(
        "convnet", num_classes=10, in_chans=1, resolution=16, width=12, depth=2, norm=norm
    )
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.GroupNorm | nn.BatchNorm2d | nn.LayerNorm | nn.InstanceNorm2d)
    ]
    if layer is None:
        assert norms == []
        assert sum(isinstance(m, nn.Identity) for m in model.modules()) == 2
        return
    assert len(norms) == 2 and all(type(m) is layer for m in norms)
    for m in norms:
        if layer is nn.GroupNorm:
            assert m.num_groups == m.num_channels == 12 and m.affine
        else:
            assert m.num_features == 12


def test_convnet_instance_norm_normalises_each_channel_of_each_image() -> None:
    """GroupNorm with one group per channel == instance norm (a per-image, per-channel
    standardisation; parity with torch's instance_norm)."""
    model = create_model(
        "convnet", num_classes=3, in_chans=3, resolution=8, width=4, depth=1, norm="instance"
    )
    conv, norm = model.features[0], model.features[1]
    x = torch.randn(2, 3, 8, 8)
    h = conv(x)
    assert_close(norm(h), nn.functional.instance_norm(h, eps=norm.eps))


def test_convnet_unknown_norm() -> None:
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        create_model("convnet", num_classes=10, in_chans=3, resolution=16, depth=2, norm="layer")


@pytest.mark.parametrize("in_chans", [1, 3])
def test_resnet18_stems(in_chans) -> None:
    imagenet = create_model("resnet18", num_classes=10, in_chans=in_chans, resolution=64)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    c = imagenet.conv1
    assert (c.in_channels, c.kernel_size, c.stride, c.padding) == (in_chans, (7, 7), (2, 2), (3, 3))
    small = create_model("resnet18", num_classes=10, in_chans=in_chans, resolution=32, stem="small")
    assert isinstance(small.maxpool, nn.Identity)
    c = small.conv1
    assert (c.in_channels, c.kernel_size, c.stride, c.padding) == (in_chans, (3, 3), (1, 1), (1, 1))
    assert c.bias is None
    s2 = create_model("resnet18", num_classes=10, in_chans=in_chans, resolution=64, stem="small_s2")
    assert isinstance(s2.maxpool, nn.Identity)
    assert (s2.conv1.kernel_size, s2.conv1.stride) == ((3, 3), (2, 2))


def test_resnet18_stem_spatial_sizes() -> None:
    """Stem output side: 32 px -> 8 (imagenet: /2 conv, /2 pool), 32 (small), 16 (small_s2)."""
    x = torch.randn(2, 3, 32, 32)
    for stem, side in [("imagenet", 8), ("small", 32), ("small_s2", 16)]:
        m = create_model("resnet18", num_classes=10, in_chans=3, resolution=32, stem=stem)
        with torch.no_grad():
            h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        assert h.shape[-2:] == (side, side), stem


def test_resnet18_unknown_stem() -> None:
    with pytest.raises(ValueError, match="unknown stem 'tiny'"):
        create_model("resnet18", num_classes=10, in_chans=3, resolution=32, stem="tiny")


@pytest.mark.parametrize("num_classes", [1000])
def test_resnet18_imagenet_stem_loads_torchvision_state_dict_strictly(num_classes) -> None:
    reference = torchvision.models.resnet18(num_classes=num_classes)  # random init, no download
    model = create_model("resnet18", num_classes=num_classes, in_chans=3, resolution=224)
    ref_sd = reference.state_dict()
    assert list(model.state_dict()) == list(ref_sd)
    for k, v in model.state_dict().items():
        assert v.shape == ref_sd[k].shape, k
    model.load_state_dict(ref_sd, strict=True)
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), reference(x))  # parity with torchvision's own forward
    assert count_parameters(model) == count_parameters(reference)


@pytest.mark.parametrize("stem", ["small", "small_s2"])
@pytest.mark.parametrize("resolution", [16, 32])
def test_resnet18_small_stems_forward_and_keys(stem, resolution) -> None:
    torch.manual_seed(0)
    model = create_model(
        "resnet18", num_classes=10, in_chans=1, resolution=resolution, stem=stem
    ).eval()
    x = torch.randn(2, 1, resolution, resolution)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 512)
        assert_close(model(x), model.forward_head(feats))
    assert list(model.state_dict()) == list(
        torchvision.models.resnet18(num_classes=10).state_dict()
    )


# -- teacher checkpoints -----------------------------------------------------------------


def _teacher_and_data():
    data = tiny_prepared(num_classes=4, channels=3, res=16)
    cfg = ModelConfig("convnet", {"width": 8, "depth": 2, "norm": "batch"})
    torch.manual_seed(0)
    model = create_model(cfg.name, num_classes=4, in_chans=3, resolution=16, **cfg.kwargs)
    # Move the BN running statistics away from their defaults so buffers are checked too.
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 16, 16))
    return model.eval(), cfg, data


def test_save_load_teacher_round_trip(tmp_path) -> None:
    model, cfg, data = _teacher_and_data()
    path = tmp_path / "teacher.pt"
    save_teacher(model, path, model_cfg=cfg, data=data, extra={"val_top1": 12.5})
    loaded = load_teacher(path, device=torch.device("cpu"))
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    sd, loaded_sd = model.state_dict(), loaded.state_dict()
    assert list(sd) == list(loaded_sd)
    for k in sd:
        assert torch.equal(sd[k], loaded_sd[k]), k
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    info = teacher_checkpoint_info(path)
    assert info["model"] == {"name": "convnet", "kwargs": {"width": 8, "depth": 2, "norm": "batch"}}
    assert info["classes"] == data.classes and info["val_top1"] == 12.5
    assert (info["num_classes"], info["in_chans"], info["resolution"]) == (4, 3, 16)
    assert info["mean"] == list(data.mean) and "state_dict" not in info


def test_load_teacher_is_strict(tmp_path) -> None:
    model, cfg, data = _teacher_and_data()
    path = tmp_path / "teacher.pt"
    save_teacher(model, path, model_cfg=cfg, data=data, extra={})
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    sd["classifier.weights"] = sd.pop("classifier.weight")  # renamed key
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match=r"classifier\.weight"):
        load_teacher(path, device=torch.device("cpu"))


def test_load_teacher_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="teacher.pt"):
        load_teacher(tmp_path / "teacher.pt", device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("resnet18", {"stem": "imagenet"}), ("convnet", {"width": 8, "depth": 3, "norm": "batch"})],
)
def test_channels_last_setting_builds_nhwc_models_with_the_same_function(
    name: str, kwargs: dict
) -> None:
    from wmdd.utils import seeded_init as seeded
    from wmdd.utils import set_channels_last

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for enabled in (False, True):
        set_channels_last(enabled)
        try:
            with seeded(0):
                model = create_model(name, num_classes=5, in_chans=3, resolution=32, **kwargs)
        finally:
            set_channels_last(False)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == enabled
        assert conv.weight.is_contiguous() != enabled
        with torch.no_grad():
            outputs[enabled] = model.eval()(x)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-4, atol=1e-5)
