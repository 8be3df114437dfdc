"""The method registry, assembled here so that ``wmdd`` never imports ``baselines``.

A method is a callable ``fn(*, teacher, data, classes, ipc, config, seed, device, progress)
-> SyntheticSet`` (see DESIGN.md, "A method") plus a frozen config dataclass that its
``methods.<name>`` section in ``params.yaml`` is parsed into. A section may carry
``overrides: {<profile>: {...}}`` with per-dataset values (the papers used different
settings per dataset); they are merged over the defaults before strict parsing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from baselines.dm import DMConfig, dm
from baselines.herding import HerdingConfig, herding
from baselines.random_subset import RandomConfig, random_subset
from baselines.sre2l import SRe2LConfig, sre2l
from wmdd.config import ConfigError, Params, from_dict
from wmdd.method.distill import WMDDConfig, wmdd_distill


@dataclass(frozen=True)
class MethodSpec:
    name: str  # registry key and params section name
    fn: Callable[..., Any]  # the method
    config_cls: type  # its frozen config dataclass
    needs_teacher: bool  # whether the distill stage must load the teacher
    description: str  # one line for reports and --help
    defaults: dict[str, Any] = field(default_factory=dict)  # fixed values of a named variant


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec(
            "random", random_subset, RandomConfig, False, "random real subset (seeded, per class)"
        ),
        MethodSpec(
            "wmdd",
            wmdd_distill,
            WMDDConfig,
            True,
            "WMDD: Wasserstein barycenters + per-class BN matching (Liu et al.)",
        ),
        MethodSpec(
            "sre2l",
            sre2l,
            SRe2LConfig,
            True,
            "SRe2L: CE + global BN matching, one image per class per batch (Yin et al.)",
        ),
        MethodSpec(
            "dm",
            dm,
            DMConfig,
            False,
            "DM: class-mean matching in random ConvNet embeddings (Zhao & Bilen)",
        ),
        MethodSpec(
            "dm_teacher",
            dm,
            DMConfig,
            True,
            "DM's loss in the pretrained teacher's feature space (WMDD's MMD ablation)",
            defaults={"feature_space": "teacher"},
        ),
        MethodSpec(
            "herding",
            herding,
            HerdingConfig,
            True,
            "herding: greedy real images keeping the running feature mean closest",
        ),
    ]
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``, recursively for nested mappings (e.g. ``synthesis``), so
    an override lists only the keys it changes."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def method_config(params: Params, method: str, profile: str) -> Any:
    """The method's config for ``profile``: its section, then ``overrides.<profile>`` merged
    recursively, then the variant's fixed ``defaults``; parsed strictly."""
    spec = get_method(method)
    section = dict(params.methods.get(method) or {})
    overrides = section.pop("overrides", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"params.yaml: methods.{method}.overrides: expected a mapping")
    unknown = sorted(set(overrides) - set(params.datasets))
    if unknown:
        raise ConfigError(
            f"params.yaml: methods.{method}.overrides: unknown dataset profile(s) {unknown}; "
            f"known: {sorted(params.datasets)}"
        )
    merged = deep_merge(section, overrides.get(profile) or {})
    for key, value in spec.defaults.items():
        if key in merged and merged[key] != value:
            raise ConfigError(
                f"params.yaml: methods.{method}.{key}: the {method!r} variant fixes it to "
                f"{value!r}, got {merged[key]!r}"
            )
        merged[key] = value
    origin = f" (with methods.{method}.overrides.{profile})" if profile in overrides else ""
    where = f"params.yaml{origin}: methods.{method}"
    return from_dict(spec.config_cls, merged, path=where)


def validate_methods(params: Params) -> None:
    """Parses every method section for every profile, so a typo fails before any work."""
    for method in params.methods:
        for profile in params.datasets:
            method_config(params, method, profile)
