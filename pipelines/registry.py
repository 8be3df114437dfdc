"""The method registry, assembled here so that ``wmdd`` never imports ``baselines``.

A method is a callable ``fn(*, teacher, data, classes, ipc, config, seed, device, progress)
-> SyntheticSet`` (see the README, "Adding a method") plus a frozen config dataclass that its
``methods.<name>`` section in ``params.yaml`` is parsed into. A section may carry
``overrides: {<profile>: {...}}`` with per-dataset values (the papers used different
settings per dataset); they are merged over the defaults before strict parsing.

Methods come from two places: the built-ins below, and *plugins*, methods installed as
Python packages that declare a :class:`MethodRef` under the entry-point group
``wmdd_bench.methods`` (README "Adding your own method"); a plugin cannot shadow a built-in.
A ``methods.<row>`` section may also run a registered method under a row name of its own
with ``method: <name>`` (e.g. several external sets, each its own row).

Methods are resolved lazily, by name: the registry holds the *module path* of each method,
and :func:`get_method` imports that module only when a stage asks for the method. A stage
therefore loads the code it runs and nothing else (``prepare`` never imports POT, a
``distill`` of ``random`` never imports the synthesis loop), which is what lets
``dvc.yaml`` list narrow, honest code dependencies (``tests/test_stage_deps.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wmdd import paths
from wmdd.config import ConfigError, Params, from_dict, load_params
from wmdd.utils import derive_seed, read_json


@dataclass(frozen=True)
class MethodRef:
    """Where a method lives, without importing it."""

    module: str  # importable module path, e.g. "baselines.dm"
    fn: str  # the method function's name in that module
    config: str  # its frozen config dataclass's name in that module
    needs_teacher: bool  # whether the distill stage must load the teacher
    description: str  # one line for reports and --help
    defaults: dict[str, Any] = field(default_factory=dict)  # fixed values of a named variant
    # Name of ``class_group(config, ipc) -> int`` in the module: a class-range shard must start
    # on a multiple of it (the synthesis batches' class groups); None = any range.
    class_group: str | None = None
    # Whether the method takes ``teacher_stats=`` (the teacher_stats stage's output, shared).
    uses_teacher_stats: bool = False
    # Whether its set is a function of its inputs alone (no seed): one set per cell.
    deterministic: bool = False
    source: str = "built-in"  # where it comes from: "built-in" or "plugin <dist> <version>"


@dataclass(frozen=True)
class MethodSpec:
    """A resolved method: its function and config class, imported."""

    name: str  # registry key and params section name
    fn: Callable[..., Any]  # the method
    config_cls: type  # its frozen config dataclass
    needs_teacher: bool  # whether the distill stage must load the teacher
    description: str  # one line for reports and --help
    defaults: dict[str, Any] = field(default_factory=dict)  # fixed values of a named variant
    uses_teacher_stats: bool = False  # takes ``teacher_stats=`` (the shared stage's output)
    source: str = "built-in"  # "built-in" or "plugin <dist> <version>" (MethodRef.source)


METHODS: dict[str, MethodRef] = {
    "random": MethodRef(
        "baselines.random_subset",
        "random_subset",
        "RandomConfig",
        False,
        "random real subset (seeded, per class)",
    ),
    "wmdd": MethodRef(
        "wmdd.method.distill",
        "wmdd_distill",
        "WMDDConfig",
        True,
        "WMDD: Wasserstein barycenters + per-class BN matching (Liu et al.)",
        class_group="class_group",
        uses_teacher_stats=True,
    ),
    "sre2l": MethodRef(
        "baselines.sre2l",
        "sre2l",
        "SRe2LConfig",
        True,
        "SRe2L: CE + global BN matching, one image per class per batch (Yin et al.)",
        class_group="class_group",
    ),
    "dm": MethodRef(
        "baselines.dm",
        "dm",
        "DMConfig",
        False,
        "DM: class-mean matching in random ConvNet embeddings (Zhao & Bilen)",
    ),
    "dm_teacher": MethodRef(
        "baselines.dm",
        "dm",
        "DMConfig",
        True,
        "DM's loss in the pretrained teacher's feature space (WMDD's MMD ablation)",
        defaults={"feature_space": "teacher"},
    ),
    "herding": MethodRef(
        "baselines.herding",
        "herding",
        "HerdingConfig",
        True,
        "herding: greedy real images keeping the running feature mean closest",
        uses_teacher_stats=True,
        deterministic=True,
    ),
    "rded": MethodRef(
        "baselines.rded",
        "rded",
        "RDEDConfig",
        True,
        "RDED: the teacher's most realistic real crops, stitched into patch grids (Sun et al.)",
    ),
    "fadrm": MethodRef(
        "baselines.fadrm",
        "fadrm",
        "FADRMConfig",
        True,
        "FADRM: SRe2L's recovery from RDED patches in resolution stages with data residuals "
        "(Cui et al.)",
        class_group="class_group",
    ),
    "external": MethodRef(
        "baselines.external",
        "external_set",
        "ExternalConfig",
        False,
        "an external set: images made elsewhere, read and checked from methods.<row>.path",
        deterministic=True,
    ),
}


PLUGIN_GROUP = "wmdd_bench.methods"  # the entry-point group plugins declare methods in


def _plugin_entry_points(name: str | None = None) -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=PLUGIN_GROUP)
    return [ep for ep in eps if name is None or ep.name == name]


def _load_plugin(ep: importlib.metadata.EntryPoint) -> MethodRef:
    """One plugin's declaration, loaded; errors name the entry point."""
    where = f"entry point {ep.name} = {ep.value!r} (group {PLUGIN_GROUP})"
    if ep.name in METHODS:
        raise ConfigError(f"{where}: {ep.name!r} is a built-in method; name it otherwise")
    try:
        ref = ep.load()
    except Exception as err:  # the plugin's own import error, named
        raise ConfigError(f"{where}: cannot be loaded: {type(err).__name__}: {err}") from err
    if not isinstance(ref, MethodRef):
        raise ConfigError(
            f"{where}: expected a pipelines.registry.MethodRef, got {type(ref).__name__}"
        )
    dist = getattr(ep, "dist", None)
    source = f"{dist.name} {dist.version}" if dist is not None else ep.value
    return dataclasses.replace(ref, source=f"plugin {source}")


