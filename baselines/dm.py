r"""Distribution Matching (DM; Zhao & Bilen, WACV 2023, arXiv 2110.04181).

DM learns the synthetic images :math:`S_c` of each class :math:`c` so that their mean embedding
matches the mean embedding of the class's real images :math:`T_c` under randomly initialised
networks :math:`\psi_\vartheta` and random differentiable siamese augmentations
:math:`\mathcal{A}_\omega` (DSA, one family and one parameter set per class and iteration,
shared by the real and the synthetic batch):

.. math::

    \min_S \; \mathbb{E}_{\vartheta, \omega} \sum_c \Big\|
        \frac{1}{|B_c|} \sum_{x \in B_c} \psi_\vartheta(\mathcal{A}_{\omega_c}(x)) -
        \frac{1}{k} \sum_{s \in S_c} \psi_\vartheta(\mathcal{A}_{\omega_c}(s)) \Big\|_2^2 ,

with :math:`B_c` a fresh random batch of ``real_per_class`` real images of class :math:`c`.
Each iteration draws a new embedder (the DC ConvNet, width 128, instance norm, ReLU, average
pooling; its flattened conv features), evaluates the loss summed over the classes and takes
ONE SGD step (lr 1; momentum 0.5) on the pixels; the official code raises the lr to 10 for
CIFAR-10 at IPC >= 100 only, which ``params.yaml`` reproduces with ``large_ipc: 100`` in the
CIFAR-10 profiles' overrides (``large_ipc: 0``, the default, never raises it). The synthetic
images start as ``k`` random real images per class (normalised space) and are never clamped,
as in the official code.

Why DM's images drift, and the optional fix: the embedder normalises each image's
activations (instance norm), so the loss barely depends on an image's scale and its
gradient is nearly orthogonal to the image; every SGD step then *grows* the image's norm
(Pythagoras). With many images per class the growth stays small, but at IPC 1 one image takes
a whole class's gradient, its pixels leave the valid range (about a fifth of the values on
Imagenette at 64 px) and a BatchNorm teacher, which is not scale-invariant, labels it as
noise. This is faithful to the official code and stays the default. ``renorm=True`` rescales
each image after every step back to the norm it started with (its real initialisation, in
the normalised space): it changes the path, not the loss, and keeps the images in the range
a BatchNorm teacher and student were trained on.

``feature_space="teacher"`` replaces the random embedder by the pretrained teacher's
``forward_features`` (the "MMD" ablation of WMDD, registered as ``dm_teacher``).

Departures from the official code (github VICO-UoE/DatasetCondensation, ``main_DM.py``):

* Randomness is derived from the seed and keyed per (iteration, class): the real batch
  (``"dm_real"``), the DSA draw (``"dm_dsa"``) and the class subset (``"dm_classes"``,
  iteration only); the embedder's initialisation is keyed by iteration only. Because the SGD
  update is elementwise, each class's images then depend only on that class, so a run over a
  class range equals the corresponding slice of a full run (sharding).
* Gradients are accumulated class by class (one backward per class) instead of one backward of
  the summed loss: the same gradient with memory bounded by one class's graph.
* The per-iteration real batch and the number of classes per iteration are parameters
  (``real_per_class``, ``classes_per_iteration``; what was used is logged in
  ``aux["used"]``), since 256 real images x 1000 classes per iteration is infeasible at 224 px.
  Classes outside an iteration's subset get a zero gradient (their momentum still decays).
* Embedder depth ``embed_depth=0`` means "by resolution": ``round(log2(res / 4))`` clamped to
  >= 1 (3 at 32 px, 4 at 64, 5 at 128, 6 at 224 where pooling floors 7 -> 3 px, as in the
  official code).
* Embedder norm is ``instance`` or ``none``; the official BN variant normalises one batch over
  all classes, which would couple the classes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wmdd.augment.dsa import DSAConfig, dsa, dsa_augment
from wmdd.checkpoint import Checkpointer, loop_state
from wmdd.config import Precision, check_ranges
from wmdd.data.prepared import TrainingImages
from wmdd.models.registry import create_model
from wmdd.synthetic_set import SyntheticSet
from wmdd.utils import autocast, derive_seed, generator, seeded_init

EmbedFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DMConfig:
    """Settings of DM (defaults: the paper's / official code's values)."""

    # SGD steps on the synthetic pixels (one joint step over all classes each).
    iterations: int = 20000
    # Pixel learning rate for ipc < large_ipc.
    lr: float = 1.0
    # Pixel learning rate for ipc >= large_ipc (the official code's CIFAR-10 IPC-100 setting).
    lr_large_ipc: float = 10.0
    # IPC from which lr_large_ipc is used; 0 = never (the official code uses 100 for CIFAR-10
    # only: params.yaml sets it in the CIFAR-10 profiles' overrides).
    large_ipc: int = 0
    # SGD momentum on the pixels.
    momentum: float = 0.5
    # Real images per class per iteration (capped by the class size).
    real_per_class: int = 256
    # Classes whose loss enters each iteration: 0 = all, else a seeded subset of this size.
    classes_per_iteration: int = 0
    # Width (channels) of the random ConvNet embedder.
    embed_width: int = 128
    # Depth of the embedder; 0 = by resolution (see embedder_depth).
    embed_depth: int = 0
    # Normalisation of the embedder: instance (GroupNorm(C, C), official) or none.
    embed_norm: Literal["instance", "none"] = "instance"
    # Apply differentiable siamese augmentation to the real and synthetic batches.
    dsa: bool = True
    # DSA strategy and magnitudes (used when dsa is true).
    dsa_config: DSAConfig = field(default_factory=DSAConfig)
    # Embedding: a fresh random ConvNet per iteration, or the pretrained teacher's features.
    feature_space: Literal["embedder", "teacher"] = "embedder"
    # Rescale every image to its initial norm after each step (off: the official code).
    renorm: bool = False
    # "fp32" (default, the official numerics) or "bf16": the embedder's forward on the real
    # and synthetic batches under bfloat16 autocast, the loss in float32 (opt-in; README
    # "Performance"); a bf16 set is its own report row, ``dm (bf16)``.
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        check_ranges(
            self,
            at_least={
                "iterations": 1,
                "real_per_class": 1,
                "embed_width": 1,
                "large_ipc": 0,
                "classes_per_iteration": 0,
                "embed_depth": 0,
            },
            positive=("lr", "lr_large_ipc"),
            unit_interval=("momentum",),
        )


# --------------------------------------------------------------------------------------
# Loss and embedder
# --------------------------------------------------------------------------------------


def dm_loss(embed_real_by_class: Sequence[Tensor], embed_syn_by_class: Sequence[Tensor]) -> Tensor:
    """Sum over classes of the squared distance between mean real and mean synthetic embeddings.

    .. math:: L = \\sum_c \\| \\bar e^{\\,real}_c - \\bar e^{\\,syn}_c \\|_2^2

    Args:
        embed_real_by_class: One (n_c, D) tensor of real embeddings per class.
        embed_syn_by_class: One (k_c, D) tensor of synthetic embeddings per class, same order.

    Returns:
        Scalar loss (differentiable with respect to both inputs).
    """
    if len(embed_real_by_class) != len(embed_syn_by_class) or not embed_real_by_class:
        raise ValueError("dm_loss needs one real and one synthetic embedding tensor per class")
    terms = [
        (real.mean(dim=0) - syn.mean(dim=0)).square().sum()  # scalar
        for real, syn in zip(embed_real_by_class, embed_syn_by_class, strict=True)
    ]
    return torch.stack(terms).sum()


def embedder_depth(resolution: int, depth: int = 0) -> int:
    """The embedder depth: ``depth`` if positive, else chosen from the resolution.

    Automatic depth is ``round(log2(resolution / 4))`` clamped to >= 1 (16 px -> 2, 32 -> 3,
    64 -> 4, 128 -> 5, 224 -> 6 as in the official code, whose pooling floors 7 -> 3 px).
    """
    if depth > 0:
        return depth
    return max(1, round(math.log2(resolution / 4)))


def make_embedder(
    data: TrainingImages, config: DMConfig, *, seed: int, iteration: int, device: torch.device
) -> nn.Module:
    """A freshly initialised, frozen ConvNet embedder for one iteration.

    Its initialisation is keyed by ``(seed, "embedder", iteration)`` only, so every class and
    every shard of a run sees the same network at a given iteration.
    """
    with seeded_init(derive_seed(seed, "embedder", iteration)):
        net = create_model(
            "convnet",
            num_classes=data.num_classes,
            in_chans=data.channels,
            resolution=data.resolution,
            width=config.embed_width,
            depth=embedder_depth(data.resolution, config.embed_depth),
            norm=config.embed_norm,
        )
    return net.to(device).requires_grad_(False)


def siamese_dsa(
    real: Tensor, syn: Tensor, *, generator: torch.Generator, config: DSAConfig
) -> tuple[Tensor, Tensor]:
    """Augments both batches with ONE family and ONE parameter set drawn from ``generator``.

    Args:
        real: (n, C, H, W) real images.
        syn: (k, C, H, W) synthetic images.

    Returns:
        ``(real_aug, syn_aug)`` with the shapes of the inputs.
    """
    real_aug, params = dsa(real, generator=generator, config=config, siamese=True)
    return real_aug, dsa_augment(syn, params)


# --------------------------------------------------------------------------------------
# Data access
# --------------------------------------------------------------------------------------


def pixel_lr(config: DMConfig, ipc: int) -> float:
    """The pixel learning rate at ``ipc``: ``lr_large_ipc`` from ``large_ipc`` on (never when
    ``large_ipc`` is 0), else ``lr``."""
    return config.lr_large_ipc if 0 < config.large_ipc <= ipc else config.lr


def _image_norms(x: Tensor) -> Tensor:
    """Per-image L2 norms of (N, C, H, W), shaped (N, 1, 1, 1)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1)[:, None, None, None]


