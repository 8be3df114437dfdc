"""Model registry: ``create_model(name, *, num_classes, in_chans, resolution, **kwargs)``.

Every model built here exposes the same two-step interface, so feature-space methods
(WMDD, DM's teacher variant, herding) never special-case architectures:

* ``model.forward_features(x) -> (N, D)`` — the penultimate representation (global-average
  pooled for ResNets, flattened conv features for ConvNets);
* ``model.forward_head(f) -> (N, num_classes)`` — the linear classifier;
* ``model(x) == model.forward_head(model.forward_features(x))``.

Registered models:

* ``convnet`` — the DC/DM ConvNet: ``depth`` x [conv3x3(width) -> norm -> ReLU -> avgpool2],
  then a linear layer on the flattened features. ``norm`` is ``instance`` (GroupNorm with
  one group per channel, as in the official DM code), ``batch`` or ``none``.
* ``resnet18`` — torchvision's ResNet-18 (so torchvision checkpoints load strictly, key for
  key) with ``stem`` ``imagenet`` (7x7 stride 2 + max-pool), ``small`` (3x3 stride 1, no
  max-pool: the SRe2L convention for 32/64 px) or ``small_s2`` (3x3 stride 2, no max-pool:
  the WMDD paper's Tiny-ImageNet variant at 224 px).
* ``timm`` — any ``timm`` architecture by ``model_name`` (e.g. ``resnet18``), built with
  ``pretrained=False``; pretrained weights are loaded separately by
  :func:`wmdd.models.pretrained.load_pretrained` (spec ``timm:<model_name>``).
* ``tiny_cnn`` — a two-layer BN CNN for tests, registered like the real ones so tests run
  real code at toy size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torchvision
from torch import Tensor, nn

from wmdd.utils import channels_last

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(
    name: str, *, num_classes: int, in_chans: int, resolution: int, **kwargs
) -> nn.Module:
    """Builds a registered model with freshly initialised weights.

    Args:
        name: a registered model name (see :func:`list_models`).
        num_classes: size of the classifier output.
        in_chans: number of input channels.
        resolution: input side length in pixels (ConvNets size their classifier from it).
        **kwargs: architecture options of that model.

    The model's parameters are in the process's memory format
    (:func:`wmdd.utils.set_channels_last`).

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    try:
        model = _MODELS[name](
            num_classes=num_classes, in_chans=in_chans, resolution=resolution, **kwargs
        )
    except TypeError as err:
        raise ValueError(f"model {name!r}: bad options {kwargs}: {err}") from None
    layout = torch.channels_last if channels_last() else torch.contiguous_format
    return model.to(memory_format=layout)  # type: ignore[call-overload]


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; expected one of: instance, batch, none")


class ConvNet(nn.Module):
    """The ConvNet of the dataset-condensation lineage (Zhao et al.; Gidaris & Komodakis)."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        resolution: int,
        width: int = 128,
        depth: int = 3,
        norm: Literal["instance", "batch", "none"] = "instance",
    ) -> None:
        super().__init__()
        if resolution < 2**depth:
            raise ValueError(f"convnet: resolution {resolution} is too small for depth {depth}")
        layers: list[nn.Module] = []
        channels = in_chans
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                _norm_layer(norm, width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        side = resolution
        for _ in range(depth):
            side //= 2  # AvgPool2d(2) floors, as in the official code (224 px, depth 6 -> 3)
        self.num_features = width * side * side
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)  # (N, width * side * side)

    def forward_head(self, f: Tensor) -> Tensor:
        return self.classifier(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("convnet")
def _convnet(**kwargs) -> nn.Module:
    return ConvNet(**kwargs)


class ResNet(torchvision.models.ResNet):
    """torchvision's ResNet with the ``forward_features`` / ``forward_head`` interface.

    Parameter names are torchvision's, so torchvision checkpoints load with ``strict=True``.
    """

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)  # (N, 512)

    def forward_head(self, f: Tensor) -> Tensor:
        return self.fc(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("resnet18")
def _resnet18(
    *,
    num_classes: int,
    in_chans: int,
    resolution: int,
    stem: Literal["imagenet", "small", "small_s2"] = "imagenet",
) -> nn.Module:
    del resolution  # global pooling: any resolution works
    model = ResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    if stem == "imagenet" and in_chans == 3:
        return model
    if stem == "imagenet":
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    elif stem in ("small", "small_s2"):
        stride = 1 if stem == "small" else 2
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=stride, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        raise ValueError(f"resnet18: unknown stem {stem!r}; expected imagenet, small, small_s2")
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


class TimmModel(nn.Module):
    """A ``timm`` model with the ``forward_features`` / ``forward_head`` interface.

    timm's own ``forward_features`` returns the unpooled feature map; here it is followed by
    timm's ``forward_head(..., pre_logits=True)`` (global pooling, and for transformers the
    token pooling and final norm), so ``forward_features`` is the (N, D) input of the linear
    classifier and ``forward_head`` is that classifier alone. The timm module is ``self.net``:
    parameter names are timm's behind a ``net.`` prefix.

    Args:
        model_name: a timm model name, optionally with a pretrained tag
            (``resnet18``, ``resnet18.tv_in1k``); see ``timm.list_models()``.
        **timm_kwargs: passed on to ``timm.create_model`` (``drop_rate``, ``zero_init_last``,
            ``img_size`` for ViTs, ...).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        resolution: int,
        model_name: str,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        del resolution  # timm models take their input size from the data (or a kwarg)
        import timm  # imported here so that `import wmdd.models.registry` stays light

        if not timm.is_model(model_name):
            raise ValueError(
                f"timm: unknown model_name {model_name!r}; see timm.list_models() for the names"
            )
        self.model_name = model_name
        # Any: timm's models share forward_head / get_classifier without a typed base class.
        net: Any = timm.create_model(
            model_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **timm_kwargs
        )
        self.net = net
        self.num_features: int = getattr(net, "head_hidden_size", None) or net.num_features

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)  # (N, D)

    def forward_head(self, f: Tensor) -> Tensor:
        return self.net.get_classifier()(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("timm")
def _timm(**kwargs) -> nn.Module:
    return TimmModel(**kwargs)


class TinyCNN(nn.Module):
    """A two-block BN CNN, for tests: real code paths at toy size."""

    def __init__(self, *, num_classes: int, in_chans: int, resolution: int, width: int = 8):
        super().__init__()
        del resolution
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.num_features = 2 * width
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)  # (N, 2 * width)

    def forward_head(self, f: Tensor) -> Tensor:
        return self.classifier(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("tiny_cnn")
def _tiny_cnn(**kwargs) -> nn.Module:
    return TinyCNN(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
