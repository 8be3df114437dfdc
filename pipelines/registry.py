"""The method registry, assembled here so that ``wmdd`` never imports ``baselines``.

A method is a callable ``fn(*, teacher, data, classes, ipc, config, seed, device, progress)
-> SyntheticSet`` (see DESIGN.md, "A method") plus a frozen config dataclass that its
``methods.<name>`` section in ``params.yaml`` is parsed into. A section may carry
``overrides: {<profile>: {...}}`` with per-dataset values (the papers used different
settings per dataset); they are merged over the defaults before strict parsing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from baselines.random_subset import RandomConfig, random_subset
from wmdd.config import ConfigError, Params, from_dict
from wmdd.wmdd import WMDDConfig, wmdd_distill


@dataclass(frozen=True)
class MethodSpec:
    name: str  # registry key and params section name
    fn: Callable[..., Any]  # the method
    config_cls: type  # its frozen config dataclass
    needs_teacher: bool  # whether the distill stage must load the teacher
    description: str  # one line for reports and --help


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec("random", random_subset, RandomConfig, False,
                   "random real subset (seeded, per class)"),
        MethodSpec("wmdd", wmdd_distill, WMDDConfig, True,
                   "WMDD: Wasserstein barycenters + per-class BN matching (Liu et al.)"),
    ]
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_config(params: Params, method: str, profile: str) -> Any:
    """The method's config for ``profile``: defaults, then ``overrides.<profile>``, strictly."""
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
    merged = {**section, **(overrides.get(profile) or {})}
    origin = f" (with methods.{method}.overrides.{profile})" if profile in overrides else ""
    where = f"params.yaml{origin}: methods.{method}"
    return from_dict(spec.config_cls, merged, path=where)


def validate_methods(params: Params) -> None:
    """Parses every method section for every profile, so a typo fails before any work."""
    for method in params.methods:
        for profile in params.datasets:
            method_config(params, method, profile)
