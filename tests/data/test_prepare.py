"""Tests of the prepare step (wmdd.data.prepare) for the digits and imagefolder sources, and
of the prepared form (wmdd.data.prepared)."""

from __future__ import annotations

import collections
import hashlib
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_prepared
from PIL import Image
from sklearn.datasets import load_digits
from torch.testing import assert_close

from wmdd.config import DataConfig
from wmdd.data import get_dataset, list_datasets, load_prepared
from wmdd.data.folder import LayoutError
from wmdd.data.prepare import prepare_dataset

# -- helpers -----------------------------------------------------------------------------

# Class folders created in unsorted order; the dataset's classes must come out sorted.
CLASS_COLOURS = {"zebra": (10, 200, 30), "ant": (250, 5, 120), "moth": (40, 90, 160)}
SORTED_CLASSES = ["ant", "moth", "zebra"]
SIZES = [(20, 14), (14, 20), (16, 16)]  # (width, height): wide, tall, square


def _prepare(cfg: DataConfig, tmp_path: Path, name: str = "out") -> tuple[dict, object]:
    out = tmp_path / name
    out.mkdir()
    manifest = prepare_dataset(cfg, out)
    return manifest, load_prepared(out, verify=True)


def _make_tree(
    root: Path,
    *,
    val_name: str = "val",
    counts: dict[str, int] | None = None,
    fmt: str = "PNG",
    classes: dict[str, tuple[int, int, int]] = CLASS_COLOURS,
    val_classes: list[str] | None = None,
) -> Path:
    """``root/train/<class>/*`` and ``root/<val_name>/<class>/*`` of solid-colour images."""
    counts = counts or {"train": 3, val_name: 2}
    suffix = ".png" if fmt == "PNG" else ".jpg"
    for split, n in counts.items():
        names = list(classes) if split == "train" or val_classes is None else val_classes
        for cls in names:
            colour = classes.get(cls, (0, 0, 0))
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = SIZES[i % len(SIZES)]
                img = Image.new("RGB", (w, h), colour)
                img.save(
                    folder / f"img{i}{suffix}",
                    format=fmt,
                    **({"quality": 95} if fmt == "JPEG" else {}),
                )
    return root


def _check_solid_colours(data, *, atol: int) -> None:
    """Every image of class k is the solid colour of class k (so labels and sorting agree)."""
    assert data.classes == SORTED_CLASSES
    for x, y in ((data.train_x, data.train_y), (data.val_x, data.val_y)):
        for k, name in enumerate(SORTED_CLASSES):
            imgs = x[y == k].int()  # (n_k, 3, R, R)
            assert len(imgs) > 0
            colour = torch.tensor(CLASS_COLOURS[name]).view(1, 3, 1, 1)
            assert int((imgs - colour).abs().max()) <= atol, name


def _folder_cfg(source: Path, **kw) -> DataConfig:
    return DataConfig(
        name="imagefolder", source=str(source), resolution=kw.pop("resolution", 8), **kw
    )


# -- registry ----------------------------------------------------------------------------


def test_registry_lists_builtins_and_rejects_unknown() -> None:
    assert {"digits", "imagefolder"} <= set(list_datasets())
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; registered: .*digits"):
        get_dataset("mnist")


# -- digits ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits16(tmp_path_factory) -> tuple[dict, object]:
    tmp = tmp_path_factory.mktemp("digits16")
    return _prepare(DataConfig(name="digits", resolution=16), tmp)


def test_digits_counts_and_stratified_split(digits16) -> None:
    manifest, data = digits16
    counts = manifest["counts"]
    assert counts["train"] + counts["val"] == 1797
    assert counts["val"] == 360  # sklearn: ceil(0.2 * 1797)
    assert len(data.train_y) == counts["train"] and len(data.val_y) == counts["val"]
    full = np.bincount(load_digits().target, minlength=10)
    assert [
        a + b for a, b in zip(counts["train_per_class"], counts["val_per_class"], strict=True)
    ] == full.tolist()
    for k in range(10):
        assert abs(counts["val_per_class"][k] - 0.2 * full[k]) <= 1, k
    assert data.val_y.bincount(minlength=10).tolist() == counts["val_per_class"]


