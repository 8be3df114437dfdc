r"""BatchNorm input statistics: hook-based recorder, per-class and global targets.

For every ``nn.BatchNorm2d`` layer :math:`l` (in ``model.modules()`` order) and class :math:`c`,
the per-class target is the mean and *biased* variance of the BN **input** :math:`z^{(l)}` over
all of the class's real images and all spatial positions:

.. math::

    \mu^{(l)}_c = \frac{1}{|S_c|} \sum_{(i,h,w) \in S_c} z^{(l)}_{i,:,h,w}, \qquad
    (\sigma^{(l)}_c)^2 = \frac{1}{|S_c|} \sum_{(i,h,w) \in S_c}
        \big(z^{(l)}_{i,:,h,w} - \mu^{(l)}_c\big)^2 ,

with :math:`S_c` all (image, row, column) triples of class :math:`c` (teacher in eval mode).

Pooling modes of :func:`per_class_bn_stats`:

* ``"exact"`` (default): the pooled statistics above, computed batch by batch and combined in
  float64 with Chan et al.'s parallel (Welford) update, so the result does not depend on the
  batch size.
* ``"batch_mean"`` (departure-reproducing option): the official WMDD code averages, over the
  class's batches of ``batch_size`` images, the per-batch means and per-batch biased variances,
  each batch weighted by its number of images (so a partial last batch counts for what it
  holds). Averaging within-batch variances drops the between-batch spread of the means, so it
  *underestimates* the pooled variance (law of total variance); the means are exact.

Statistics are read with forward hooks on stock ``nn.BatchNorm2d`` modules (subclasses such as
timm's ``BatchNormAct2d`` included); the model is never forked or patched.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

__all__ = [
    "BNInputRecorder",
    "BatchMeanPool",
    "ExactPool",
    "BNStats",
    "batch_channel_stats",
    "global_bn_loss",
    "global_bn_stats",
    "bn_layer_terms",
    "per_class_bn_stats",
]

Pooling = Literal["exact", "batch_mean"]


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """All ``nn.BatchNorm2d`` modules of ``model`` as (name, module), in ``modules()`` order.

    Raises:
        ValueError: If the model has no ``nn.BatchNorm2d`` layer.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise ValueError(
            f"model {type(model).__name__} has no nn.BatchNorm2d layer; BN statistics are undefined"
        )
    return layers


class BNInputRecorder:
    """Context manager that records the input of every ``nn.BatchNorm2d`` layer.

    On entry a forward hook is registered on each BN layer (order of ``model.modules()``) plus a
    forward pre-hook on ``model`` that clears the record at the start of each forward, so
    :attr:`inputs` always refers to the last forward through ``model``. The recorded tensors are
    the BN inputs themselves (**not detached**): statistics computed from them carry gradients
    back to the model input, which the synthesis loss relies on. If a layer is called several
    times in one forward, the last call wins. All hooks are removed on exit; the last record stays
    readable until :meth:`clear`.

    Example:
        >>> with BNInputRecorder(model) as rec:
        ...     model(x)
        ...     stats = [batch_channel_stats(z) for z in rec.inputs]

    Attributes:
        layers: Names (from ``named_modules``) of the hooked BN layers, in hook order.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._bns = _bn_layers(model)
        self.layers: list[str] = [name for name, _ in self._bns]
        self._inputs: list[Tensor | None] = [None] * len(self._bns)
        self._handles: list[RemovableHandle] = []

    def _make_hook(self, index: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            self._inputs[index] = args[0]

        return hook

    def __enter__(self) -> BNInputRecorder:
        if self._handles:
            raise RuntimeError("BNInputRecorder is already active (nested `with` on one recorder)")
        self.clear()
        self._handles.append(self._model.register_forward_pre_hook(lambda *_: self.clear()))
        for i, (_, bn) in enumerate(self._bns):
            self._handles.append(bn.register_forward_hook(self._make_hook(i)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def inputs(self) -> list[Tensor]:
        """BN inputs of the last forward, one (N, C_l, H_l, W_l) tensor per layer.

        Raises:
            RuntimeError: If some BN layer did not run since the last :meth:`clear`.
        """
        missing = [name for name, z in zip(self.layers, self._inputs, strict=True) if z is None]
        if missing:
            raise RuntimeError(f"no recorded input for BN layer(s) {missing}; run a forward first")
        return [z for z in self._inputs if z is not None]

    def clear(self) -> None:
        """Drop the recorded inputs (and the autograd graphs they keep alive)."""
        self._inputs = [None] * len(self._bns)


def batch_channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over (N, H, W); differentiable.

    Args:
        x: Activations, shape (N, C, H, W).

    Returns:
        ``(mean, var)``, each of shape (C,), with
        :math:`\\mathrm{var} = \\frac{1}{NHW}\\sum (x - \\mathrm{mean})^2` (as BN uses in training).
    """
    if x.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    # in float32 also for bfloat16 activations (synthesis precision "bf16"); no copy otherwise
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)  # (C,), (C,)
    return mean, var


