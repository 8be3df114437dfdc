"""Tests of the strict params.yaml loader (wmdd.config) and the method config merge
(pipelines.registry.method_config)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from baselines.random_subset import RandomConfig
from pipelines.registry import method_config, validate_methods
from wmdd.config import (
    BenchmarkConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    Params,
    SoftProtocolConfig,
    flatten,
    from_dict,
    load_params,
    short_hash,
    to_dict,
)

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The real params.yaml as plain data (tests mutate deep copies)."""
    return yaml.safe_load(PARAMS.read_text())


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _load_modified(tmp_path: Path, raw: dict[str, Any], edit) -> Params:
    data = copy.deepcopy(raw)
    edit(data)
    return load_params(_write(tmp_path, data))


def _error(tmp_path: Path, raw: dict[str, Any], edit) -> str:
    with pytest.raises(ConfigError) as info:
        _load_modified(tmp_path, raw, edit)
    return str(info.value)


# -- the real file ------------------------------------------------------------------------


def _assert_values_from_yaml(raw: Any, parsed: Any, path: str = "") -> None:
    """Every value written in the YAML arrives unchanged in the parsed config."""
    if isinstance(raw, dict):
        assert isinstance(parsed, dict), path
        for key, value in raw.items():
            assert key in parsed, f"{path}.{key}"
            _assert_values_from_yaml(value, parsed[key], f"{path}.{key}")
    elif isinstance(raw, list):
        assert list(parsed) == raw, path
    else:
        assert parsed == raw and type(parsed) in (type(raw), float), path


def test_real_params_load(raw) -> None:
    params = load_params(PARAMS)
    assert isinstance(params, Params)
    _assert_values_from_yaml(raw, to_dict(params))
    assert set(params.benchmark.datasets) <= set(params.datasets)
    assert set(params.benchmark.methods) <= set(params.methods)
    assert all(isinstance(i, int) and i >= 1 for i in params.benchmark.ipcs)
    for name, profile in params.datasets.items():
        assert isinstance(profile.data, DataConfig), name
        crop = profile.teacher.crop_scale
        assert isinstance(crop, tuple) and all(isinstance(v, float) for v in crop), name
        assert isinstance(profile.teacher.model, ModelConfig), name
        if profile.protocol.kind == "soft":
            assert isinstance(profile.protocol.selected(), SoftProtocolConfig), name
    validate_methods(params)  # every method section parses for every profile


def test_round_trip_through_to_dict(raw: dict[str, Any], tmp_path: Path) -> None:
    params = load_params(PARAMS)
    again = load_params(_write(tmp_path, to_dict(params)))
    assert again == params


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("benchmark: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_unknown_profile_lookup_lists_known() -> None:
    params = load_params(PARAMS)
    with pytest.raises(ConfigError, match=r"unknown dataset profile 'nope'; known: .*digits"):
        params.profile("nope")


# -- unknown keys ------------------------------------------------------------------------


def test_unknown_top_level_key(raw, tmp_path) -> None:
    msg = _error(tmp_path, raw, lambda d: d.update(benchmarks={}))
    assert "'benchmarks'" in msg
    assert "expected keys: benchmark, datasets, methods" in msg


def test_unknown_nested_key_names_dotted_path_and_expected_keys(raw, tmp_path) -> None:
    msg = _error(tmp_path, raw, lambda d: d["datasets"]["digits"]["teacher"].update(epochz=3))
    assert "datasets.digits.teacher" in msg
    assert "'epochz'" in msg
    assert "expected keys: model, epochs, batch_size, lr" in msg


def test_unknown_key_in_benchmark(raw, tmp_path) -> None:
    msg = _error(tmp_path, raw, lambda d: d["benchmark"].update(ipc=[1]))
    assert "benchmark" in msg and "'ipc'" in msg and "ipcs" in msg


def test_unknown_key_inside_optional_section_names_the_key(raw, tmp_path) -> None:
    msg = _error(
        tmp_path, raw, lambda d: d["datasets"]["digits"]["protocol"]["soft"].update(epochz=3)
    )
    assert "datasets.digits.protocol.soft" in msg
    assert "'epochz'" in msg
    assert "expected keys:" in msg


def test_unknown_key_inside_optional_section_still_fails(raw, tmp_path) -> None:
    msg = _error(
        tmp_path, raw, lambda d: d["datasets"]["digits"]["protocol"]["soft"].update(epochz=3)
    )
    assert "datasets.digits.protocol.soft" in msg


# -- wrong types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("teacher", "epochs", "ten", "expected int, got str 'ten'"),
        ("teacher", "epochs", True, "expected int, got bool True"),
        ("teacher", "epochs", 2.5, "expected int, got float 2.5"),
        ("teacher", "lr", "0.1", "expected float, got str '0.1'"),
        ("teacher", "lr", False, "expected float, got bool False"),
        ("teacher", "flip", 1, "expected bool (true/false), got int 1"),
        ("teacher", "flip", "yes", "expected bool (true/false), got str 'yes'"),
        ("data", "name", 3, "expected str, got int 3"),
        ("data", "resolution", "16", "expected int, got str '16'"),
    ],
)
def test_wrong_type_names_key_and_expected_type(
    raw, tmp_path, section, key, value, expected
) -> None:
    msg = _error(tmp_path, raw, lambda d: d["datasets"]["digits"][section].update({key: value}))
    assert f"datasets.digits.{section}.{key}: {expected}" in msg