def test_digits_shapes_and_manifest(digits16, tmp_path) -> None:
    manifest, data = digits16
    assert data.train_x.shape[1:] == (1, 16, 16) and data.train_x.dtype == torch.uint8
    assert data.val_x.shape[1:] == (1, 16, 16)
    assert data.train_y.dtype == torch.int64
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["class_index"] == {str(d): d for d in range(10)}
    assert manifest["channels"] == 1 and manifest["resolution"] == 16
    assert manifest["dataset"] == "digits"
    assert manifest["skipped"] == {"count": 0, "files": []}
    assert manifest["config"]["resolution"] == 16
    # Normalisation statistics are those of the training split ([0, 1] pixels).
    pixels = data.train_x.double() / 255
    assert_close(
        torch.tensor(manifest["mean"]), pixels.mean(dim=(0, 2, 3)).float(), atol=1e-6, rtol=0
    )
    assert_close(
        torch.tensor(manifest["std"]), pixels.std(dim=(0, 2, 3)).float(), atol=1e-6, rtol=0
    )


def test_manifest_checksum_is_sha256_of_data_file(tmp_path) -> None:
    manifest, _ = _prepare(DataConfig(name="digits", resolution=8), tmp_path)
    data_file = tmp_path / "out" / "data.pt"
    assert manifest["checksums"]["data.pt"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    data_file.write_bytes(data_file.read_bytes() + b"x")  # tampered
    with pytest.raises(ValueError, match="checksum"):
        load_prepared(tmp_path / "out", verify=True)


def test_digits_native_resolution_matches_sklearn(tmp_path) -> None:
    """At 8 px every (image, label) pair is sklearn's, pixel values mapped 0..16 -> 0..255."""
    _, data = _prepare(DataConfig(name="digits", resolution=0), tmp_path)
    assert data.resolution == 8
    bunch = load_digits()
    expected = np.round(bunch.images / 16 * 255).astype(np.uint8)
    want = collections.Counter(
        (img.tobytes(), int(y)) for img, y in zip(expected, bunch.target, strict=True)
    )
    got = collections.Counter(
        (img[0].numpy().tobytes(), int(y))
        for x, ys in ((data.train_x, data.train_y), (data.val_x, data.val_y))
        for img, y in zip(x, ys, strict=True)
    )
    assert got == want


def test_digits_split_is_deterministic_per_seed(digits16, tmp_path) -> None:
    _, data = digits16
    _, again = _prepare(DataConfig(name="digits", resolution=16), tmp_path, "again")
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.val_x, data.val_x)
    assert torch.equal(again.train_y, data.train_y) and torch.equal(again.val_y, data.val_y)
    _, other = _prepare(DataConfig(name="digits", resolution=16, split_seed=1), tmp_path, "other")
    assert len(other.val_y) == len(data.val_y)
    assert not torch.equal(other.val_x, data.val_x)


def test_digits_rejects_bad_source_and_fraction(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="no public download .* digits: builtin"):
        prepare_dataset(DataConfig(name="digits", source="download"), tmp_path / "out")
    with pytest.raises(ValueError, match="expected 'builtin'"):
        prepare_dataset(DataConfig(name="digits", source="/x.tgz"), tmp_path / "out")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_dataset(DataConfig(name="digits", val_fraction=0.0), tmp_path / "out")


# -- imagefolder: layouts ----------------------------------------------------------------


@pytest.mark.parametrize("val_name", ["val", "test"])
def test_imagefolder_directory(tmp_path, val_name) -> None:
    root = _make_tree(tmp_path / "src", val_name=val_name)
    manifest, data = _prepare(_folder_cfg(root), tmp_path)
    assert manifest["classes"] == SORTED_CLASSES
    assert manifest["class_index"] == {"ant": 0, "moth": 1, "zebra": 2}
    assert manifest["counts"]["train_per_class"] == [3, 3, 3]
    assert manifest["counts"]["val_per_class"] == [2, 2, 2]
    assert manifest["val_split_name"] == val_name
    assert manifest["source_sha256"] == ""
    assert data.train_x.shape == (9, 3, 8, 8) and data.val_x.shape == (6, 3, 8, 8)
    _check_solid_colours(data, atol=0)