@dataclass(frozen=True)
class BNStats:
    """Per-layer BN-input statistics targets.

    Attributes:
        layer_names: BN layer names, in ``model.modules()`` order.
        mean: One float32 tensor per layer, shape (R, channels_l): R = number of classes for
            per-class stats, R = 1 for global (running) stats.
        var: Same shapes as ``mean``; biased variances.
        pooling: Provenance: ``"exact"``, ``"batch_mean"`` or ``"running"``.
    """

    layer_names: tuple[str, ...]
    mean: list[Tensor]
    var: list[Tensor]
    pooling: str = "exact"

    def __post_init__(self) -> None:
        if not len(self.layer_names) == len(self.mean) == len(self.var):
            raise ValueError("layer_names, mean and var must have one entry per layer")
        rows = {m.shape[0] for m in self.mean}
        for name, m, v in zip(self.layer_names, self.mean, self.var, strict=True):
            if m.ndim != 2 or m.shape != v.shape:
                raise ValueError(f"layer {name}: mean/var must be equal (R, channels) tensors")
        if len(rows) > 1:
            raise ValueError(f"all layers must have the same number of rows, got {sorted(rows)}")

    @property
    def num_rows(self) -> int:
        """Number of rows R (classes, or 1 for global statistics)."""
        return int(self.mean[0].shape[0])

    def to(self, device: torch.device | str) -> BNStats:
        """Return a copy with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            mean=[m.to(device) for m in self.mean],
            var=[v.to(device) for v in self.var],
        )

    def state_dict(self) -> dict[str, Any]:
        """A plain dict of CPU tensors, lists and strings (loads with ``weights_only``)."""
        return {
            "layer_names": list(self.layer_names),
            "mean": [m.detach().cpu() for m in self.mean],
            "var": [v.detach().cpu() for v in self.var],
            "pooling": self.pooling,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BNStats:
        """Rebuild from :meth:`state_dict`."""
        return cls(
            layer_names=tuple(state["layer_names"]),
            mean=list(state["mean"]),
            var=list(state["var"]),
            pooling=str(state["pooling"]),
        )

    def save(self, path: str | Path) -> None:
        """Save :meth:`state_dict` with ``torch.save``."""
        torch.save(self.state_dict(), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> BNStats:
        """Load a file written by :meth:`save` (``torch.load(..., weights_only=True)``, CPU)."""
        return cls.from_state(torch.load(Path(path), map_location="cpu", weights_only=True))


class ExactPool:
    """Exact pooled mean/biased variance via Chan et al.'s parallel update, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None  # (C,)
        self.m2: Tensor | None = None  # (C,) sum of squared deviations

    def update(self, x: Tensor) -> None:
        """Add the batch ``x`` (N, C, H, W)."""
        mean_b, var_b = batch_channel_stats(x)
        self.add(mean_b, var_b, x.shape[0] * x.shape[2] * x.shape[3])

    def add(self, mean_b: Tensor, var_b: Tensor, n_b: int) -> None:
        """Add a batch of ``n_b`` values per channel given its mean and biased variance."""
        mean_b, var_b = mean_b.double(), var_b.double()
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, var_b * n_b
            return
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + var_b * n_b + delta.square() * (self.count * n_b / total)
        self.count = total

    def result(self) -> tuple[Tensor, Tensor]:
        assert self.mean is not None and self.m2 is not None
        return self.mean, (self.m2 / self.count).clamp_min(0.0)