def test_int_is_accepted_for_float(raw, tmp_path) -> None:
    params = _load_modified(
        tmp_path, raw, lambda d: d["datasets"]["digits"]["teacher"].update(lr=1)
    )
    lr = params.datasets["digits"].teacher.lr
    assert lr == 1.0 and isinstance(lr, float)


def test_wrong_tuple_length_and_item_type(raw, tmp_path) -> None:
    msg = _error(
        tmp_path,
        raw,
        lambda d: d["datasets"]["digits"]["teacher"].update(crop_scale=[0.1, 0.5, 1.0]),
    )
    assert "datasets.digits.teacher.crop_scale: expected a list of 2, got 3 items" in msg
    msg = _error(
        tmp_path, raw, lambda d: d["datasets"]["digits"]["teacher"].update(crop_scale=[0.1, "x"])
    )
    assert "datasets.digits.teacher.crop_scale[1]: expected float" in msg


def test_wrong_item_type_in_variadic_tuple(raw, tmp_path) -> None:
    msg = _error(tmp_path, raw, lambda d: d["benchmark"].update(ipcs=[1, "10"]))
    assert "benchmark.ipcs[1]: expected int, got str '10'" in msg
    msg = _error(tmp_path, raw, lambda d: d["benchmark"].update(ipcs=10))
    assert "benchmark.ipcs: expected a list, got int 10" in msg


def test_section_that_is_not_a_mapping(raw, tmp_path) -> None:
    msg = _error(tmp_path, raw, lambda d: d["datasets"]["digits"].update(teacher=[1, 2]))
    assert "datasets.digits.teacher: expected a mapping" in msg


# -- missing keys, Literals, cross-checks -------------------------------------------------


def test_missing_required_key(raw, tmp_path) -> None:
    msg = _error(tmp_path, raw, lambda d: d["benchmark"].pop("ipcs"))
    assert "benchmark: missing required key 'ipcs'" in msg
    msg = _error(tmp_path, raw, lambda d: d["datasets"]["digits"]["teacher"].pop("model"))
    assert "datasets.digits.teacher: missing required key 'model'" in msg


def test_optional_key_falls_back_to_default(raw, tmp_path) -> None:
    params = _load_modified(
        tmp_path, raw, lambda d: d["datasets"]["digits"]["teacher"].pop("momentum")
    )
    assert params.datasets["digits"].teacher.momentum == 0.9