def real_init(
    data: TrainingImages, classes: Sequence[int], ipc: int, *, seed: int, device: torch.device
) -> Tensor:
    """``ipc`` distinct random real images per class (normalised), ordered by (class, slot).

    Returns:
        (len(classes) * ipc, C, H, W) float tensor on ``device``.
    """
    images = []
    for c in classes:
        index = data.train_indices_of_class(c)  # (n_c,) train positions, dataset order
        pick = torch.randperm(len(index), generator=generator(seed, "dm_init", c))[:ipc]
        images.append(data.normalize(data.train_images(index[pick]).to(device)))
    return torch.cat(images)


class RealSampler:
    """Draws seeded random real batches of one class, keyed by (iteration, class)."""

    def __init__(self, data: TrainingImages, classes: Sequence[int], batch: int, seed: int) -> None:
        self._data = data
        self._seed = seed
        self._batch = batch
        # Dataset-order train positions of each class, computed once.
        self._index = {c: data.train_indices_of_class(c) for c in classes}

    def batch_size(self, c: int) -> int:
        return min(self._batch, len(self._index[c]))

    def __call__(self, c: int, iteration: int, device: torch.device) -> Tensor:
        """(min(batch, n_c), C, H, W) normalised real images of class ``c`` on ``device``."""
        index = self._index[c]
        g = generator(self._seed, "dm_real", iteration, c)
        pick = torch.randperm(len(index), generator=g)[: self._batch]
        return self._data.normalize(self._data.train_images(index[pick]).to(device))


