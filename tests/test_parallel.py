"""The parallel runner (``wmdd.scale``, ``pipelines.parallel``) and class-range shards.

The runner is tested on a small DVC project of plain shell stages (no torch: seconds) run
by a real local Dask cluster, against ``dvc repro`` of the same project; the shards of
every method against one unsharded run on tiny data. The digits pipeline itself runs in
parallel in ``tests/test_pipeline_e2e.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_prepared, tiny_teacher
from torch.testing import assert_close

from pipelines.registry import aligned_ranges, get_method, method_config
from wmdd.checkpoint import StageCheckpoints
from wmdd.config import load_params
from wmdd.synthetic_set import distill_classes, merge_shards

distributed = pytest.importorskip("distributed", reason="the cluster extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# a -> b -> c, and d on its own; e fails when FAIL is set in params.yaml, f depends on e.
DVC_YAML = """
stages:
  a:
    cmd: python -c "import time; time.sleep(0.5); open('a.txt','w').write('a')"
    outs: [a.txt]
  b:
    cmd: python -c "open('b.txt','w').write(open('a.txt').read() + 'b')"
    deps: [a.txt]
    outs: [b.txt]
  c:
    cmd: python -c "open('c.txt','w').write(open('b.txt').read() + 'c')"
    deps: [b.txt]
    params: [n]
    outs: [c.txt]
  d:
    cmd: python -c "open('d.txt','w').write('d')"
    outs: [d.txt]
  e:
    cmd: python -c "import sys, yaml; sys.exit(3 if yaml.safe_load(open('params.yaml'))['fail'] else 0); " && echo e > e.txt
    outs: [e.txt]
  f:
    cmd: cat e.txt > f.txt
    deps: [e.txt]
    outs: [f.txt]
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def _project(path: Path, *, fail: bool = False) -> Path:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=path, check=True, env=_env())
    (path / "dvc.yaml").write_text(DVC_YAML)
    (path / "params.yaml").write_text(f"n: 1\nfail: {str(fail).lower()}\n")
    return path


