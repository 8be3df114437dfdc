"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021).

DSA is the augmentation used by gradient/distribution-matching distillation (DC, DSA, DM,
arXiv 2110.04181) and by their hard-label evaluation protocol. Each call draws ONE
augmentation *family* from the strategy string (e.g. ``"color_crop_cutout_flip_scale_rotate"``)
and random parameters for it, then applies a transform that is differentiable with respect to
the images, so gradients reach the synthetic pixels.

*Siamese* means that the real and the synthetic batch are augmented with the same parameters.
In DM the two batches have different sizes (e.g. 256 real vs 10 synthetic images of a class),
so per-sample parameters cannot be paired one-to-one. Following the official code (which, when
a seed is given, overwrites every sample's parameters with the first sample's), a siamese draw
here is ONE parameter set that is broadcast to every image of every batch it is applied to::

    x_aug, params = dsa(x_real, generator=g)        # siamese by default: one parameter set
    y_aug = dsa_augment(y_syn, params)              # same transform, any batch size

A non-siamese draw (``siamese=False``, used when training a student on distilled data) holds
one parameter set per image and can only be applied to a batch of exactly that size.

Families and their transforms (``x`` of shape (N, C, H, W), ``m_c``/``m`` channel/image means):

* ``color``: brightness, saturation and contrast together, in this order:
  :math:`x \\leftarrow x + b`, :math:`x \\leftarrow (x - m_c)\\,s + m_c`,
  :math:`x \\leftarrow (x - m)\\,c + m`.
* ``crop``: integer translation by :math:`(\\Delta_r, \\Delta_c)` pixels with zero fill,
  :math:`y_{ij} = x_{i+\\Delta_r,\\, j+\\Delta_c}` (the official pad-and-crop).
* ``cutout``: a square of side ``round(ratio_cutout * side)`` set to zero.
* ``flip``: horizontal mirror with probability ``prob_flip``.
* ``scale``: affine sampling grid :math:`\\mathrm{diag}(s_x, s_y)`.
* ``rotate``: affine sampling grid :math:`[[\\cos\\theta, -\\sin\\theta], [\\sin\\theta,
  \\cos\\theta]]`.

Geometric families use ``affine_grid``/``grid_sample`` with ``align_corners=True``, bilinear
interpolation and zero padding, as in the official implementation. All randomness comes from an
explicit :class:`torch.Generator`; draws are made on the generator's device and then moved to
the images' device, so a CPU generator gives the same parameters whatever the image device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: Every augmentation family this module implements.
FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")

#: Parameter fields of :class:`DSAParams` that each family requires.
_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop",),
    "cutout": ("cutout",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}

#: Trailing shape (after the leading parameter-set dimension P) of each tensor field.
_FIELD_TRAILING_SHAPE: dict[str, tuple[int, ...]] = {
    "brightness": (),
    "saturation": (),
    "contrast": (),
    "crop": (2,),
    "cutout": (2,),
    "flip": (),
    "scale": (2,),
    "rotate": (),
}


