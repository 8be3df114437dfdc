"""Several distilled sets per cell (``benchmark.sets``): the distill stage writes one folder per
set, each from its own seed, and a set finished before a failure is not distilled again."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

import baselines.random_subset as random_module
from pipelines import distill, prepare
from pipelines.registry import set_seed
from wmdd.synthetic_set import SyntheticSet
from wmdd.utils import read_json

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = copy.deepcopy(PARAMS)
    params["methods"]["random"]["sets"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main(["--dataset", "digits", "--no-progress"])
    return tmp_path


CELL = ["--dataset", "digits", "--method", "random", "--ipc", "2", "--no-progress"]


def test_every_set_has_its_folder_and_its_own_seed(workspace: Path) -> None:
    distill.main(CELL)
    cell = workspace / "distilled/digits/random/ipc2"
    assert sorted(p.name for p in cell.iterdir()) == ["set0", "set1", "set2"]
    sets = [SyntheticSet.load(cell / f"set{s}" / "set.pt") for s in range(3)]
    seed = PARAMS["benchmark"]["seed"]
    for s in range(3):
        meta = read_json(cell / f"set{s}" / "meta.json")
        assert (meta["set"], meta["seed"]) == (s, set_seed(seed, "digits", "random", s))
        assert {"set.pt", "preview.png", "meta.json"} <= {
            p.name for p in (cell / f"set{s}").iterdir()
        }
    assert not torch.equal(sets[0].images, sets[1].images)
    assert not torch.equal(sets[1].images, sets[2].images)
    assert all(torch.equal(x.labels, sets[0].labels) for x in sets)


def test_a_failure_keeps_the_finished_sets_and_writes_nothing(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = random_module.random_subset
    last = set_seed(PARAMS["benchmark"]["seed"], "digits", "random", 2)
    calls: list[int] = []

    def failing_on_the_last_set(**kwargs):
        calls.append(kwargs["seed"])
        if kwargs["seed"] == last:
            raise ValueError("set 2 failed")
        return original(**kwargs)

    monkeypatch.setattr(random_module, "random_subset", failing_on_the_last_set)
    with pytest.raises(ValueError, match="set 2 failed"):
        distill.main(CELL)
    assert not (workspace / "distilled/digits/random/ipc2").exists()  # all sets or nothing
    assert len(calls) == 3
    calls.clear()
    monkeypatch.setattr(random_module, "random_subset", lambda **kw: calls.append(kw["seed"]) or original(**kw))  # fmt: skip
    distill.main(CELL)
    assert calls == [last]  # sets 0 and 1 were kept, only set 2 ran again
    again = workspace / "distilled/digits/random/ipc2"
    assert sorted(p.name for p in again.iterdir()) == ["set0", "set1", "set2"]
