"""Typed, frozen configuration loaded from ``params.yaml`` (the single source of parameters).

``params.yaml`` is parsed into frozen dataclasses by :func:`from_dict`, which is strict:
an unknown key, a missing required key or a value of the wrong type raises
:class:`ConfigError` with the dotted key path and what was expected, e.g.::

    ConfigError: params.yaml: datasets.digits.teacher.epochs: expected int, got str 'ten'

Layout of ``params.yaml``::

    benchmark:   which dataset profiles, methods, IPCs and eval seeds the pipeline expands to
    datasets:    one *profile* per (dataset, budget): data source, teacher recipe, protocol
    methods:     one section per method (its own dataclass, see ``pipelines.registry``),
                 with optional per-profile ``overrides``

A *profile* (a key of ``datasets``) names one dataset at one budget, e.g. ``digits`` or
``imagenette_cpu``; it is the unit that paths, DVC stages and the report are keyed by.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


# Arithmetic precision of a training or synthesis loop: "fp32" (default, the published
# numerics) or "bf16" (torch.autocast to bfloat16 around the model's forward and the loss;
# opt-in, part of the method config or the protocol hash; README "Performance").
Precision = Literal["fp32", "bf16"]


class ConfigError(ValueError):
    """A parameter file does not match the expected schema."""


# --------------------------------------------------------------------------------------
# Strict dict -> dataclass conversion
# --------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Converts ``value`` to type ``tp`` or raises ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path=path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:  # Optional[X]: X's own error names the key and what was expected
            return _convert(value, non_none[0], path)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        expected = " or ".join(_type_name(a) for a in args)
        raise ConfigError(
            f"{path}: expected {expected}, got {_describe(value)} ({'; '.join(errors)})"
        )
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: expected one of {choices}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected a list of {len(args)}, got {len(value)} items")
            return tuple(
                _convert(v, a, f"{path}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        val_tp = args[1] if args else Any
        return {str(k): _convert(v, val_tp, _join(path, k)) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool (true/false), got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected float, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a programming error


def _join(path: str, key: Any) -> str:
    return f"{path} {key}" if path.endswith(":") else f"{path}.{key}"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type[T], data: Any, *, path: str) -> T:
    """Builds dataclass ``cls`` from a mapping, strictly.

    Args:
        cls: a (frozen) dataclass type.
        data: the mapping read from YAML.
        path: dotted key path used in error messages (e.g. ``"params.yaml: datasets.digits"``).

    Raises:
        ConfigError: on unknown keys, missing required keys or wrong types.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"expected keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a range check in the dataclass's __post_init__
        raise ConfigError(f"{path}: {err}") from None


def check_ranges(
    obj: Any,
    *,
    at_least: Mapping[str, int] | None = None,
    positive: Sequence[str] = (),
    non_negative: Sequence[str] = (),
    unit_interval: Sequence[str] = (),
    scales: Sequence[str] = (),
) -> None:
    """Raises ``ValueError("<field>: expected ..., got ...")`` for the first field of ``obj``
    out of its range; :func:`from_dict` prefixes the key path. Floats must also be finite
    (``.nan`` and ``.inf`` are refused)."""

    def fail(name: str, expected: str) -> None:
        raise ValueError(f"{name}: expected {expected}, got {getattr(obj, name)!r}")

    for name, low in (at_least or {}).items():
        if getattr(obj, name) < low:
            fail(name, f">= {low}")
    for name in positive:
        value = getattr(obj, name)
        if not (math.isfinite(value) and value > 0):
            fail(name, "a finite number > 0")
    for name in non_negative:
        value = getattr(obj, name)
        if not (math.isfinite(value) and value >= 0):
            fail(name, "a finite number >= 0")
    for name in unit_interval:
        if not 0 <= getattr(obj, name) < 1:
            fail(name, "a number in [0, 1)")
    for name in scales:
        lo, hi = getattr(obj, name)
        if not 0 < lo <= hi <= 1:
            fail(name, "[lo, hi] with 0 < lo <= hi <= 1")