def _parallel(path: Path, monkeypatch: pytest.MonkeyPatch, **kw):
    from wmdd.scale.runner import PipelineRunner

    monkeypatch.chdir(path)
    monkeypatch.setenv("PATH", _env()["PATH"])
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        return PipelineRunner(path, client, **kw).run()


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    path = _project(tmp_path_factory.mktemp("seq") / "p")
    proc = subprocess.run(
        [str(BIN / "dvc"), "repro"], cwd=path, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return path


def test_parallel_run_writes_what_dvc_repro_writes(
    sequential: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _project(tmp_path / "p")
    outcome = _parallel(path, monkeypatch)
    assert outcome.ok and sorted(outcome.ran) == list("abcdef")
    assert (path / "dvc.lock").read_text() == (sequential / "dvc.lock").read_text()
    for name in "abcdef":
        assert (path / f"{name}.txt").read_bytes() == (sequential / f"{name}.txt").read_bytes()
    status = subprocess.run(
        [str(BIN / "dvc"), "status", "--json"], cwd=path, env=_env(), capture_output=True, text=True
    )
    assert status.stdout.strip() == "{}", status.stdout
    # A second run does nothing; a params change re-runs exactly its stage.
    again = _parallel(path, monkeypatch)
    assert again.ran == [] and sorted(again.skipped) == list("abcdef")
    (path / "params.yaml").write_text("n: 2\nfail: false\n")
    changed = _parallel(path, monkeypatch)
    assert changed.ran == ["c"]


def test_a_failing_stage_is_named_and_nothing_is_committed_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _project(tmp_path / "p", fail=True)
    outcome = _parallel(path, monkeypatch)
    assert not outcome.ok
    assert list(outcome.failed) == ["e"] and "exited 3" in outcome.failed["e"]
    assert outcome.blocked == ["f"]
    assert sorted(outcome.ran) == list("abcd")
    lock = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == list("abcd")  # finished stages committed, e and f not
    assert not (path / "f.txt").exists()
    # Fixed and run again: only e and f run.
    (path / "params.yaml").write_text("n: 1\nfail: false\n")
    second = _parallel(path, monkeypatch)
    assert second.ok and sorted(second.ran) == ["e", "f"]


def test_cli_exits_non_zero_naming_the_failed_stage(tmp_path: Path) -> None:
    path = _project(tmp_path / "p", fail=True)
    (path / "params.yaml").write_text("n: 1\nfail: true\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.parallel",
            "--workers",
            "2",
            "--params",
            str(ROOT / "params.yaml"),
        ],
        cwd=path,
        env={**_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stage e failed" in proc.stderr and "exited 3" in proc.stderr


def test_missing_engine_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from wmdd.scale import runner

    real_import = builtins.__import__

    def no_dask(name, *args, **kwargs):
        if name.startswith("distributed"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(runner.EngineMissingError, match=r"pip install -e '\.\[cluster\]'"):
        runner.require_dask()


# --- class-range shards ---------------------------------------------------------------


def test_aligned_ranges_tile_the_classes_on_group_boundaries() -> None:
    assert aligned_ranges(10, 1, 2) == [range(0, 5), range(5, 10)]
    assert aligned_ranges(10, 4, 2) == [range(0, 8), range(8, 10)]
    assert aligned_ranges(200, 10, 3) == [range(0, 70), range(70, 140), range(140, 200)]
    assert aligned_ranges(3, 10, 4) == [range(0, 3)]
    for n, g, k in [(17, 3, 4), (100, 100, 2), (7, 1, 7)]:
        ranges = aligned_ranges(n, g, k)
        assert ranges[0].start == 0 and ranges[-1].stop == n and len(ranges) <= k
        assert all(a.stop == b.start and b.start % g == 0 for a, b in pairwise(ranges))


METHOD_OVERRIDES = {
    "wmdd": {"synthesis": {"iterations": 2, "batch_budget": 2, "lr": 0.1}},
    "sre2l": {"synthesis": {"iterations": 2, "batch_budget": 2, "lr": 0.1}},
    "dm": {"iterations": 3, "real_per_class": 4, "embed_width": 4, "embed_depth": 2},
    "herding": {},
    "random": {},
}


@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_class_shards_merged_equal_one_unsharded_run(tmp_path: Path, method: str) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    section = raw["methods"][method]
    for key, value in METHOD_OVERRIDES[method].items():
        section[key] = {**section[key], **value} if isinstance(value, dict) else value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    spec, config = get_method(method), method_config(params, method, "digits")
    data = tiny_prepared(num_classes=6, per_class=8, res=8, seed=2)
    teacher = tiny_teacher(6, 3, 8, calibrate=data.normalize(data.train_x))
    common = dict(
        teacher=teacher,
        data=data,
        config=config,
        seed=5,
        device=torch.device("cpu"),
        progress=False,
    )
    ipc = 2

    def run(classes: range, directory: Path):
        resume = StageCheckpoints(directory, every_seconds=-1)
        return distill_classes(
            spec.fn, classes=classes, num_classes=6, ipc=ipc, resume=resume, method=method, **common
        )

    whole, _ = run(range(6), tmp_path / "whole")
    group = 2 if method in ("wmdd", "sre2l") else 1  # batch_budget 2 (WMDD: 2 // ipc -> 1)
    shards = aligned_ranges(6, group, 3)
    assert len(shards) == 3
    for r in shards:
        part, _ = run(r, tmp_path / "sharded")
        assert part is None
    merged, metrics = run(range(6), tmp_path / "sharded")
    assert metrics["shards"] == 3
    assert torch.equal(merged.images, whole.images) and torch.equal(merged.labels, whole.labels)
    whole.aux.pop("timings", None)
    for key, value in whole.aux.items():
        if method == "dm" and key == "loss":  # summed over classes in another order
            assert_close(merged.aux[key], value, rtol=1e-5, atol=1e-6)
        else:
            assert _same(merged.aux[key], value), key
    assert set(merged.aux) == set(whole.aux)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_shards_that_do_not_tile_are_refused() -> None:
    data = tiny_prepared(num_classes=4, per_class=3, res=8)
    from baselines.random_subset import RandomConfig, random_subset

    def part(r: range):
        return r, random_subset(
            teacher=None,
            data=data,
            classes=r,
            ipc=1,
            config=RandomConfig(),
            seed=0,
            device="cpu",
            progress=False,
        )

    with pytest.raises(ValueError, match="gap at class 2"):
        merge_shards([part(range(0, 2)), part(range(3, 4))], 4, 1)
    with pytest.raises(ValueError, match="overlap at class 2"):
        merge_shards([part(range(0, 2)), part(range(1, 4))], 4, 1)
    with pytest.raises(ValueError, match="cover classes 0:3, expected 0:4"):
        merge_shards([part(range(0, 3))], 4, 1)