@dataclass(frozen=True)
class DSAConfig:
    """Strategy and magnitudes of DSA (defaults: the official DatasetCondensation values)."""

    # '_'-joined families; each call draws one of them uniformly.
    strategy: str = "color_crop_cutout_flip_scale_rotate"
    # 'flip': probability that an image is mirrored horizontally.
    prob_flip: float = 0.5
    # 'scale': per-axis factor s ~ U[1/ratio_scale, ratio_scale].
    ratio_scale: float = 1.2
    # 'rotate': angle ~ U[-ratio_rotate, ratio_rotate] degrees.
    ratio_rotate: float = 15.0
    # 'crop': integer shift ~ U{-p, ..., p} with p = int(ratio_crop_pad * side + 0.5).
    ratio_crop_pad: float = 0.125
    # 'cutout': zeroed square of side int(ratio_cutout * side + 0.5).
    ratio_cutout: float = 0.5
    # 'color': additive brightness shift b = (u - 0.5) * brightness, u ~ U[0, 1).
    brightness: float = 1.0
    # 'color': saturation factor s = u * saturation, u ~ U[0, 1).
    saturation: float = 2.0
    # 'color': contrast factor c = u + contrast, u ~ U[0, 1).
    contrast: float = 0.5

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if not self.families or unknown:
            raise ValueError(
                f"DSA strategy {self.strategy!r}: unknown families {unknown}; "
                f"expected '_'-joined names from {FAMILIES}"
            )
        if not 0.0 <= self.prob_flip <= 1.0:
            raise ValueError(f"prob_flip must lie in [0, 1], got {self.prob_flip}")
        if self.ratio_scale < 1.0:
            raise ValueError(f"ratio_scale must be >= 1, got {self.ratio_scale}")
        for name in ("ratio_rotate", "ratio_crop_pad", "ratio_cutout", "brightness"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def families(self) -> tuple[str, ...]:
        """The families of :attr:`strategy`, in order (duplicates kept: they weight the draw)."""
        return tuple(f for f in self.strategy.split("_") if f)


#: The official defaults.
DEFAULT_DSA_CONFIG = DSAConfig()


@dataclass(frozen=True, eq=False)
class DSAParams:
    """The sampled parameters of one DSA call: one family and its random tensors.

    Every tensor field has a leading dimension ``P`` (the number of parameter sets). ``P == 1``
    is a shared (siamese) draw, broadcast to a batch of any size; ``P > 1`` holds one set per
    image and applies only to a batch of exactly ``P`` images. Only the fields of
    :attr:`family` are set; the others stay ``None``.
    """

    # Augmentation family: one of FAMILIES.
    family: str
    # (P,) 'color': additive brightness shift b.
    brightness: Tensor | None = None
    # (P,) 'color': factor s on the deviation from the per-pixel channel mean.
    saturation: Tensor | None = None
    # (P,) 'color': factor c on the deviation from the per-image mean.
    contrast: Tensor | None = None
    # (P, 2) 'crop': U[0, 1) draws mapped to integer (row, col) shifts by crop_shifts().
    crop: Tensor | None = None
    # (P, 2) 'cutout': U[0, 1) draws mapped to integer (row, col) centres by cutout_mask().
    cutout: Tensor | None = None
    # (P,) bool 'flip': True mirrors the image along its width.
    flip: Tensor | None = None
    # (P, 2) 'scale': (s_x, s_y) factors of the sampling grid (width, height).
    scale: Tensor | None = None
    # (P,) 'rotate': angle theta in radians of the sampling grid.
    rotate: Tensor | None = None
    # 'crop': maximal shift as a fraction of the side (turns draws into pixels).
    ratio_crop_pad: float = DEFAULT_DSA_CONFIG.ratio_crop_pad
    # 'cutout': side of the zeroed square as a fraction of the image side.
    ratio_cutout: float = DEFAULT_DSA_CONFIG.ratio_cutout

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown DSA family {self.family!r}; expected one of {FAMILIES}")
        missing = [name for name in _REQUIRED_FIELDS[self.family] if self._tensor(name) is None]
        if missing:
            raise ValueError(f"DSA family {self.family!r} needs parameter fields {missing}")
        sizes = set()
        for name, trailing in _FIELD_TRAILING_SHAPE.items():
            value = self._tensor(name)
            if value is None:
                continue
            if value.dim() != 1 + len(trailing) or tuple(value.shape[1:]) != trailing:
                raise ValueError(
                    f"DSA parameter {name!r} must have shape (P, *{trailing}), "
                    f"got {tuple(value.shape)}"
                )
            sizes.add(value.shape[0])
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"DSA parameter tensors need one common size P >= 1, got {sizes}")

    def _tensor(self, name: str) -> Tensor | None:
        return getattr(self, name)

    def require(self, name: str) -> Tensor:
        """The tensor field ``name``; raises ValueError if this draw does not have it."""
        value = self._tensor(name)
        if value is None:
            raise ValueError(f"DSA params of family {self.family!r} have no {name!r} field")
        return value

    @property
    def num_sets(self) -> int:
        """``P``: 1 for a shared (siamese) draw, else the batch size it was drawn for."""
        return int(self.require(_REQUIRED_FIELDS[self.family][0]).shape[0])

    @property
    def shared(self) -> bool:
        """Whether one parameter set is broadcast to every image (siamese)."""
        return self.num_sets == 1

    def to(self, device: torch.device | str) -> DSAParams:
        """Returns a copy with every tensor moved to ``device``."""
        moved: dict[str, Any] = {
            name: self.require(name).to(device)
            for name in _FIELD_TRAILING_SHAPE
            if self._tensor(name) is not None
        }
        return dataclasses.replace(self, **moved)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """U[0, 1) draws made on the generator's device, then moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def choose_family(config: DSAConfig, generator: torch.Generator) -> str:
    """Draws one family uniformly among ``config.families``."""
    families = config.families
    index = torch.randint(len(families), (1,), generator=generator, device=generator.device)
    return families[int(index.item())]


def sample_dsa_params(
    family: str,
    batch_size: int,
    *,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    config: DSAConfig = DEFAULT_DSA_CONFIG,
    siamese: bool,
) -> DSAParams:
    """Samples the parameters of one ``family`` for a batch.

    Args:
        family: One of :data:`FAMILIES` (it need not be in ``config.strategy``).
        batch_size: Number of images the per-sample draw is for (ignored when siamese).
        generator: The only source of randomness.
        device: Device of the returned tensors (default: the generator's device).
        config: Magnitudes of the augmentation.
        siamese: If True, draw ONE parameter set (``P = 1``), shared by every image of every
            batch it is applied to, whatever their sizes (real vs synthetic in DM). If False,
            draw ``P = batch_size`` independent sets, one per image.

    Returns:
        The parameters; apply them with :func:`dsa_augment`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown DSA family {family!r}; expected one of {FAMILIES}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p = 1 if siamese else batch_size
    dev = torch.device(device) if device is not None else generator.device
    draw = _SAMPLERS[family]
    fields = draw(p, generator, dev, config)
    return DSAParams(
        family=family,
        ratio_crop_pad=config.ratio_crop_pad,
        ratio_cutout=config.ratio_cutout,
        **fields,
    )


_Fields = dict[str, Tensor]
_Sampler = Callable[[int, torch.Generator, torch.device, DSAConfig], _Fields]


def _sample_color(p: int, g: torch.Generator, dev: torch.device, c: DSAConfig) -> _Fields:
    brightness = (_uniform((p,), g, dev) - 0.5) * c.brightness  # (P,)
    saturation = _uniform((p,), g, dev) * c.saturation  # (P,)
    contrast = _uniform((p,), g, dev) + c.contrast  # (P,)
    return {"brightness": brightness, "saturation": saturation, "contrast": contrast}


def _sample_crop(p: int, g: torch.Generator, dev: torch.device, c: DSAConfig) -> _Fields:
    return {"crop": _uniform((p, 2), g, dev)}  # (P, 2)


def _sample_cutout(p: int, g: torch.Generator, dev: torch.device, c: DSAConfig) -> _Fields:
    return {"cutout": _uniform((p, 2), g, dev)}  # (P, 2)


def _sample_flip(p: int, g: torch.Generator, dev: torch.device, c: DSAConfig) -> _Fields:
    return {"flip": _uniform((p,), g, dev) < c.prob_flip}  # (P,) bool


def _sample_scale(p: int, g: torch.Generator, dev: torch.device, c: DSAConfig) -> _Fields:
    low = 1.0 / c.ratio_scale
    return {"scale": _uniform((p, 2), g, dev) * (c.ratio_scale - low) + low}  # (P, 2)


def _sample_rotate(p: int, g: torch.Generator, dev: torch.device, c: DSAConfig) -> _Fields:
    max_angle = c.ratio_rotate / 180.0 * math.pi
    return {"rotate": (_uniform((p,), g, dev) - 0.5) * 2.0 * max_angle}  # (P,) radians


_SAMPLERS: dict[str, _Sampler] = {
    "color": _sample_color,
    "crop": _sample_crop,
    "cutout": _sample_cutout,
    "flip": _sample_flip,
    "scale": _sample_scale,
    "rotate": _sample_rotate,
}


# --------------------------------------------------------------------------------------
# Integer geometry of crop / cutout (depends on the image size, hence at application time)
# --------------------------------------------------------------------------------------


def _side_fraction(ratio: float, side: int) -> int:
    """``int(ratio * side + 0.5)``: the official rounding of a fraction of a side."""
    return int(ratio * side + 0.5)


def _uniform_to_int(u: Tensor, counts: Tensor) -> Tensor:
    """Maps U[0, 1) draws to U{0, ..., counts - 1} (broadcast over the last dim)."""
    counts = counts.to(u.device)
    k = torch.floor(u.double() * counts.double()).long()
    return torch.minimum(k, counts - 1)


def crop_shifts(params: DSAParams, height: int, width: int) -> Tensor:
    """Integer (row, col) shifts of a 'crop' draw for images of size ``height x width``.

    A draw :math:`u \\in [0, 1)` becomes :math:`\\Delta = \\lfloor u (2p + 1) \\rfloor - p`,
    uniform on :math:`\\{-p, \\dots, p\\}` with :math:`p = \\mathrm{int}(r\\,\\mathrm{side} +
    0.5)` and :math:`r` = ``params.ratio_crop_pad`` (as ``torch.randint(-p, p + 1)``).

    Returns:
        (P, 2) long tensor of (row, col) shifts.
    """
    draws = params.require("crop")  # (P, 2)
    pads = torch.tensor(
        [
            _side_fraction(params.ratio_crop_pad, height),
            _side_fraction(params.ratio_crop_pad, width),
        ]
    )  # (2,)
    return _uniform_to_int(draws, 2 * pads + 1) - pads.to(draws.device)


def cutout_mask(params: DSAParams, height: int, width: int) -> Tensor:
    """Boolean mask (True = zeroed) of a 'cutout' draw for ``height x width`` images.

    The square has side :math:`k = \\mathrm{int}(r\\,\\mathrm{side} + 0.5)` (per axis) with
    :math:`r` = ``params.ratio_cutout``; its centre :math:`c` is uniform on
    :math:`\\{0, \\dots, \\mathrm{side} - (k \\bmod 2)\\}` and it covers
    :math:`[c - \\lfloor k/2 \\rfloor, c - \\lfloor k/2 \\rfloor + k)` clipped to the image,
    as in the official code.

    Returns:
        (P, H, W) bool tensor.
    """
    draws = params.require("cutout")  # (P, 2)
    sizes = torch.tensor(
        [_side_fraction(params.ratio_cutout, height), _side_fraction(params.ratio_cutout, width)]
    )  # (2,)
    counts = torch.tensor([height, width]) + 1 - sizes % 2  # (2,)
    centres = _uniform_to_int(draws, counts)  # (P, 2)
    starts = centres - (sizes // 2).to(centres.device)  # (P, 2)
    stops = starts + sizes.to(centres.device)  # (P, 2)
    rows = torch.arange(height, device=centres.device)  # (H,)
    cols = torch.arange(width, device=centres.device)  # (W,)
    in_rows = (rows >= starts[:, :1]) & (rows < stops[:, :1])  # (P, H)
    in_cols = (cols >= starts[:, 1:]) & (cols < stops[:, 1:])  # (P, W)
    return in_rows[:, :, None] & in_cols[:, None, :]  # (P, H, W)


# --------------------------------------------------------------------------------------
# Application
# --------------------------------------------------------------------------------------


def _per_image(value: Tensor, x: Tensor) -> Tensor:
    """(P,) parameters as (P, 1, 1, 1) in ``x``'s dtype/device, broadcastable to ``x``."""
    return value.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """Resamples ``x`` (N, C, H, W) on the affine grid of ``theta`` (P, 2, 3)."""
    theta = theta.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 3)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _apply_color(x: Tensor, params: DSAParams) -> Tensor:
    x = x + _per_image(params.require("brightness"), x)
    channel_mean = x.mean(dim=1, keepdim=True)  # (N, 1, H, W)
    x = (x - channel_mean) * _per_image(params.require("saturation"), x) + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return (x - image_mean) * _per_image(params.require("contrast"), x) + image_mean


def _apply_crop(x: Tensor, params: DSAParams) -> Tensor:
    height, width = x.shape[-2:]
    shifts = crop_shifts(params, height, width).to(device=x.device, dtype=x.dtype)  # (P, 2)
    theta = torch.zeros(shifts.shape[0], 2, 3, device=x.device, dtype=x.dtype)  # (P, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2.0 * shifts[:, 1] / max(width - 1, 1)  # width (x) translation
    theta[:, 1, 2] = 2.0 * shifts[:, 0] / max(height - 1, 1)  # height (y) translation
    return _warp(x, theta)


def _apply_cutout(x: Tensor, params: DSAParams) -> Tensor:
    mask = cutout_mask(params, x.shape[-2], x.shape[-1]).to(x.device)  # (P, H, W)
    keep = (~mask).to(x.dtype).unsqueeze(1)  # (P, 1, H, W)
    return x * keep


def _apply_flip(x: Tensor, params: DSAParams) -> Tensor:
    flip = (
        params.require("flip").to(device=x.device, dtype=torch.bool).view(-1, 1, 1, 1)
    )  # (P, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def _apply_scale(x: Tensor, params: DSAParams) -> Tensor:
    scale = params.require("scale").to(device=x.device, dtype=x.dtype)  # (P, 2)
    theta = torch.zeros(scale.shape[0], 2, 3, device=x.device, dtype=x.dtype)  # (P, 2, 3)
    theta[:, 0, 0] = scale[:, 0]
    theta[:, 1, 1] = scale[:, 1]
    return _warp(x, theta)


def _apply_rotate(x: Tensor, params: DSAParams) -> Tensor:
    angle = params.require("rotate").to(device=x.device, dtype=x.dtype)  # (P,)
    cos, sin = torch.cos(angle), torch.sin(angle)
    row0 = torch.stack([cos, -sin, torch.zeros_like(angle)], dim=-1)  # (P, 3)
    row1 = torch.stack([sin, cos, torch.zeros_like(angle)], dim=-1)  # (P, 3)
    return _warp(x, torch.stack([row0, row1], dim=1))  # theta (P, 2, 3)


_APPLIERS: dict[str, Callable[[Tensor, DSAParams], Tensor]] = {
    "color": _apply_color,
    "crop": _apply_crop,
    "cutout": _apply_cutout,
    "flip": _apply_flip,
    "scale": _apply_scale,
    "rotate": _apply_rotate,
}


def dsa_augment(x: Tensor, params: DSAParams) -> Tensor:
    """Applies sampled DSA parameters to a batch, differentiably with respect to ``x``.

    Args:
        x: (N, C, H, W) images.
        params: Parameters from :func:`sample_dsa_params` / :func:`dsa`. A shared draw
            (``P = 1``) applies to any ``N``; a per-sample draw needs ``N == P``.

    Returns:
        (N, C, H, W) augmented images, same dtype and device as ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"DSA expects images of shape (N, C, H, W), got {tuple(x.shape)}")
    if not params.shared and params.num_sets != x.shape[0]:
        raise ValueError(
            f"per-sample DSA params hold {params.num_sets} sets but the batch has "
            f"{x.shape[0]} images; sample with siamese=True to share one set across batches"
        )
    return _APPLIERS[params.family](x, params)


def dsa(
    x: Tensor,
    *,
    generator: torch.Generator | None = None,
    config: DSAConfig = DEFAULT_DSA_CONFIG,
    family: str | None = None,
    params: DSAParams | None = None,
    siamese: bool = True,
) -> tuple[Tensor, DSAParams]:
    """Augments a batch with one DSA family and returns the parameters used.

    With ``params`` given, they are applied as they are (nothing is drawn). Otherwise the
    family (``family`` or, if None, one drawn uniformly from ``config.families``) and its
    parameters are drawn from ``generator``. Apply the same transform to another batch with
    ``dsa_augment(y, params)``.

    Args:
        x: (N, C, H, W) images.
        generator: Source of randomness; required unless ``params`` is given.
        config: Strategy and magnitudes.
        family: Force this family instead of drawing one.
        params: Reuse these parameters instead of drawing new ones.
        siamese: Draw one shared parameter set (default, as DM's real/synthetic pairing) rather
            than one per image.

    Returns:
        ``(x_aug, params)`` with ``x_aug`` of shape (N, C, H, W).
    """
    if params is None:
        if generator is None:
            raise ValueError("dsa() needs a generator to draw parameters (or pass params=)")
        if family is None:
            family = choose_family(config, generator)
        params = sample_dsa_params(
            family,
            x.shape[0],
            generator=generator,
            device=x.device,
            config=config,
            siamese=siamese,
        )
    elif family is not None and family != params.family:
        raise ValueError(f"family={family!r} conflicts with params of family {params.family!r}")
    return dsa_augment(x, params), params