class BatchMeanPool:
    """Official-code pooling: the average of per-batch means and biased variances, each batch
    weighted by its size (the mean is exact; the variance misses the between-batch spread)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean_sum: Tensor | float = 0.0
        self.var_sum: Tensor | float = 0.0

    def update(self, x: Tensor) -> None:
        """Add the batch ``x`` (N, C, H, W)."""
        mean_b, var_b = batch_channel_stats(x)
        self.add(mean_b, var_b, x.shape[0] * x.shape[2] * x.shape[3])

    def add(self, mean_b: Tensor, var_b: Tensor, n_b: int) -> None:
        """Add a batch's mean and biased variance over its ``n_b`` values per channel (its
        images x H x W: within a layer, proportional to its number of images)."""
        self.mean_sum = self.mean_sum + n_b * mean_b.double()
        self.var_sum = self.var_sum + n_b * var_b.double()
        self.count += n_b

    def result(self) -> tuple[Tensor, Tensor]:
        assert isinstance(self.mean_sum, Tensor) and isinstance(self.var_sum, Tensor)
        return self.mean_sum / self.count, self.var_sum / self.count


def _class_stats(
    model: nn.Module,
    recorder: BNInputRecorder,
    images: Tensor,
    *,
    batch_size: int,
    device: torch.device,
    pooling: Pooling,
) -> list[tuple[Tensor, Tensor]]:
    """Per-layer (mean, var) float64 stats of one class's images, batch by batch."""
    pool_cls = ExactPool if pooling == "exact" else BatchMeanPool
    pools = [pool_cls() for _ in recorder.layers]
    for start in range(0, images.shape[0], batch_size):
        model(images[start : start + batch_size].to(device))
        for pool, z in zip(pools, recorder.inputs, strict=True):
            pool.update(z)
    return [pool.result() for pool in pools]


def _check_per_class_args(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    batch_size: int,
    pooling: str,
) -> None:
    """Raise ``ValueError`` on invalid :func:`per_class_bn_stats` arguments."""
    if model.training:
        raise ValueError("per_class_bn_stats needs the model in eval mode: call model.eval() first")
    if pooling not in ("exact", "batch_mean"):
        raise ValueError(f"pooling must be 'exact' or 'batch_mean', got {pooling!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.ndim != 4 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            "expected images (N, C, H, W) and labels (N,), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {empty} have no images; their BN statistics are undefined")


def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU if it has neither)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def per_class_bn_stats(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    batch_size: int = 100,
    device: torch.device | str | None = None,
    pooling: Pooling = "exact",
    progress: bool = True,
) -> BNStats:
    """Per-class mean/biased variance of every ``nn.BatchNorm2d`` input (see module docstring).

    Images are grouped by class, kept in their original order within a class, and fed in batches
    of ``batch_size`` images of a *single* class (as the official code does), so that
    ``pooling="batch_mean"`` reproduces its average-of-batch-statistics exactly; ``"exact"`` is
    independent of the batching.

    Args:
        model: Teacher in eval mode (the caller's responsibility; checked).
        images: Already-normalised real images, shape (N, C, H, W), on any device.
        labels: Integer class labels in ``[0, num_classes)``, shape (N,).
        num_classes: Number of classes; every class must have at least one image.
        batch_size: Images per forward pass (within one class).
        device: Device the batches are moved to; defaults to the model's device.
        pooling: ``"exact"`` (pooled statistics, default) or ``"batch_mean"`` (official code's
            size-weighted mean of per-batch means/variances; underestimates the variance).
        progress: Show a tqdm progress bar over classes.

    Returns:
        :class:`BNStats` with per-layer float32 CPU ``mean``/``var`` of shape
        (num_classes, channels_l).

    Raises:
        ValueError: On a model in training mode, without BN layers, bad shapes/labels, an empty
            class, or an unknown ``pooling``.
    """
    _check_per_class_args(model, images, labels, num_classes, batch_size, pooling)
    dev = torch.device(device) if device is not None else _model_device(model)
    labels = labels.to(images.device)
    per_class: list[list[tuple[Tensor, Tensor]]] = []
    with BNInputRecorder(model) as recorder:
        for c in tqdm(range(num_classes), desc="per-class BN stats", disable=not progress):
            idx = torch.nonzero(labels == c).flatten()
            cls_stats = _class_stats(
                model, recorder, images[idx], batch_size=batch_size, device=dev, pooling=pooling
            )
            per_class.append(cls_stats)
        names = tuple(recorder.layers)
    means = [torch.stack([pc[i][0] for pc in per_class]).float().cpu() for i in range(len(names))]
    vars_ = [torch.stack([pc[i][1] for pc in per_class]).float().cpu() for i in range(len(names))]
    return BNStats(layer_names=names, mean=means, var=vars_, pooling=pooling)