def test_imagefolder_nested_in_one_top_level_dir(tmp_path) -> None:
    _make_tree(tmp_path / "src" / "imagenette2-160")
    manifest, data = _prepare(_folder_cfg(tmp_path / "src"), tmp_path)
    assert manifest["counts"]["train"] == 9 and manifest["counts"]["val"] == 6
    _check_solid_colours(data, atol=0)


def test_imagefolder_jpeg(tmp_path) -> None:
    root = _make_tree(tmp_path / "src", fmt="JPEG")
    _, data = _prepare(_folder_cfg(root, resolution=12), tmp_path)
    assert data.resolution == 12
    _check_solid_colours(data, atol=3)  # JPEG rounding of a solid colour


def test_imagefolder_resize_then_centre_crop(tmp_path) -> None:
    """A 40x10 image: red edges, green centre 20 px wide. Resized to 32x8 and centre-cropped
    to 8x8 it keeps only (an interior part of) the green centre."""
    root = _make_tree(tmp_path / "src")
    wide = np.zeros((10, 40, 3), np.uint8)
    wide[:] = (200, 0, 0)
    wide[:, 10:30] = (0, 180, 40)
    Image.fromarray(wide).save(root / "train" / "ant" / "wide.png")
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 10 wide, 40 tall
    Image.fromarray(tall).save(root / "train" / "ant" / "xtall.png")
    _, data = _prepare(_folder_cfg(root), tmp_path)
    ant = data.train_x[data.train_y == 0]  # files sorted: img0..2, wide, xtall
    assert len(ant) == 5
    green = torch.tensor([0, 180, 40], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8)
    assert torch.equal(ant[3], green)
    assert torch.equal(ant[4], green)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_imagefolder_archive(tmp_path, kind) -> None:
    tree = _make_tree(tmp_path / "tree" / "ds")
    archive = tmp_path / f"ds.{kind}"
    if kind == "tar.gz":
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(tree, arcname="ds")
    else:
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(tree.rglob("*")):
                zf.write(path, path.relative_to(tree.parent).as_posix())
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    manifest, data = _prepare(_folder_cfg(archive, sha256=digest.upper()), tmp_path)
    assert manifest["source_sha256"] == digest
    assert manifest["counts"]["train_per_class"] == [3, 3, 3]
    assert manifest["counts"]["val_per_class"] == [2, 2, 2]
    _check_solid_colours(data, atol=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.pt", "manifest.json"]


def test_archive_sha256_mismatch(tmp_path) -> None:
    tree = _make_tree(tmp_path / "tree" / "ds")
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree, arcname="ds")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"SHA-256 [0-9a-f]{64}, expected 0{64}"):
        prepare_dataset(_folder_cfg(archive, sha256="0" * 64), tmp_path / "out")


# -- imagefolder: errors -----------------------------------------------------------------


def test_corrupt_image_fails_naming_the_file(tmp_path) -> None:
    root = _make_tree(tmp_path / "src")
    bad = root / "train" / "moth" / "x.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"cannot read image .*train/moth/x\.jpg"):
        prepare_dataset(_folder_cfg(root), tmp_path / "out")