def to_dict(obj: Any) -> Any:
    """Dataclass (or nested containers) -> plain JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def short_hash(obj: Any, length: int = 10) -> str:
    """A short, stable hash of a config (dataclass or plain data)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flattens nested config data into ``{"a.b.c": value}`` (for MLflow params)."""
    data = to_dict(obj)
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not data and prefix:
            out[prefix[:-1]] = "{}"
    else:
        out[prefix[:-1]] = data
    return out


# --------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    name: str  # a name registered with wmdd.models.registry.create_model
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the factory


@dataclass(frozen=True)
class DataConfig:
    name: str  # dataset registry name (wmdd.data.registry), e.g. "digits", "imagefolder"
    source: str = "builtin"  # "builtin", a local directory/archive path, or "download"
    resolution: int = 0  # side of the square images the pipeline works at; 0 = native
    val_fraction: float = 0.2  # for sources without a validation split (digits)
    split_seed: int = 0  # seed of the stratified train/val split when one is made
    skip_corrupt: bool = False  # skip unreadable images (counted) instead of failing
    workers: int = 0  # lazy datasets: decoding threads / loader processes (0 = min(8, cores))
    sha256: str = ""  # expected SHA-256 of an archive source ("" = not checked / known one)
    archive: str = ""  # source: download: which official archive ("" = dataset default)
    url: str = ""  # source: download: a mirror URL replacing the official one
    download_dir: str = "data/downloads"  # source: download: where archives are kept

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"resolution": 0, "workers": 0})
        if not 0 < self.val_fraction < 1:
            raise ValueError(
                f"val_fraction: expected a number in (0, 1), got {self.val_fraction!r}"
            )


@dataclass(frozen=True)
class TeacherConfig:
    model: ModelConfig  # teacher architecture
    epochs: int = 50  # training epochs
    batch_size: int = 32  # training batch size
    lr: float = 0.025  # SGD learning rate (cosine-decayed per step to 0)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale range
    flip: bool = True  # random horizontal flip during training
    # Pretrained weights instead of training (the recipe above is then unused):
    # "torchvision:resnet18.IMAGENET1K_V1" | "timm:<model name>" | "file:<path>" | "" (train).
    pretrained: str = ""
    pretrained_dir: str = ""  # where weight files are looked for ("" = torch hub's checkpoints)

    def __post_init__(self) -> None:
        check_ranges(
            self,
            at_least={"epochs": 1, "batch_size": 1},
            positive=("lr",),
            non_negative=("weight_decay",),
            unit_interval=("momentum",),
            scales=("crop_scale",),
        )


@dataclass(frozen=True)
class SoftProtocolConfig:
    """The soft-label relabel + evaluation protocol (primary; README "The protocol")."""

    student: ModelConfig  # the dataset's evaluation model, trained from scratch
    epochs: int = 300  # relabel/student epochs E
    batch_size: int = 100  # student batch size b; b = min(batch_size, N synthetic images)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale range
    flip: bool = True  # random horizontal flip per view
    cutmix_alpha: float = 1.0  # CutMix lambda ~ Beta(alpha, alpha)
    temperature: float = 20.0  # KD temperature T
    t2_factor: bool = False  # multiply the KD loss by T^2 (off in the published setting)
    lr: float = 1e-3  # AdamW learning rate (cosine per epoch to 0)
    weight_decay: float = 0.01  # AdamW weight decay, on parameters with ndim > 1 only
    # The cosine's length in epochs: 0 (default) = ``epochs``, the learning rate reaching 0 at
    # the last epoch; ``2 * epochs`` stops half-way down, at lr / 2 (a "half cosine", what a
    # schedule set for twice the epochs gives; the sensitivity panel's knob). Part of the
    # protocol hash unless 0.
    schedule_epochs: int = 0
    relabel_mode: Literal["stored", "online"] = "stored"  # precomputed or on-the-fly labels
    label_dtype: Literal["float16", "float32"] = "float16"  # soft-label precision (both modes)
    eval_interval: int = 1  # validate every this many epochs (and always at the last)
    eval_batch_size: int = 256  # batch size for validation
    # The student's forward and loss in "fp32" (default) or under bfloat16 autocast ("bf16",
    # opt-in). The teacher's soft labels are always float32 teacher outputs (both relabel
    # modes), and validation runs in float32. Part of the protocol hash unless "fp32".
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        check_ranges(
            self,
            at_least={
                "epochs": 1,
                "batch_size": 1,
                "eval_interval": 1,
                "eval_batch_size": 1,
                "schedule_epochs": 0,
            },  # fmt: skip
            positive=("lr", "cutmix_alpha", "temperature"),
            non_negative=("weight_decay",),
            scales=("crop_scale",),
        )
        if self.schedule_epochs and self.schedule_epochs < self.epochs:
            raise ValueError(
                f"schedule_epochs: expected 0 (the cosine over the epochs) or >= epochs "
                f"({self.epochs}, a cosine that does not rise again), got {self.schedule_epochs}"
            )


@dataclass(frozen=True)
class HardProtocolConfig:
    """The hard-label protocol of the DC/DSA/DM lineage (secondary; README "The protocol")."""

    student: ModelConfig  # a fresh ConvNet, depth by resolution
    epochs: int = 1000  # training epochs
    batch_size: int = 256  # batch size
    lr: float = 0.01  # SGD learning rate, x0.1 at the midpoint
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"  # DSA on every batch ("" = none)
    eval_batch_size: int = 256  # batch size for validation
    precision: Precision = "fp32"  # the student's forward and loss (as the soft protocol's)

    def __post_init__(self) -> None:
        check_ranges(
            self,
            at_least={"epochs": 1, "batch_size": 1, "eval_batch_size": 1},
            positive=("lr",),
            non_negative=("weight_decay",),
            unit_interval=("momentum",),
        )


@dataclass(frozen=True)
class ProtocolConfig:
    """Both protocols of a profile: every cell is evaluated under each (stages ``evaluate``
    and ``evaluate_hard``); ``kind`` is the headline, the other is shown beside it."""

    kind: Literal["soft", "hard"]  # the headline protocol of this profile's report
    soft: SoftProtocolConfig | None = None  # settings of the soft-label protocol
    hard: HardProtocolConfig | None = None  # settings of the hard-label protocol

    def settings(self, kind: str) -> SoftProtocolConfig | HardProtocolConfig:
        """The settings of protocol ``kind``; a ConfigError names the missing section."""
        chosen = {"soft": self.soft, "hard": self.hard}.get(kind)
        if chosen is None:
            raise ConfigError(f"protocol.{kind} is missing (every profile the pipeline runs is "
                              "evaluated under both the soft and the hard protocol)")  # fmt: skip
        return chosen

    def selected(self) -> SoftProtocolConfig | HardProtocolConfig:
        """The settings of the headline protocol."""
        return self.settings(self.kind)


@dataclass(frozen=True)
class ProfileConfig:
    """One dataset at one budget."""

    budget: str  # label shown in reports, e.g. "cpu" or "gpu (published)"
    data: DataConfig  # where the data comes from and how it is prepared
    teacher: TeacherConfig  # the teacher recipe
    protocol: ProtocolConfig  # the one relabel/eval protocol for every method


@dataclass(frozen=True)
class BenchmarkConfig:
    datasets: tuple[str, ...]  # profiles (keys of `datasets`) the pipeline expands to
    methods: tuple[str, ...]  # methods (keys of `methods`) the pipeline expands to
    ipcs: tuple[int, ...]  # images per class
    eval_seeds: tuple[int, ...]  # student seeds per distilled set
    # Distilled sets per cell of a method with randomness (init, draws): each is distilled
    # from its own seed and evaluated, so the report's spread includes the set's variance.
    # ``methods.<m>.sets`` overrides it per method (random: 5); deterministic methods
    # (herding) distil one set.
    sets: int = 1
    seed: int = 0  # base seed; all randomness derives from it
    experiment: str = "wmdd-benchmark"  # MLflow experiment name
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    # torch intra-op threads per stage process (0 = torch's default: one per core). CPU
    # kernels sum in an order that depends on it, so results are byte-identical only for
    # the same value; stages that compute depend on it (dvc.yaml).
    threads: int = 1
    # Every model (teacher, students, DM's embedders, synthesis) in the channels_last (NHWC)
    # memory format: faster convolutions and pooling on CPU (README "Performance"), the same
    # arithmetic summed in another order, so like ``threads`` it changes results at float32
    # rounding level and stages that compute depend on it. Off by default: the committed
    # results were computed without it.
    channels_last: bool = False

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"threads": 0, "sets": 1})


@dataclass(frozen=True)
class TeacherStatsConfig:
    """The ``teacher_stats`` stage: the teacher's features and per-class BN statistics of the
    real images, computed once per profile and shared by WMDD (every IPC) and herding."""

    # Images of one class per teacher forward. WMDD's ``bn_pooling: batch_mean`` (the official
    # code's pooling) depends on it, with 100 as in the official code; nothing else does.
    batch_size: int = 100

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"batch_size": 1})


@dataclass(frozen=True)
class RuntimeConfig:
    """How stages run; nothing here changes a result, so no stage depends on it."""

    # Long loops (teacher, student, synthesis) save a resumable checkpoint at most this often,
    # in seconds (0 = at every epoch or iteration, -1 = never); see wmdd.checkpoint.
    checkpoint_seconds: float = 300.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.checkpoint_seconds) and self.checkpoint_seconds >= -1):
            raise ValueError(
                f"checkpoint_seconds: expected seconds >= 0, or -1 for never, got "
                f"{self.checkpoint_seconds!r}"
            )


@dataclass(frozen=True)
class CompareConfig:
    """Thresholds of ``python -m pipelines.compare`` (no stage depends on them)."""

    alpha: float = 0.05  # Welch p below which a difference is beyond the seeds' noise
    max_regression: float = 1.0  # points: a significant drop larger than this fails

    def __post_init__(self) -> None:
        check_ranges(self, positive=("alpha",), non_negative=("max_regression",))
        if self.alpha >= 1:
            raise ValueError(f"alpha: expected a number in (0, 1), got {self.alpha!r}")


@dataclass(frozen=True)
class Params:
    benchmark: BenchmarkConfig
    datasets: dict[str, ProfileConfig]
    methods: dict[str, dict[str, Any] | None]  # validated per method by pipelines.registry
    teacher_stats: TeacherStatsConfig = field(default_factory=TeacherStatsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # how stages run
    compare: CompareConfig = field(default_factory=CompareConfig)  # pipelines.compare

    def profile(self, name: str) -> ProfileConfig:
        """The profile ``name`` or a ConfigError listing the known ones."""
        if name not in self.datasets:
            raise ConfigError(
                f"unknown dataset profile {name!r}; known: {', '.join(sorted(self.datasets))}"
            )
        return self.datasets[name]


def _check_benchmark(params: Params, source: str) -> None:
    bench = params.benchmark
    for name in bench.datasets:
        if name not in params.datasets:
            raise ConfigError(
                f"{source}: benchmark.datasets: {name!r} is not a key of `datasets` "
                f"(known: {', '.join(sorted(params.datasets))})"
            )
    for name in bench.methods:
        if name not in params.methods:
            raise ConfigError(
                f"{source}: benchmark.methods: {name!r} is not a key of `methods` "
                f"(known: {', '.join(sorted(params.methods))})"
            )
    for i, ipc in enumerate(bench.ipcs):
        if ipc < 1:
            raise ConfigError(f"{source}: benchmark.ipcs[{i}]: expected a positive int, got {ipc}")
    if not bench.eval_seeds:
        raise ConfigError(f"{source}: benchmark.eval_seeds: expected at least one seed")
    for name, prof in params.datasets.items():
        kinds = ("soft", "hard") if name in bench.datasets else (prof.protocol.kind,)
        try:
            for kind in kinds:
                prof.protocol.settings(kind)
        except ConfigError as err:
            raise ConfigError(f"{source}: datasets.{name}.{err}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Loads and validates ``params.yaml``.

    Raises:
        ConfigError: naming the file and the offending key.
        FileNotFoundError: if the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file {path} not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    params = from_dict(Params, raw, path=f"{path.name}:")
    _check_benchmark(params, path.name)
    return params