#: Running statistics: a 1-row :class:`BNStats` or ``(means, vars)``, one (C_l,) tensor per layer.
RunningStats = BNStats | tuple[Sequence[Tensor], Sequence[Tensor]]


def _running_lists(running: RunningStats) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer (C_l,) running means and variances from either accepted form."""
    if isinstance(running, BNStats):
        if running.num_rows != 1:
            raise ValueError(
                f"whole-batch BN matching needs global (1-row) BN stats, got {running.num_rows} rows"
            )
        return [m[0] for m in running.mean], [v[0] for v in running.var]
    means, vars_ = running
    return list(means), list(vars_)


def bn_layer_terms(inputs: Sequence[Tensor], running: RunningStats) -> Tensor:
    """Per-layer :math:`\\lVert \\mu_l(X) - \\mu^{run}_l \\rVert_2 + \\lVert \\sigma^2_l(X) -
    \\sigma^{2,run}_l \\rVert_2`, statistics over the whole batch x H x W (biased variance).

    Args:
        inputs: Recorded BN inputs, one (b, C_l, H_l, W_l) tensor per layer.
        running: Running statistics of the same layers, in the same order.

    Returns:
        (L,) tensor of the unweighted per-layer terms (differentiable w.r.t. ``inputs``).
    """
    means, vars_ = _running_lists(running)
    if not len(inputs) == len(means) == len(vars_):
        raise ValueError(f"{len(inputs)} BN inputs but running stats for {len(means)} layers")
    terms = []
    for z, mu_run, var_run in zip(inputs, means, vars_, strict=True):
        mu, var = batch_channel_stats(z)  # (C_l,), (C_l,)
        mu_run, var_run = mu_run.to(mu), var_run.to(var)
        terms.append(
            torch.linalg.vector_norm(mu - mu_run) + torch.linalg.vector_norm(var - var_run)
        )
    return torch.stack(terms)  # (L,)


def global_bn_loss(
    inputs: Sequence[Tensor], running: RunningStats, first_multiplier: float = 10.0
) -> Tensor:
    """SRe2L's BN loss (also WMDD's ``bn_target="global"`` ablation):
    :math:`\\sum_l m_l (\\lVert \\mu_l(X) - \\mu^{run}_l \\rVert_2 + \\lVert \\sigma^2_l(X) -
    \\sigma^{2,run}_l \\rVert_2)` with :math:`m_1` = ``first_multiplier``, :math:`m_{l>1} = 1`.

    Args:
        inputs: Recorded BN inputs, one (b, C_l, H_l, W_l) tensor per layer, in
            ``model.modules()`` order (the first is the first BN layer).
        running: The teacher's running statistics of the same layers (see
            :func:`global_bn_stats`), or ``(means, vars)`` lists of (C_l,).
        first_multiplier: :math:`m_1`.

    Returns:
        Scalar loss (unweighted by r_bn).
    """
    terms = bn_layer_terms(inputs, running)  # (L,)
    weights = torch.ones_like(terms)
    weights[0] = first_multiplier
    return (weights * terms).sum()


def global_bn_stats(model: nn.Module) -> BNStats:
    """Running (dataset-level) BN statistics, for the "global BN" target ablation.

    Args:
        model: Model with ``nn.BatchNorm2d`` layers that track running statistics.

    Returns:
        :class:`BNStats` (``pooling="running"``) whose per-layer ``mean``/``var`` are detached
        float32 CPU copies of ``running_mean``/``running_var`` with shape (1, channels_l).

    Raises:
        ValueError: If the model has no BN layer or a BN layer has no running statistics.
    """
    names, means, vars_ = [], [], []
    for name, bn in _bn_layers(model):
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"BN layer {name} does not track running statistics")
        names.append(name)
        means.append(bn.running_mean.detach().float().cpu().clone().unsqueeze(0))  # (1, C_l)
        vars_.append(bn.running_var.detach().float().cpu().clone().unsqueeze(0))  # (1, C_l)
    return BNStats(layer_names=tuple(names), mean=means, var=vars_, pooling="running")