def test_literal_violation_lists_choices(raw, tmp_path) -> None:
    msg = _error(tmp_path, raw, lambda d: d["datasets"]["digits"]["protocol"].update(kind="x"))
    assert "datasets.digits.protocol.kind: expected one of 'soft', 'hard', got 'x'" in msg


def test_literal_violation_direct() -> None:
    soft = {"student": {"name": "convnet"}, "relabel_mode": "bogus"}
    with pytest.raises(ConfigError, match=r"p\.relabel_mode: expected one of 'stored', 'online'"):
        from_dict(SoftProtocolConfig, soft, path="p")


def test_literal_violation_inside_optional_section_lists_choices(raw, tmp_path) -> None:
    msg = _error(
        tmp_path,
        raw,
        lambda d: d["datasets"]["digits"]["protocol"]["soft"].update(relabel_mode="bogus"),
    )
    assert "datasets.digits.protocol.soft.relabel_mode" in msg
    assert "'stored', 'online'" in msg


def test_selected_protocol_missing(raw, tmp_path) -> None:
    def edit(d):
        d["datasets"]["digits"]["protocol"]["kind"] = "hard"
        d["datasets"]["digits"]["protocol"].pop("hard")

    msg = _error(tmp_path, raw, edit)
    assert "datasets.digits.protocol.hard is missing" in msg


def test_a_profile_the_pipeline_runs_needs_both_protocols(raw, tmp_path) -> None:
    """Every cell is evaluated under both protocols (stages evaluate and evaluate_hard)."""
    msg = _error(tmp_path, raw, lambda d: d["datasets"]["digits"]["protocol"].pop("hard"))
    assert "datasets.digits.protocol.hard is missing" in msg
    # A profile the pipeline does not run needs only its headline protocol.
    data = copy.deepcopy(raw)
    data["datasets"]["cifar10"]["protocol"].pop("hard")
    assert load_params(_write(tmp_path, data)).datasets["cifar10"].protocol.hard is None


def test_benchmark_unknown_profile(raw, tmp_path) -> None:
    msg = _error(tmp_path, raw, lambda d: d["benchmark"].update(datasets=["digits", "cifar"]))
    assert "benchmark.datasets: 'cifar' is not a key of `datasets`" in msg
    assert "known: " in msg and "digits" in msg


def test_benchmark_unknown_method(raw, tmp_path) -> None:
    msg = _error(tmp_path, raw, lambda d: d["benchmark"].update(methods=["random", "wmdd2"]))
    assert "benchmark.methods: 'wmdd2' is not a key of `methods`" in msg
    assert re.search(r"\(known: [^)]*\brandom\b", msg)


@pytest.mark.parametrize("ipcs", [[0], [1, -3]])
def test_ipc_below_one(raw, tmp_path, ipcs) -> None:
    msg = _error(tmp_path, raw, lambda d: d["benchmark"].update(ipcs=ipcs))
    assert f"benchmark.ipcs[{len(ipcs) - 1}]: expected a positive int, got {ipcs[-1]}" in msg


def test_no_eval_seeds(raw, tmp_path) -> None:
    msg = _error(tmp_path, raw, lambda d: d["benchmark"].update(eval_seeds=[]))
    assert "benchmark.eval_seeds" in msg


# -- method configs ----------------------------------------------------------------------


def test_method_config_defaults_and_overrides(raw, tmp_path) -> None:
    def edit(d):
        d["datasets"]["other"] = copy.deepcopy(d["datasets"]["digits"])
        d["methods"]["random"] = {"draw": 3, "overrides": {"other": {"draw": 7}}}

    params = _load_modified(tmp_path, raw, edit)
    assert method_config(params, "random", "digits") == RandomConfig(draw=3)
    assert method_config(params, "random", "other") == RandomConfig(draw=7)


def test_method_config_empty_section_gives_defaults(raw, tmp_path) -> None:
    params = _load_modified(tmp_path, raw, lambda d: d["methods"].update(random={}))
    assert method_config(params, "random", "digits") == RandomConfig()