@functools.cache
def plugin_methods() -> dict[str, MethodRef]:
    """Every method installed packages declare under the entry-point group
    :data:`PLUGIN_GROUP`: ``<name> = "<module>:<attribute>"``, the attribute a
    :class:`MethodRef` (only the declaring module is imported; the method's own module is
    imported when a stage asks for it). Loads them all, so a broken or shadowing plugin
    fails here (``pipelines.check``); read once per process."""
    return {ep.name: _load_plugin(ep) for ep in _plugin_entry_points()}


@functools.cache
def lookup(name: str) -> MethodRef | None:
    """Registered method ``name``: a built-in (no plugin is loaded then, so a broken plugin
    elsewhere in the environment cannot stop a built-in), else the plugin of that name."""
    if name in METHODS:
        return METHODS[name]
    eps = _plugin_entry_points(name)
    if len(eps) > 1:
        values = ", ".join(ep.value for ep in eps)
        raise ConfigError(f"method {name!r}: declared by several plugins ({values})")
    return _load_plugin(eps[0]) if eps else None


def reload_plugins() -> None:
    """Forgets the plugins read so far (after installing one in a running process)."""
    plugin_methods.cache_clear()
    lookup.cache_clear()


def registered() -> dict[str, MethodRef]:
    """Every method a stage can run: the built-ins and the installed plugins."""
    return {**METHODS, **plugin_methods()}


def _unknown(name: str, where: str = "") -> ConfigError:
    names = sorted({*METHODS, *(ep.name for ep in _plugin_entry_points())})
    return ConfigError(
        f"params.yaml: {where}unknown method {name!r}; registered: {', '.join(names)}"
    )


def method_name(params: Params, row: str) -> str:
    """The registered method behind row ``row`` of ``params.yaml: methods``: the row itself,
    or the method its section names with ``method: <name>``."""
    section = params.methods.get(row) or {}
    target = section.get("method", row) if isinstance(section, dict) else row
    if not isinstance(target, str):
        raise ConfigError(
            f"params.yaml: methods.{row}.method: expected a method name, got {target!r}"
        )
    if target != row and row in METHODS:
        raise ConfigError(
            f"params.yaml: methods.{row}.method: {row!r} is a registered method itself and "
            f"cannot run {target!r}; give the row another name"
        )
    if lookup(target) is None:
        raise _unknown(target, f"methods.{row}.method: " if target != row else "")
    return target