def active_classes(num_classes: int, per_iteration: int, *, seed: int, iteration: int) -> set[int]:
    """Classes whose loss enters ``iteration``: all if ``per_iteration`` is 0 or covers them."""
    if per_iteration == 0 or per_iteration >= num_classes:
        return set(range(num_classes))
    g = generator(seed, "dm_classes", iteration)
    return set(torch.randperm(num_classes, generator=g)[:per_iteration].tolist())


# --------------------------------------------------------------------------------------
# The optimisation
# --------------------------------------------------------------------------------------


def _class_loss(
    embed: EmbedFn,
    real: Tensor,
    syn: Tensor,
    *,
    dsa_generator: torch.Generator | None,
    dsa_config: DSAConfig,
    precision: Precision = "fp32",
) -> Tensor:
    """DM loss of one class: real (n, C, H, W) vs synthetic (k, C, H, W).

    The augmentation runs in float32; under ``precision="bf16"`` the embedder's forwards run
    under autocast and the embeddings are cast back to float32 before the class means, so
    the loss and the pixels' gradient stay float32."""
    if dsa_generator is not None:
        real, syn = siamese_dsa(real, syn, generator=dsa_generator, config=dsa_config)
    with autocast(precision, real.device):
        with torch.no_grad():
            embed_real = embed(real)  # (n, D)
        embed_syn = embed(syn)  # (k, D)
    return dm_loss([embed_real.float()], [embed_syn.float()])


def dm_iteration(
    syn: Tensor,
    *,
    embed: EmbedFn,
    sampler: RealSampler,
    classes: Sequence[int],
    active: set[int],
    ipc: int,
    iteration: int,
    config: DMConfig,
    seed: int,
) -> float:
    """Accumulates the gradient of one iteration's loss into ``syn.grad``; returns the loss.

    Args:
        syn: (len(classes) * ipc, C, H, W) leaf tensor, ordered by (class, slot).
    """
    total = syn.new_zeros(())
    for i, c in enumerate(classes):
        if c not in active:
            continue
        real = sampler(c, iteration, syn.device)  # (n, C, H, W)
        g = generator(seed, "dm_dsa", iteration, c) if config.dsa else None
        loss = _class_loss(
            embed,
            real,
            syn[i * ipc : (i + 1) * ipc],
            dsa_generator=g,
            dsa_config=config.dsa_config,
            precision=config.precision,
        )
        loss.backward()
        total = total + loss.detach()
    value = float(total)  # one device sync per iteration
    if not math.isfinite(value):
        raise FloatingPointError(f"DM: non-finite loss {value} at iteration {iteration}")
    return value