def test_method_config_unknown_key_in_overrides(raw, tmp_path) -> None:
    params = _load_modified(
        tmp_path, raw, lambda d: d["methods"]["random"].update(overrides={"digits": {"draww": 1}})
    )
    with pytest.raises(ConfigError) as info:
        method_config(params, "random", "digits")
    msg = str(info.value)
    assert "methods.random" in msg and "overrides.digits" in msg
    assert "'draww'" in msg and "expected keys: draw" in msg
    with pytest.raises(ConfigError, match="draww"):
        validate_methods(params)


def test_method_config_wrong_type_in_section(raw, tmp_path) -> None:
    params = _load_modified(tmp_path, raw, lambda d: d["methods"]["random"].update(draw="0"))
    with pytest.raises(ConfigError, match=r"methods\.random\.draw: expected int, got str '0'"):
        method_config(params, "random", "digits")


def test_method_config_unknown_override_profile(raw, tmp_path) -> None:
    params = _load_modified(
        tmp_path, raw, lambda d: d["methods"]["random"].update(overrides={"imagenet": {"draw": 1}})
    )
    with pytest.raises(ConfigError) as info:
        method_config(params, "random", "digits")
    msg = str(info.value)
    assert "methods.random" in msg and "'imagenet'" in msg
    assert re.search(r"known: \[[^]]*'digits'", msg)


def test_method_config_overrides_not_a_mapping(raw, tmp_path) -> None:
    params = _load_modified(tmp_path, raw, lambda d: d["methods"]["random"].update(overrides=[1]))
    with pytest.raises(ConfigError, match=r"methods\.random\.overrides: expected a mapping"):
        method_config(params, "random", "digits")


def test_unknown_method_lists_registered() -> None:
    params = load_params(PARAMS)
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; registered: .*random"):
        method_config(params, "nope", "digits")


# -- hashing and flattening --------------------------------------------------------------


def test_short_hash_stable_and_sensitive() -> None:
    a = load_params(PARAMS)
    b = load_params(PARAMS)
    assert short_hash(a) == short_hash(b)
    assert len(short_hash(a)) == 10 and len(short_hash(a, length=16)) == 16
    assert short_hash({"x": 1, "y": 2}) == short_hash({"y": 2, "x": 1})  # key order ignored
    assert short_hash({"x": 1}) != short_hash({"x": 2})
    assert short_hash({"x": 1.0}) != short_hash({"x": 1.5})
    bench = a.benchmark
    changed = BenchmarkConfig(
        bench.datasets, bench.methods, bench.ipcs, bench.eval_seeds, seed=bench.seed + 1
    )
    assert short_hash(changed) != short_hash(bench)
    # A known answer: pins the serialisation, so a change of format (and of every stored
    # hash) cannot happen silently.
    import hashlib

    expected = hashlib.sha256(b'{"a":[1,2],"b":{"c":"x"}}').hexdigest()[:10]
    assert short_hash({"b": {"c": "x"}, "a": (1, 2)}) == expected


def test_flatten() -> None:
    data = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x", "f": {}}
    assert flatten(data) == {"a.b": 1, "a.c.d": [1, 2], "e": "x", "f": "{}"}
    assert flatten({"k": 1}, "data.") == {"data.k": 1}
    flat = flatten(DataConfig(name="digits", resolution=16), "data.")
    assert flat == {
        "data.name": "digits",
        "data.source": "builtin",
        "data.resolution": 16,
        "data.val_fraction": 0.2,
        "data.split_seed": 0,
        "data.skip_corrupt": False,
        "data.workers": 0,
        "data.sha256": "",
        "data.archive": "",
        "data.url": "",
        "data.download_dir": "data/downloads",
    }


# --- The shipped settings: consistency rules the review found broken (issue 13) -----------