def get_method(name: str) -> MethodSpec:
    """Imports registered method ``name``'s module and returns its resolved spec."""
    ref = lookup(name)
    if ref is None:
        raise _unknown(name)
    module = importlib.import_module(ref.module)
    return MethodSpec(
        name=name,
        fn=getattr(module, ref.fn),
        config_cls=getattr(module, ref.config),
        needs_teacher=ref.needs_teacher,
        description=ref.description,
        defaults=dict(ref.defaults),
        uses_teacher_stats=ref.uses_teacher_stats,
        source=ref.source,
    )


def aligned_ranges(num_classes: int, group: int, shards: int) -> list[range]:
    """``shards`` (or fewer) contiguous class ranges that start on multiples of ``group``."""
    groups = -(-num_classes // group)
    per = -(-groups // max(1, min(shards, groups))) * group
    return [range(a, min(a + per, num_classes)) for a in range(0, num_classes, per)]


def shard_ranges(params_path: str, cmd: str, shards: int) -> list[range]:
    """The class ranges of a distill stage's ``cmd`` split into ``shards`` shards, aligned to
    the method's synthesis batches (needs the profile's prepared ``manifest.json``)."""
    found = dict(re.findall(r"--(dataset|method|ipc) (\S+)", cmd))
    params = load_params(params_path)
    ref = lookup(method_name(params, found["method"]))
    assert ref is not None  # method_name checked it
    group = 1
    if ref.class_group:
        config = method_config(params, found["method"], found["dataset"])
        module = importlib.import_module(ref.module)
        group = int(getattr(module, ref.class_group)(config, int(found["ipc"])))
    manifest = read_json(paths.data_dir(found["dataset"]) / "manifest.json")
    return aligned_ranges(len(manifest["classes"]), group, shards)


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
    """The config of row ``method`` for ``profile``: its section, then
    ``overrides.<profile>`` merged recursively, then the variant's fixed ``defaults``;
    parsed strictly into the config of the registered method it runs (:func:`method_name`)."""
    spec = get_method(method_name(params, method))
    section = dict(params.methods.get(method) or {})
    section.pop("sets", None)  # the registry's key (method_sets), not the method's
    section.pop("method", None)  # the registered method a row runs (method_name)
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


def method_sets(params: Params, method: str) -> list[int]:
    """The distilled sets of each cell of ``method``: ``methods.<method>.sets`` (an optional
    key of the method's section, read here and not passed to the method) or
    ``benchmark.sets``, as indices 0..n-1; one set for a deterministic method."""
    section = params.methods.get(method) or {}
    value = section.get("sets", params.benchmark.sets)
    where = f"params.yaml: methods.{method}.sets" if "sets" in section else "benchmark.sets"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a positive int, got {value!r}")
    ref = lookup(method_name(params, method))
    if ref is not None and ref.deterministic:
        if "sets" in section and value != 1:
            raise ConfigError(f"{where}: {method} is deterministic (one set per cell), got {value}")
        return [0]
    return list(range(value))


def set_seed(base_seed: int, profile: str, method: str, set_index: int) -> int:
    """The seed set ``set_index`` of a (profile, method) cell is distilled from. Set 0 keeps
    the seed a cell had before sets existed (its bytes are unchanged); the IPC is not part
    of it, as before."""
    if set_index == 0:
        return derive_seed(base_seed, profile, method)
    return derive_seed(base_seed, profile, method, "set", set_index)


def resolve_method(params: Params, method: str, profile: str) -> tuple[MethodSpec, Any]:
    """The method's spec and its config for ``profile``, after checking its section parses
    for every profile (a typo in any override fails before the method runs)."""
    validate_method(params, method)
    return get_method(method_name(params, method)), method_config(params, method, profile)


def validate_method(params: Params, method: str) -> None:
    """Parses ``methods.<method>`` for every profile, so a typo in any profile's override
    fails before the method runs (its ``sets`` too)."""
    method_sets(params, method)
    for profile in params.datasets:
        method_config(params, method, profile)


def validate_methods(params: Params) -> None:
    """Parses every method section for every profile (imports every method's module: for
    ``python -m pipelines.check``, not for stages), after loading every installed plugin so
    that a broken one is named here."""
    registered()
    for method in params.methods:
        validate_method(params, method)