def _embed_fn(
    teacher: nn.Module | None,
    data: TrainingImages,
    config: DMConfig,
    *,
    seed: int,
    iteration: int,
    device: torch.device,
) -> EmbedFn:
    """The embedding of ``iteration``: the teacher's features or a fresh random ConvNet's."""
    if config.feature_space == "teacher":
        assert teacher is not None
        net = teacher
    else:
        net = make_embedder(data, config, seed=seed, iteration=iteration, device=device)
    return cast(EmbedFn, net.forward_features)  # every wmdd.models.registry model has it


def dm(
    *,
    teacher: nn.Module | None,
    data: TrainingImages,
    classes: Sequence[int],
    ipc: int,
    config: DMConfig,
    seed: int,
    device: torch.device,
    progress: bool = True,
    checkpoint: Checkpointer | None = None,
) -> SyntheticSet:
    """Distils ``ipc`` images per class of ``classes`` by distribution matching.

    Args:
        teacher: Pretrained teacher (eval, frozen); needed only for ``feature_space="teacher"``.
        data: The prepared dataset.
        classes: Classes to distil (any range gives that slice of a full run).
        ipc: Images per class.
        config: DM settings.
        seed: Base seed; all randomness derives from it.
        device: Where to optimise.
        checkpoint: Saves the pixels, the momentum buffer and the losses between iterations
            and resumes from them (every draw is keyed by the iteration, so a resumed run is
            identical).

    Returns:
        Images (len(classes) * ipc, C, H, W) in normalised space, ordered by (class, slot),
        with ``aux["used"]`` (effective settings), ``aux["loss"]`` (per-iteration loss over
        the run's classes) and ``aux["timings"]``.
    """
    if config.feature_space == "teacher" and teacher is None:
        raise ValueError("DM with feature_space='teacher' needs a teacher")
    data.check_ipc(classes, ipc)
    classes = list(classes)
    start = time.perf_counter()
    syn = real_init(data, classes, ipc, seed=seed, device=device).requires_grad_(True)
    sampler = RealSampler(data, classes, config.real_per_class, seed)
    lr = pixel_lr(config, ipc)
    norms = _image_norms(syn.detach()) if config.renorm else None  # (N, 1, 1, 1) initial
    optimizer = torch.optim.SGD([syn], lr=lr, momentum=config.momentum)
    init_seconds = time.perf_counter() - start
    losses: list[float] = []
    first = 0
    if checkpoint is not None and (state := checkpoint.load()) is not None:
        with torch.no_grad():
            syn.copy_(state["syn"])
        optimizer.load_state_dict(state["optimizer"])
        first, losses = state["iteration"], state["losses"]
    iterations = range(first, config.iterations)
    for it in tqdm(iterations, desc=f"DM ipc{ipc}", disable=not progress, initial=first):
        syn.grad = torch.zeros_like(syn)  # classes outside the subset step with zero gradient
        embed = _embed_fn(teacher, data, config, seed=seed, iteration=it, device=device)
        active = active_classes(
            data.num_classes, config.classes_per_iteration, seed=seed, iteration=it
        )
        losses.append(
            dm_iteration(
                syn,
                embed=embed,
                sampler=sampler,
                classes=classes,
                active=active,
                ipc=ipc,
                iteration=it,
                config=config,
                seed=seed,
            )
        )
        optimizer.step()
        if norms is not None:
            with torch.no_grad():
                syn.mul_(norms / _image_norms(syn).clamp_min(1e-12))
        if checkpoint is not None:

            def snapshot(done: int = it + 1) -> dict:
                where = f"iteration {done} of {config.iterations}"
                syn_now = syn.detach().cpu().clone()
                return loop_state(
                    where, optimizer=optimizer, syn=syn_now, iteration=done, losses=losses
                )

            checkpoint.step(snapshot)
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(ipc)  # (len(classes) * ipc,)
    used = {
        "real_per_class": config.real_per_class,
        "real_per_class_effective": sorted({sampler.batch_size(c) for c in classes}),
        "classes_per_iteration": min(config.classes_per_iteration, data.num_classes)
        or data.num_classes,
        "iterations": config.iterations,
        "embed_depth": embedder_depth(data.resolution, config.embed_depth)
        if config.feature_space == "embedder"
        else None,
        "lr": lr,
        "renorm": config.renorm,
        # recorded only when reduced: a float32 set's file stays what it was before the setting
        **({"precision": config.precision} if config.precision != "fp32" else {}),
    }
    timings = {"init": init_seconds, "optimise": time.perf_counter() - start - init_seconds}
    return SyntheticSet(
        syn.detach().cpu(),
        labels,
        aux={"used": used, "loss": torch.tensor(losses), "timings": timings},
    )