def test_corrupt_image_skipped_and_counted(tmp_path) -> None:
    root = _make_tree(tmp_path / "src")
    (root / "train" / "moth" / "x.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "val" / "ant" / "y.png").write_bytes(b"not a png")
    manifest, data = _prepare(_folder_cfg(root, skip_corrupt=True), tmp_path)
    assert manifest["skipped"]["count"] == 2
    assert sorted(manifest["skipped"]["files"]) == ["train/moth/x.jpg", "val/ant/y.png"]
    assert manifest["counts"]["train_per_class"] == [3, 3, 3]
    assert manifest["counts"]["val_per_class"] == [2, 2, 2]
    _check_solid_colours(data, atol=0)


def test_missing_source_names_the_path(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        prepare_dataset(_folder_cfg(missing), tmp_path / "out")


def test_missing_source_names_the_path_when_out_dir_is_new(tmp_path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        prepare_dataset(_folder_cfg(missing), tmp_path / "new_out")


def test_wrong_layout_says_expected_and_found(tmp_path) -> None:
    root = tmp_path / "src"
    (root / "training" / "a").mkdir(parents=True)
    (root / "README.txt").write_text("hi")
    (tmp_path / "out").mkdir()
    with pytest.raises(LayoutError) as info:
        prepare_dataset(_folder_cfg(root), tmp_path / "out")
    msg = str(info.value)
    assert "expected train/ and val/ (or test/)" in msg
    assert "found: ['README.txt', 'training/']" in msg


def test_train_without_val_is_a_layout_error(tmp_path) -> None:
    _make_tree(tmp_path / "src", counts={"train": 1})
    (tmp_path / "out").mkdir()
    with pytest.raises(LayoutError, match=r"found: \['train/'\]"):
        prepare_dataset(_folder_cfg(tmp_path / "src"), tmp_path / "out")


def test_non_archive_file_source(tmp_path) -> None:
    source = tmp_path / "data.txt"
    source.write_text("x")
    (tmp_path / "out").mkdir()
    with pytest.raises(LayoutError, match="not a supported archive"):
        prepare_dataset(_folder_cfg(source), tmp_path / "out")


def test_mismatched_class_folders_are_listed(tmp_path) -> None:
    root = _make_tree(tmp_path / "src", val_classes=["ant", "moth", "yak"])
    (tmp_path / "out").mkdir()
    with pytest.raises(LayoutError, match=r"missing \['zebra'\], extra \['yak'\]"):
        prepare_dataset(_folder_cfg(root), tmp_path / "out")


def test_empty_class_folder(tmp_path) -> None:
    root = _make_tree(tmp_path / "src")
    (root / "train" / "emu").mkdir()
    (root / "val" / "emu").mkdir()
    (tmp_path / "out").mkdir()
    with pytest.raises(LayoutError, match=r"train/emu: expected images"):
        prepare_dataset(_folder_cfg(root), tmp_path / "out")


def test_imagefolder_needs_a_resolution(tmp_path) -> None:
    root = _make_tree(tmp_path / "src")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="data.resolution"):
        prepare_dataset(_folder_cfg(root, resolution=0), tmp_path / "out")


# -- the prepared form -------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_normalize_denormalize_round_trip(channels) -> None:
    data = tiny_prepared(channels=channels, res=8)
    x = data.train_x[:5]
    z = data.normalize(x)
    assert z.dtype == torch.float32 and z.shape == x.shape
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    assert_close(z, (x.double() / 255 - mean.double()) / std.double(), check_dtype=False)
    assert_close(data.denormalize(z), x.float() / 255)
    # denormalize clamps to [0, 1]
    assert_close(
        data.denormalize(torch.full((1, channels, 2, 2), 1e3)), torch.ones(1, channels, 2, 2)
    )


def test_pixel_bounds() -> None:
    data = tiny_prepared(channels=3)
    lo, hi = data.pixel_bounds()
    assert lo.shape == (1, 3, 1, 1) and hi.shape == (1, 3, 1, 1)
    black = torch.zeros(1, 3, 1, 1, dtype=torch.uint8)
    white = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert_close(lo, data.normalize(black))
    assert_close(hi, data.normalize(white))
    assert_close(data.denormalize(lo), torch.zeros(1, 3, 1, 1))
    assert_close(data.denormalize(hi), torch.ones(1, 3, 1, 1))


def test_prepared_properties() -> None:
    data = tiny_prepared(num_classes=3, per_class=[2, 5, 4], channels=1, res=8)
    assert data.num_classes == 3 and data.channels == 1 and data.resolution == 8
    assert data.class_counts("train") == [2, 5, 4]
    assert data.class_counts("val") == [3, 3, 3]
    c1 = data.train_of_class(1)
    assert torch.equal(c1, data.train_x[data.train_y == 1]) and len(c1) == 5