def test_no_profile_synthesises_or_relabels_on_crops_smaller_than_its_teacher_saw() -> None:
    """One crop policy per profile: the synthesis views (WMDD, SRe2L) and the relabel views
    are never smaller than the teacher's training crops (imagenette_cpu trained at (0.25, 1)
    but synthesised and relabelled at (0.08, 1): a fifth of the views were out of range)."""
    params = load_params(PARAMS)
    for profile_name, profile in params.datasets.items():
        floor = profile.teacher.crop_scale[0]
        views = {"protocol.soft": profile.protocol.soft.crop_scale} if profile.protocol.soft else {}
        for method in ("wmdd", "sre2l"):
            views[f"methods.{method}"] = method_config(
                params, method, profile_name
            ).synthesis.crop_scale
        for where, scale in views.items():
            assert scale[0] >= floor, (
                f"{profile_name}: {where}.crop_scale {scale} goes below the teacher's {floor}"
            )


@pytest.mark.parametrize("method", ["dm", "dm_teacher", "wmdd", "sre2l"])
def test_every_method_with_a_budget_has_each_profiles_recipe(method: str) -> None:
    """A method whose settings depend on the dataset has an override for every profile
    except the embedded default (dm_teacher had none: every profile ran the digits recipe)."""
    params = load_params(PARAMS)
    overrides = params.methods[method].get("overrides") or {}
    missing = sorted(set(params.datasets) - {"digits"} - set(overrides))
    assert not missing, f"methods.{method}.overrides lacks {missing}"


def test_dm_teacher_follows_dms_recipe_per_profile() -> None:
    params = load_params(PARAMS)
    for profile in params.datasets:
        dm, dmt = method_config(params, "dm", profile), method_config(params, "dm_teacher", profile)
        for key in ("iterations", "real_per_class", "classes_per_iteration", "large_ipc"):
            assert getattr(dmt, key) == getattr(dm, key), (profile, key)
        assert dmt.dsa_config == dm.dsa_config, profile


def test_dms_large_ipc_learning_rate_only_for_cifar10() -> None:
    """The official code raises DM's pixel lr to 10 at IPC >= 100 for CIFAR-10 only."""
    from baselines.dm import pixel_lr

    params = load_params(PARAMS)
    for profile_name, profile in params.datasets.items():
        config = method_config(params, "dm", profile_name)
        want = 10.0 if profile.data.name == "cifar10" else 1.0
        assert pixel_lr(config, 100) == want, profile_name
        assert pixel_lr(config, 50) == 1.0, profile_name


def test_sets_per_cell_come_from_the_benchmark_or_the_method(raw, tmp_path) -> None:
    from pipelines.registry import method_sets

    params = load_params(PARAMS)
    assert method_sets(params, "wmdd") == list(range(params.benchmark.sets))
    assert method_sets(params, "random") == list(range(raw["methods"]["random"]["sets"]))
    assert len(method_sets(params, "random")) >= 5  # the reference row: at least 5 draws
    assert method_sets(params, "herding") == [0]  # deterministic: one set
    # ``sets`` is the registry's key: the method's own config never sees it.
    assert method_config(params, "random", "digits") == RandomConfig(draw=0)
    for method, value, match in (
        ("herding", 3, "herding is deterministic"),
        ("wmdd", 0, "methods.wmdd.sets: expected a positive int"),
    ):
        data = copy.deepcopy(raw)
        data["methods"][method] = {**(data["methods"][method] or {}), "sets": value}
        with pytest.raises(ConfigError, match=match):
            method_sets(load_params(_write(tmp_path, data)), method)
    data = copy.deepcopy(raw)
    data["benchmark"]["sets"] = 0
    with pytest.raises(ConfigError, match="sets"):
        load_params(_write(tmp_path, data))


def test_set_zero_keeps_the_cells_former_seed_and_sets_differ() -> None:
    from pipelines.registry import set_seed
    from wmdd.utils import derive_seed

    assert set_seed(0, "digits", "wmdd", 0) == derive_seed(0, "digits", "wmdd")
    seeds = {set_seed(0, "digits", "wmdd", s) for s in range(5)}
    assert len(seeds) == 5
    assert set_seed(0, "digits", "wmdd", 1) != set_seed(0, "digits", "dm", 1)
