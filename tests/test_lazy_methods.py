"""Methods and the protocol on a lazy dataset (ImageNet-1K's form): same results as on the
same images cached as tensors, and the stages after ``prepare`` run on a lazy profile.

The source is a tiny ILSVRC2012 look-alike in the extracted-folders layout written by the
tests: four wnids, noise images saved losslessly (PNG bytes under ``.JPEG`` names, as
some real ImageNet files are), so decoding is exact.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import tiny_teacher
from PIL import Image
from torch import nn

from baselines.dm import DMConfig
from baselines.herding import HerdingConfig
from baselines.random_subset import RandomConfig
from baselines.sre2l import SRe2LConfig
from pipelines import diagnose, distill, evaluate, prepare, relabel, teacher, teacher_stats
from pipelines.registry import get_method
from wmdd.config import DataConfig, ModelConfig
from wmdd.data import LazySplitSet, PreparedData, load_data
from wmdd.data.imagenet import index_imagenet
from wmdd.data.lazy import CorruptImageError, load_lazy, make_loader
from wmdd.data.prepare import prepare_dataset
from wmdd.method.distill import WMDDConfig
from wmdd.models.accuracy import split_validator
from wmdd.synthesis.loop import SynthesisConfig
from wmdd.utils import read_json

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
WNIDS = ["n04000000", "n01000000", "n03000000", "n02000000"]  # created unsorted
TRAIN_PER_CLASS, VAL_PER_CLASS, SIDE, RES = 6, 3, 10, 8
TEACHER = ModelConfig("convnet", {"width": 8, "depth": 2, "norm": "batch"})


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _source(root: Path) -> Path:
    """``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` of noise images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for wnid in WNIDS:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{wnid}_{split}_{i}.JPEG").write_bytes(_png(rng))
    return root


@pytest.fixture(scope="module")
def lazy_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lazy")
    out = tmp / "index"
    out.mkdir()
    index_imagenet(_source(tmp / "src"), out, progress=False)
    return out


def _cached_copy(lazy: LazySplitSet) -> PreparedData:
    """The same images decoded once and held as tensors (what a small dataset caches)."""
    val_x = torch.stack([torch.from_numpy(lazy.val.decode(i)) for i in range(len(lazy.val))])
    return PreparedData(
        name=lazy.name,
        classes=lazy.classes,
        mean=lazy.mean,
        std=lazy.std,
        train_x=lazy.train_images(torch.arange(len(lazy.train))),
        train_y=lazy.train.labels.clone(),
        val_x=val_x,
        val_y=lazy.val.labels.clone(),
    )


def _teacher() -> nn.Module:
    return tiny_teacher(len(WNIDS), 3, RES, name=TEACHER.name, running_stats=0.1, **TEACHER.kwargs)


SYNTH = SynthesisConfig(iterations=2, lr=0.1, batch_budget=2, jitter=(-1, 1), init="noise")
CONFIGS = {
    "random": RandomConfig(),
    "herding": HerdingConfig(),
    "dm": DMConfig(iterations=2, real_per_class=4, embed_width=8, embed_depth=2),
    "sre2l": SRe2LConfig(synthesis=SYNTH),
    "wmdd": WMDDConfig(synthesis=SYNTH),
    "wmdd_real_init": WMDDConfig(synthesis=dataclasses.replace(SYNTH, init="real")),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_method_gives_the_same_set_lazy_or_cached(lazy_dir: Path, method: str) -> None:
    lazy = load_lazy(lazy_dir, resolution=RES, workers=2)
    cached = _cached_copy(lazy)
    spec = get_method(method.removesuffix("_real_init"))
    results = []
    for data in (lazy, cached):
        results.append(
            spec.fn(
                teacher=_teacher(),
                data=data,
                classes=range(2, 4),
                ipc=2,
                config=CONFIGS[method],
                seed=5,
                device=CPU,
                progress=False,
            )
        )
    got, want = results
    assert got.images.shape == (4, 3, RES, RES)
    assert torch.equal(got.images, want.images)
    assert torch.equal(got.labels, want.labels)
    assert got.labels.tolist() == [2, 2, 3, 3]
    if "train_indices" in want.aux:  # herding: positions in the train split, lazy or not
        assert torch.equal(got.aux["train_indices"], want.aux["train_indices"])
        picked = cached.train_x[want.aux["train_indices"]]
        assert torch.equal(cached.normalize(picked), want.images)


def test_random_decodes_only_the_images_it_picks(lazy_dir: Path, monkeypatch) -> None:
    lazy = load_lazy(lazy_dir, resolution=RES, workers=1)
    decoded: list[int] = []
    real_decode = lazy.train.decode
    monkeypatch.setattr(lazy.train, "decode", lambda i: decoded.append(i) or real_decode(i))
    get_method("random").fn(
        teacher=None,
        data=lazy,
        classes=range(4),
        ipc=2,
        config=RandomConfig(),
        seed=0,
        device=CPU,
    )
    assert len(decoded) == 8  # 2 of 6 per class, never a whole class


@pytest.mark.parametrize("batch_size", [2, 5, 64])
def test_split_validator_lazy_equals_cached(lazy_dir: Path, batch_size: int) -> None:
    lazy = load_lazy(lazy_dir, resolution=RES, workers=0)
    cached = _cached_copy(lazy)
    model = _teacher()
    got = split_validator(lazy, device=CPU)(model, batch_size)
    want = split_validator(cached, device=CPU)(model, batch_size)
    assert got == want
    assert 0.0 <= got.top1 <= got.top5 <= 100.0


def test_training_images_must_decode_even_with_skip_corrupt(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    bad = src / "train" / WNIDS[0] / f"{WNIDS[0]}_train_3.JPEG"
    bad.write_bytes(b"not an image")
    (src / "val" / WNIDS[0] / f"{WNIDS[0]}_val_1.JPEG").write_bytes(b"broken too")
    (tmp_path / "out").mkdir()
    index_imagenet(src, tmp_path / "out", progress=False)
    lazy = load_lazy(tmp_path / "out", resolution=RES, skip_corrupt=True, workers=1)
    cls = lazy.classes.index(WNIDS[0])
    with pytest.raises(CorruptImageError, match=rf"train/{WNIDS[0]}/{WNIDS[0]}_train_3\.JPEG"):
        lazy.train_of_class(cls)
    # Validation skips the unreadable val image (logged) and scores the other 11 ...
    assert sum(len(y) for _, y in make_loader(lazy.val, 4, workers=0, device=CPU)) == 11
    acc = split_validator(lazy, device=CPU)(_teacher(), 4)
    assert 0.0 <= acc.top1 <= 100.0
    # ... and without skip_corrupt names it and says how to skip it.
    strict = load_lazy(tmp_path / "out", resolution=RES, workers=1)
    with pytest.raises(CorruptImageError, match=r"_val_1\.JPEG.*set data\.skip_corrupt: true"):
        split_validator(strict, device=CPU)(_teacher(), 4)


def test_load_data_opens_either_form(lazy_dir: Path, tmp_path: Path) -> None:
    cfg = DataConfig(name="imagenet1k", source="", resolution=RES, workers=3)
    lazy = load_data(lazy_dir, cfg)
    assert isinstance(lazy, LazySplitSet) and lazy.workers == 3 and lazy.resolution == RES
    assert lazy.classes == sorted(WNIDS) and lazy.class_counts("val") == [VAL_PER_CLASS] * 4
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found"):
        load_data(tmp_path / "nothing", cfg)


# -- the stages on a lazy profile --------------------------------------------------------


def _params(tmp_path: Path, source: Path, weights: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    profile = copy.deepcopy(params["datasets"]["digits"])
    profile["budget"] = "test (lazy)"
    profile["data"] = {"name": "imagenet1k", "source": str(source), "resolution": RES}
    profile["teacher"] = {
        "model": {"name": TEACHER.name, "kwargs": TEACHER.kwargs},
        "pretrained": f"file:{weights}",
    }
    profile["protocol"]["soft"].update(epochs=2, eval_interval=1, batch_size=4)
    profile["protocol"]["hard"].update(epochs=2, batch_size=4)
    params["datasets"]["lazy"] = profile
    params["benchmark"].update(datasets=["lazy"], eval_seeds=[0], sets=1)
    params["methods"]["random"]["sets"] = 1
    params["methods"]["wmdd"]["overrides"]["lazy"] = {
        "synthesis": {"iterations": 2, "batch_budget": 8},
    }
    params["teacher_stats"] = {"batch_size": 4}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_stages_run_on_a_lazy_profile(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source = _source(tmp_path / "ilsvrc")
    torch.save(_teacher().state_dict(), tmp_path / "weights.pth")
    params = str(_params(tmp_path, source, tmp_path / "weights.pth"))
    common = ["--dataset", "lazy", "--params", params, "--no-progress"]
    prepare.main(common)
    assert read_json(tmp_path / "data/lazy/manifest.json")["lazy"] is True
    assert not (tmp_path / "data/lazy/data.pt").exists()
    teacher.main(common)
    teacher_stats.main(common)
    for method in ("random", "wmdd"):
        cell = [*common, "--method", method, "--ipc", "1"]
        distill.main(cell)
        relabel.main(cell)
        evaluate.main(cell)
        evaluate.main([*cell, "--protocol", "hard"])
        diagnose.main([a for a in cell if a != "--no-progress"])
        for protocol in ("soft", "hard"):
            result = read_json(tmp_path / f"results/lazy/{method}/ipc1/{protocol}/metrics.json")
            assert result["n"] == 1 and 0.0 <= result["top1_mean"] <= 100.0
        stats = read_json(tmp_path / f"results/lazy/{method}/ipc1/diagnostics.json")
        assert stats["images"] == 4
    # The teacher stage scored the loaded weights on the lazy val split: the same accuracy
    # as the weights on the same images cached as tensors.
    teacher_metrics = read_json(tmp_path / "models/lazy/metrics.json")
    cached = _cached_copy(load_lazy(tmp_path / "data/lazy", resolution=RES, workers=1))
    want = split_validator(cached, device=CPU)(_teacher(), 256)
    assert (teacher_metrics["val_top1"], teacher_metrics["val_top5"]) == (want.top1, want.top5)


def test_workers_do_not_change_the_prepared_manifest(lazy_dir: Path, tmp_path: Path) -> None:
    source = read_json(lazy_dir / "manifest.json")["source"]
    manifests = []
    for workers in (0, 3):
        out = tmp_path / f"w{workers}"
        cfg = DataConfig(name="imagenet1k", source=source, resolution=RES, workers=workers)
        prepare_dataset(cfg, out, progress=False)
        manifests.append((out / "manifest.json").read_bytes())
    assert manifests[0] == manifests[1]
