"""The prepare step's lazy path (ImageNet-1K is indexed, not cached) and the teacher's
evaluation over a lazy validation split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import torch_threads
from PIL import Image

from wmdd.config import DataConfig
from wmdd.data import load_prepared
from wmdd.data.lazy import gather, load_lazy, make_loader
from wmdd.data.prepare import prepare_dataset
from wmdd.models.accuracy import evaluate, evaluate_loader

WNIDS = {"n02000000": (250, 0, 0), "n01000000": (0, 250, 0), "n03000000": (0, 0, 250)}


def _imagenet_folders(root: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for wnid, colour in WNIDS.items():
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (14, 10), colour).save(
                    root / split / wnid / f"{wnid}_{split}_{i}.JPEG", format="PNG"
                )
    return root


def test_imagenet_prepares_as_an_index(tmp_path: Path) -> None:
    source = _imagenet_folders(tmp_path / "ilsvrc")
    out = tmp_path / "out"
    cfg = DataConfig(name="imagenet1k", source=str(source), resolution=8)
    manifest = prepare_dataset(cfg, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["index.pt", "manifest.json"]
    assert manifest["lazy"] and manifest["resolution"] == 8
    assert manifest["classes"] == sorted(WNIDS)
    assert manifest["counts"]["train"] == 9 and manifest["counts"]["val"] == 6
    assert manifest["config"]["source"] == str(source)
    with pytest.raises(ValueError, match="lazy index"):
        load_prepared(out)
    data = load_lazy(out, resolution=8)
    x, y = gather(data.train, data.train.indices_of_class(0))
    assert x.shape == (3, 3, 8, 8) and (y == 0).all()
    assert int(x[:, 1].min()) > 200  # sorted class 0 is n01000000, the green one


def test_imagenet_needs_a_local_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no public download"):
        prepare_dataset(DataConfig(name="imagenet1k", source="download", resolution=8), tmp_path)
    with pytest.raises(ValueError, match="ILSVRC2012"):
        prepare_dataset(DataConfig(name="imagenet1k", source="", resolution=8), tmp_path / "b")


def test_evaluate_loader_matches_in_memory_evaluation(tmp_path: Path) -> None:
    source = _imagenet_folders(tmp_path / "ilsvrc")
    prepare_dataset(DataConfig(name="imagenet1k", source=str(source), resolution=8), tmp_path / "o")
    data = load_lazy(tmp_path / "o", resolution=8)
    x, y = gather(data.val, range(len(data.val)))
    with torch_threads(1):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
        loader = make_loader(data.val, 4, workers=0, device=torch.device("cpu"))
        lazy = evaluate_loader(model, loader, device=torch.device("cpu"), normalize=data.normalize)
        eager = evaluate(
            model, x, y, batch_size=4, device=torch.device("cpu"), normalize=data.normalize
        )
    assert lazy == eager
