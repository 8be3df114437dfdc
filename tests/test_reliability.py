"""Every failure a user can cause ends in one line naming the key, value or file; params.yaml
survives ``dvc exp run -S``; outputs get normal permissions.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.registry import validate_methods
from wmdd.config import ConfigError, load_params
from wmdd.data.prepared import load_prepared
from wmdd.models.teacher import load_teacher
from wmdd.protocol.soft import StoredLabels
from wmdd.synthetic_set import SyntheticSet
from wmdd.utils import ArtifactError, atomic_dir, atomic_file

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def _set(path: str, value):
    """A mutation of the raw params: ``path`` is dotted, e.g. ``datasets.digits.teacher.lr``."""

    def mutate(raw: dict) -> None:
        *parents, key = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[key] = value

    return mutate


# (what a user wrote, the key path and expectation the one-line error must name)
CONFIG_CASES = [
    (
        "datasets.digits.teacher.epochs",
        0,
        r"datasets\.digits\.teacher: epochs: expected >= 1, got 0",
    ),
    (
        "datasets.digits.teacher.lr",
        float("nan"),
        r"teacher: lr: expected a finite number > 0, got nan",
    ),
    ("datasets.digits.teacher.lr", -0.1, r"teacher: lr: expected a finite number > 0, got -0\.1"),
    ("datasets.digits.teacher.momentum", 1.5, r"teacher: momentum: expected a number in \[0, 1\)"),
    ("datasets.digits.teacher.crop_scale", [0.5, 0.2], r"teacher: crop_scale: expected \[lo, hi\]"),
    ("datasets.digits.protocol.soft.epochs", 0, r"protocol\.soft: epochs: expected >= 1"),
    ("datasets.digits.protocol.soft.temperature", 0.0, r"soft: temperature: expected a finite"),
    ("datasets.digits.protocol.hard.lr", float("inf"), r"hard: lr: expected a finite number > 0"),
    (
        "datasets.digits.data.val_fraction",
        1.0,
        r"data: val_fraction: expected a number in \(0, 1\)",
    ),
    ("methods.wmdd.synthesis.lr", float("nan"), r"methods\.wmdd\.synthesis: lr: expected a finite"),
    (
        "methods.wmdd.synthesis.iterations",
        0,
        r"methods\.wmdd\.synthesis: iterations: expected >= 1",
    ),
    ("methods.wmdd.lambda_bn", -1.0, r"methods\.wmdd: lambda_bn: expected a finite number >= 0"),
    ("methods.dm.lr", 0.0, r"methods\.dm: lr: expected a finite number > 0"),
    ("methods.sre2l.r_bn", float("nan"), r"methods\.sre2l: r_bn: expected a finite number >= 0"),
    ("runtime.checkpoint_seconds", -5.0, r"runtime: checkpoint_seconds: expected seconds >= 0"),
]


@pytest.mark.parametrize(
    ("key", "value", "message"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES]
)
def test_out_of_range_params_name_the_key(tmp_path: Path, key: str, value, message: str) -> None:
    raw = copy.deepcopy(RAW)
    _set(key, value)(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message) as err:
        validate_methods(load_params(path))
    assert "\n" not in str(err.value)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in ("WMDD_TRACEBACK", "MLFLOW_TRACKING_URI")
    }
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _corrupt(path: Path, how: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "garbage":
        path.write_bytes(b"\x80\x04 this is not a torch file")
    elif how == "truncated":
        torch.save({"state_dict": {"w": torch.ones(100)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:  # a readable torch file of the wrong kind
        torch.save({"something": torch.zeros(2)}, path)


ARTIFACTS = [
    ("models/t/teacher.pt", "teacher checkpoint", lambda p: load_teacher(p, device="cpu")),
    ("distilled/set.pt", "synthetic set", SyntheticSet.load),
    ("labels/seed0.pt", "stored soft-label file", StoredLabels.load),
]


@pytest.mark.parametrize("how", ["garbage", "truncated", "wrong keys"])
@pytest.mark.parametrize(("rel", "what", "load"), ARTIFACTS, ids=[a[1] for a in ARTIFACTS])
def test_unreadable_artefact_names_the_file(tmp_path: Path, rel, what, load, how) -> None:
    path = tmp_path / rel
    _corrupt(path, how)
    with pytest.raises(ArtifactError) as err:
        load(path)
    text = str(err.value)
    assert str(path) in text and what in text and "\n" not in text
    assert "weights_only" not in text  # torch's unsafe hint is never passed on


def test_unreadable_prepared_data_names_the_file(tmp_path: Path) -> None:
    from helpers import tiny_prepared

    from wmdd.data.prepared import save_prepared

    save_prepared(tiny_prepared(), tmp_path / "data", extra_manifest={})
    _corrupt(tmp_path / "data" / "data.pt", "garbage")
    with pytest.raises(ArtifactError, match=r"data\.pt: cannot read this prepared dataset"):
        load_prepared(tmp_path / "data", verify=False)


def test_set_of_the_wrong_shape_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "set.pt"
    torch.save({"images": torch.zeros(3, 8, 8), "labels": torch.zeros(3), "weights": None}, path)
    with pytest.raises(ArtifactError, match=r"set\.pt: not a valid synthetic set"):
        SyntheticSet.load(path)


CLI_CASES = [
    (
        ["pipelines.distill", "--dataset", "digits", "--method", "wmdd", "--ipc", "ten"],
        "argument --ipc: expected a positive integer, as in params.yaml's benchmark.ipcs, got 'ten'",
    ),
    (
        ["pipelines.relabel", "--dataset", "digits", "--method", "wmdd", "--ipc", "0"],
        "argument --ipc: expected a positive integer",
    ),
    (
        ["pipelines.evaluate", "--dataset", "digits", "--method", "nope", "--ipc", "1"],
        "--method 'nope': not a key of params.yaml's methods",
    ),
    (["pipelines.teacher", "--dataset", "nope"], "unknown dataset profile 'nope'"),
    (
        ["pipelines.diagnose", "--dataset", "digits", "--method", "dm", "--ipc", "1"],
        "teacher.pt: cannot read this teacher checkpoint",
    ),
]


@pytest.mark.parametrize(
    ("args", "message"), CLI_CASES, ids=[c[0][0] + str(i) for i, c in enumerate(CLI_CASES)]
)
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data" / "digits").mkdir(parents=True)
    (tmp_path / "data" / "digits" / "manifest.json").write_text('{"mean": [0.5], "std": [0.5]}')
    torch.save(
        {
            "images": torch.zeros(1, 1, 4, 4),
            "labels": torch.zeros(1, dtype=torch.long),
            "weights": None,
        },
        _mk(tmp_path / "distilled/digits/dm/ipc1/set0/set.pt"),
    )
    _corrupt(tmp_path / "models/digits/teacher.pt", "truncated")
    proc = _cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run for bad input"


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --- params.yaml and dvc exp run -S --------------------------------------------------------


def test_params_yaml_has_no_anchors_aliases_or_merge_keys() -> None:
    events = list(yaml.parse((ROOT / "params.yaml").read_text()))
    assert not [e for e in events if isinstance(e, yaml.AliasEvent)]
    assert not [e for e in events if getattr(e, "anchor", None)]
    assert "<<:" not in (ROOT / "params.yaml").read_text()


@pytest.mark.parametrize(
    "override",
    [
        "methods.random.draw=3",
        "datasets.imagenette.teacher.lr=0.05",
        "benchmark.eval_seeds=[0,1,2,3,4]",
    ],
)
def test_exp_run_set_param_changes_exactly_the_overridden_key(
    tmp_path: Path, override: str
) -> None:
    """``dvc exp run -S`` rewrites params.yaml with DVC's own code (``apply_overrides``): the
    committed file is in the form DVC writes, so only the overridden key's lines change;
    every other value, every comment and the order stay as they are."""
    import difflib

    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    before_text = path.read_text()
    apply_overrides(path, [override])
    after_text = path.read_text()
    dotted, value = override.split("=")
    *parents, leaf = dotted.split(".")
    expected = yaml.safe_load(before_text)
    node = expected
    for part in parents:
        node = node[part]
    node[leaf] = yaml.safe_load(value)
    assert yaml.safe_load(after_text) == expected  # exactly that key changed
    diff = [
        line
        for line in difflib.unified_diff(before_text.splitlines(), after_text.splitlines(), n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    values = value.strip("[]").split(",")
    assert 0 < len(diff) <= 2 * len(values) + 2, diff  # the key's own lines, nothing else
    assert all(leaf in d or d[1:].strip().startswith("- ") for d in diff), diff


def test_committed_params_yaml_is_in_the_form_dvc_writes(tmp_path: Path) -> None:
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    seed = yaml.safe_load(path.read_text())["benchmark"]["seed"]
    apply_overrides(path, [f"benchmark.seed={seed}"])  # a no-op override
    assert path.read_text() == (ROOT / "params.yaml").read_text()


def test_no_stage_depends_on_runtime() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert not any(str(p).startswith("runtime") for p in stage.get("params", [])), name


# --- permissions ---------------------------------------------------------------------------


def test_outputs_get_the_users_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
        with atomic_file(tmp_path / "single.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "single.json").stat().st_mode & 0o777 == 0o644
