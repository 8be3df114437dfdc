"""Bad input gets a clear error naming what is wrong, and leaves no partial output."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import diagnose, distill, prepare
from wmdd.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _write_params(tmp_path: Path, mutate) -> Path:
    params = copy.deepcopy(PARAMS)
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _folder_profile(params: dict, source: str) -> None:
    profile = copy.deepcopy(params["datasets"]["digits"])
    profile["data"] = {"name": "imagefolder", "source": source, "resolution": 16}
    params["datasets"]["folder"] = profile


def _leftovers(tmp_path: Path) -> list[str]:
    """Anything a stage left under the output roots (including hidden temp dirs)."""
    roots = [tmp_path / d for d in ("data", "distilled")]
    return sorted(str(p.relative_to(tmp_path)) for r in roots if r.exists() for p in r.rglob("*"))


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_unknown_key_names_it(in_tmp: Path) -> None:
    path = _write_params(in_tmp, lambda p: p["datasets"]["digits"]["teacher"].update(epochz=3))
    with pytest.raises(ConfigError, match=r"datasets\.digits\.teacher.*'epochz'"):
        prepare.main(["--dataset", "digits", "--params", str(path)])
    assert _leftovers(in_tmp) == []


def test_wrong_type_names_key_and_expectation(in_tmp: Path) -> None:
    path = _write_params(in_tmp, lambda p: p["datasets"]["digits"]["teacher"].update(epochs="ten"))
    with pytest.raises(ConfigError, match=r"datasets\.digits\.teacher\.epochs: expected int"):
        prepare.main(["--dataset", "digits", "--params", str(path)])


@pytest.mark.parametrize(
    "command",
    [
        ["pipelines.check"],
        ["pipelines.distill", "--dataset", "digits", "--method", "random", "--ipc", "1"],
    ],
    ids=["check", "distill"],
)
def test_cli_exits_2_with_one_clear_line(in_tmp: Path, command: list[str]) -> None:
    """A typo in a method section: `check` and the method's own distill stage both refuse it
    before any work (no data is prepared here), in one line, exit code 2."""
    path = _write_params(in_tmp, lambda p: p["methods"]["random"].update(draws=1))
    env = {k: v for k, v in os.environ.items() if k != "WMDD_TRACEBACK"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", *command, "--params", str(path)],
        cwd=in_tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "methods.random" in proc.stderr and "'draws'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (in_tmp / "mlflow.db").exists(), "no MLflow run for a config error"


def test_check_accepts_the_committed_params() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.check"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "methods parse" in proc.stderr


def test_missing_dataset_path(in_tmp: Path) -> None:
    path = _write_params(in_tmp, lambda p: _folder_profile(p, "no/such/archive.tgz"))
    with pytest.raises(FileNotFoundError, match=r"no/such/archive\.tgz"):
        prepare.main(["--dataset", "folder", "--params", str(path), "--no-progress"])
    assert _leftovers(in_tmp) == []


def test_corrupt_image_names_file(in_tmp: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = in_tmp / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )
    (in_tmp / "imgs" / "train" / "b" / "broken.jpg").write_bytes(b"not an image at all")
    path = _write_params(in_tmp, lambda p: _folder_profile(p, str(in_tmp / "imgs")))
    with pytest.raises(ValueError, match=r"train/b/broken\.jpg"):
        prepare.main(["--dataset", "folder", "--params", str(path), "--no-progress"])
    assert _leftovers(in_tmp) == []


def test_ipc_larger_than_class(in_tmp: Path) -> None:
    path = _write_params(in_tmp, lambda p: None)
    prepare.main(["--dataset", "digits", "--params", str(path), "--no-progress"])
    with pytest.raises(
        ValueError, match=r"IPC 1000 is larger than the \d+ training images of class"
    ):
        distill.main(
            [
                "--dataset",
                "digits",
                "--method",
                "random",
                "--ipc",
                "1000",
                "--params",
                str(path),
                "--no-progress",
            ]
        )
    assert not (in_tmp / "distilled" / "digits" / "random" / "ipc1000").exists()
    assert [p for p in (in_tmp / "distilled").rglob("*") if p.is_file()] == []
    assert not list((in_tmp / "distilled").rglob(".ipc1000.tmp-*"))


def test_diagnose_without_prepared_data_names_the_manifest(in_tmp: Path) -> None:
    path = _write_params(in_tmp, lambda p: None)
    with pytest.raises(FileNotFoundError, match=r"data/digits/manifest\.json not found"):
        diagnose.main(
            ["--dataset", "digits", "--method", "dm", "--ipc", "1", "--params", str(path)]
        )
    assert not (in_tmp / "results").exists()
