"""Tests of strict pretrained-weight loading (wmdd.models.pretrained); offline, no real downloads.

torchvision's real ResNet-18 file is never present here: a seeded ``torchvision.models.resnet18``
saved like it (102 tensors: no BatchNorm ``num_batches_tracked``, a pre-0.4.1 file) under its
torch-hub-style name (``resnet18-<first 8 hex of its SHA-256>.pth``) stands in for it, and the
URL/file name the resolver returns are monkeypatched where a test needs them.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import tiny_prepared
from torch import nn
from torch.testing import assert_close

from wmdd.config import ModelConfig
from wmdd.models import pretrained
from wmdd.models.pretrained import (
    KNOWN_SHA256,
    PretrainedLoadError,
    PretrainedNotFoundError,
    load_pretrained,
)
from wmdd.models.registry import TimmModel, create_model
from wmdd.models.teacher import save_teacher

TV_SPEC = "torchvision:resnet18.IMAGENET1K_V1"
TV_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
TV_NAME = "resnet18-f37072fd.pth"


@pytest.fixture(autouse=True)
def _empty_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Points torch hub at an empty directory so a real cache never satisfies a test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@dataclass(frozen=True)
class TvFile:
    """A stand-in for torchvision's ResNet-18 file and the model it was saved from."""

    reference: nn.Module  # torchvision.models.resnet18, eval mode
    path: Path  # resnet18-<8 hex>.pth
    sha256: str

    def legacy_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved tensors: the reference's state dict without num_batches_tracked."""
        return {
            k: v
            for k, v in self.reference.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory: pytest.TempPathFactory) -> TvFile:
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=1000).eval()
    folder = tmp_path_factory.mktemp("tv")
    tmp = folder / "resnet18.pth"
    torch.save(
        {k: v for k, v in reference.state_dict().items() if "num_batches_tracked" not in k}, tmp
    )
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = tmp.rename(folder / f"resnet18-{digest[:8]}.pth")
    return TvFile(reference=reference, path=path, sha256=digest)


def _imagenet_resnet18(**kwargs) -> nn.Module:
    kwargs = {"num_classes": 1000, "stem": "imagenet"} | kwargs
    return create_model("resnet18", in_chans=3, resolution=224, **kwargs).eval()


def _remote_for(tv: TvFile, url: str = "http://127.0.0.1:9/unused") -> pretrained._Remote:
    return pretrained._Remote(url, tv.path.name, tv.sha256, tv.path.stat().st_size)


def _patch_resolver(monkeypatch: pytest.MonkeyPatch, remote: pretrained._Remote) -> None:
    monkeypatch.setattr(
        pretrained, "_resolve_torchvision", lambda name: ("resnet18.IMAGENET1K_V1", remote)
    )


def _assert_same_outputs(model: nn.Module, reference: nn.Module, chans: int = 3) -> None:
    x = torch.randn(2, chans, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


# -- spec grammar and torchvision resolution -----------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("resnet18", r"expected '<source>:<name>' with source one of torchvision, file, timm"),
        ("hf:resnet18", r"source one of torchvision, file, timm"),
        ("file:", r"source one of"),
        ("torchvision:resnet18", r"expected '<arch>\.<WEIGHTS>'"),
        ("torchvision:resnet18.IMAGENET9K", r"ResNet18_Weights has no 'IMAGENET9K'.*IMAGENET1K_V1"),
        ("torchvision:resnet1800.IMAGENET1K_V1", r"unknown torchvision model 'resnet1800'"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, match: str) -> None:
    model = create_model("tiny_cnn", num_classes=3, in_chans=3, resolution=8)
    with pytest.raises(ValueError, match=match):
        load_pretrained(spec, model, allow_download=False)


def test_torchvision_resolution_uses_the_weights_enum() -> None:
    name, remote = pretrained._resolve_torchvision("resnet18.IMAGENET1K_V1")
    assert name == "resnet18.IMAGENET1K_V1"
    assert (remote.url, remote.file_name) == (TV_URL, TV_NAME)
    assert remote.sha256 is not None and remote.sha256.startswith("f37072fd")
    assert (remote.sha256, remote.size) == KNOWN_SHA256[TV_NAME]
    assert pretrained._resolve_torchvision("resnet18.DEFAULT") == (name, remote)


def test_torchvision_file_with_wrong_content_is_rejected(tv_file: TvFile, tmp_path: Path) -> None:
    """A file named resnet18-f37072fd.pth whose SHA-256 is not f37072fd...: loud, no load."""
    shutil.copy(tv_file.path, tmp_path / TV_NAME)
    model = _imagenet_resnet18()
    before = model.conv1.weight.clone()
    with pytest.raises(PretrainedLoadError, match=rf"sha256 {tv_file.sha256}.*f37072fd"):
        load_pretrained(TV_SPEC, model, weights_dir=tmp_path, allow_download=False)
    assert torch.equal(model.conv1.weight, before)


def test_hash_prefix_is_checked_when_no_full_digest_is_recorded(
    tv_file: TvFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong_prefix = "0" * 8 if not tv_file.sha256.startswith("0" * 8) else "1" * 8
    name = f"resnet18-{wrong_prefix}.pth"
    shutil.copy(tv_file.path, tmp_path / name)
    _patch_resolver(monkeypatch, pretrained._Remote("http://127.0.0.1:9/x", name, None, None))
    with pytest.raises(PretrainedLoadError, match=rf"hash prefix {wrong_prefix}"):
        load_pretrained(TV_SPEC, _imagenet_resnet18(), weights_dir=tmp_path, allow_download=False)


@pytest.mark.parametrize("where", ["weights_dir", "torch_hub"])
def test_torchvision_spec_finds_and_loads_the_file(
    where: str, tv_file: TvFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_resolver(monkeypatch, _remote_for(tv_file))
    folder = tmp_path / "w" if where == "weights_dir" else pretrained.hub_checkpoint_dir()
    assert str(folder).startswith(str(tmp_path))  # the hub dir is the test's own
    folder.mkdir(parents=True)
    shutil.copy(tv_file.path, folder)
    model = _imagenet_resnet18()
    weights_dir = tmp_path / "w" if where == "weights_dir" else None
    info = load_pretrained(TV_SPEC, model, weights_dir=weights_dir, allow_download=False)
    assert info.spec == TV_SPEC
    assert info.path == folder / tv_file.path.name
    assert info.sha256 == tv_file.sha256
    assert info.num_tensors == len(tv_file.legacy_state_dict()) == 102 and info.remap == ()
    _assert_same_outputs(model, tv_file.reference)


def test_file_spec_loads_a_torchvision_state_dict_strictly(tv_file: TvFile) -> None:
    """Our resnet18 (imagenet stem) takes torchvision's keys as they are: same outputs."""
    model = _imagenet_resnet18()
    info = load_pretrained(f"file:{tv_file.path}", model)
    assert info.spec == f"file:{tv_file.path.resolve()}"
    assert info.path == tv_file.path.resolve()
    assert info.sha256 == tv_file.sha256 and info.sha256[:8] in tv_file.path.name
    assert info.num_tensors == 102 and info.remap == ()
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert info.filled == tuple(f"{n}.num_batches_tracked" for n in bns) and len(bns) == 20
    for k, v in tv_file.reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k  # the counters are 0 in both
    _assert_same_outputs(model, tv_file.reference)


def test_modern_file_with_counters_loads_them(tv_file: TvFile, tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in tv_file.reference.state_dict().items()}
    state["bn1.num_batches_tracked"].fill_(7)
    torch.save(state, tmp_path / "modern.pth")
    model = _imagenet_resnet18()
    info = load_pretrained(f"file:{tmp_path / 'modern.pth'}", model)
    assert (info.num_tensors, info.filled) == (122, ())
    assert int(model.bn1.num_batches_tracked) == 7


def test_file_with_some_counters_must_have_all(tv_file: TvFile, tmp_path: Path) -> None:
    state = dict(tv_file.reference.state_dict())
    del state["layer4.1.bn2.num_batches_tracked"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(
        PretrainedLoadError, match=r"1 missing key\(s\): layer4\.1\.bn2\.num_batches_tracked$"
    ):
        load_pretrained(f"file:{tmp_path / 'partial.pth'}", _imagenet_resnet18())


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(PretrainedNotFoundError, match=r"no file at .*nothing\.pth"):
        load_pretrained(f"file:{tmp_path / 'nothing.pth'}", _imagenet_resnet18())


# -- strict loading: every mismatch is named ------------------------------------------------


def _mutated(state: dict, mutation: str) -> dict:
    state = dict(state)
    if mutation == "rename":
        state["layer1.0.conv1.weights"] = state.pop("layer1.0.conv1.weight")
    elif mutation == "drop":
        del state["bn1.running_mean"]
    return state


@pytest.mark.parametrize(
    ("mutation", "model_kwargs", "match"),
    [
        (
            "rename",
            {},
            r"1 missing key\(s\): layer1\.0\.conv1\.weight; "
            r"1 unexpected key\(s\): layer1\.0\.conv1\.weights",
        ),
        ("drop", {}, r"1 missing key\(s\): bn1\.running_mean(;|$)"),
        (
            "none",
            {"num_classes": 10},
            r"2 shape mismatch\(es\): fc\.weight: checkpoint \(1000, 512\) vs model \(10, 512\), "
            r"fc\.bias: checkpoint \(1000,\) vs model \(10,\).*own label space.*num_classes=1000",
        ),
        (
            "none",
            {"stem": "small"},
            r"1 shape mismatch\(es\): conv1\.weight: checkpoint \(64, 3, 7, 7\) "
            r"vs model \(64, 3, 3, 3\)$",
        ),
    ],
)
def test_mismatches_fail_loudly_and_name_the_key(
    mutation: str, model_kwargs: dict, match: str, tv_file: TvFile, tmp_path: Path
) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(_mutated(tv_file.legacy_state_dict(), mutation), path)
    model = _imagenet_resnet18(**model_kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedLoadError, match=match):
        load_pretrained(f"file:{path}", model)
    for k, v in model.state_dict().items():  # nothing was partially loaded
        assert torch.equal(v, before[k]), k


def test_long_key_lists_are_truncated_with_counts(tv_file: TvFile) -> None:
    model = create_model("tiny_cnn", num_classes=3, in_chans=3, resolution=8)
    n_missing = len(model.state_dict()) - 2  # its 2 BN counters are filled (legacy file)
    with pytest.raises(PretrainedLoadError) as err:
        load_pretrained(f"file:{tv_file.path}", model)
    message = str(err.value)
    assert message.startswith(f"pretrained weights file:{tv_file.path} do not fit the TinyCNN")
    assert f"{n_missing} missing key(s): features.0.weight" in message
    assert "102 unexpected key(s): conv1.weight, bn1.weight" in message
    assert "... (92 more)" in message


# -- checkpoint containers, module. prefix, remap ------------------------------------------


def _tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", num_classes=4, in_chans=3, resolution=16, width=4)
    with torch.no_grad():  # move BN running statistics off their defaults
        model.train()(torch.randn(8, 3, 16, 16))
    return model.eval()


def _assert_same_state(model: nn.Module, reference: nn.Module) -> None:
    ref = reference.state_dict()
    assert list(model.state_dict()) == list(ref)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.parametrize("container", ["raw", "state_dict", "model", "weights"])
def test_state_dict_containers(container: str, tmp_path: Path) -> None:
    source, target = _tiny(0), _tiny(1)
    sd = source.state_dict()
    torch.save(sd if container == "raw" else {container: sd, "epoch": 3}, tmp_path / "c.pt")
    info = load_pretrained(f"file:{tmp_path / 'c.pt'}", target)
    assert info.num_tensors == len(sd)
    _assert_same_state(target, source)


def test_project_teacher_checkpoint_loads(tmp_path: Path) -> None:
    """save_teacher's format: weights under ``state_dict``, the model config under ``model``."""
    source, target = _tiny(0), _tiny(1)
    cfg = ModelConfig("tiny_cnn", {"width": 4})
    save_teacher(source, tmp_path / "teacher.pt", model_cfg=cfg, data=tiny_prepared(), extra={})
    load_pretrained(f"file:{tmp_path / 'teacher.pt'}", target)
    _assert_same_state(target, source)


def test_checkpoint_without_a_state_dict_lists_its_keys(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "model": {"name": "tiny_cnn"}}, tmp_path / "c.pt")
    with pytest.raises(PretrainedLoadError, match=r"no state dict found.*keys: epoch, model"):
        load_pretrained(f"file:{tmp_path / 'c.pt'}", _tiny(0))


def test_module_prefix_is_stripped_and_reported(tmp_path: Path) -> None:
    source, target = _tiny(0), _tiny(1)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    info = load_pretrained(f"file:{tmp_path / 'ddp.pt'}", target)
    assert info.remap == (("module.", ""),)
    _assert_same_state(target, source)


def test_explicit_remap_renames_prefixes(tmp_path: Path) -> None:
    source, target = _tiny(0), _tiny(1)
    renamed = {
        k.replace("features.", "body.").replace("classifier.", "head.fc."): v
        for k, v in source.state_dict().items()
    }
    torch.save({"module." + k: v for k, v in renamed.items()}, tmp_path / "c.pt")
    remap = {"body.": "features.", "head.fc.": "classifier.", "head.": "never."}
    with pytest.raises(ValueError, match=r"remap prefixes \['head\.'\] match no checkpoint key"):
        load_pretrained(f"file:{tmp_path / 'c.pt'}", target, remap=remap)
    del remap["head."]
    info = load_pretrained(f"file:{tmp_path / 'c.pt'}", target, remap=remap)
    assert info.remap == (("module.", ""), ("body.", "features."), ("head.fc.", "classifier."))
    _assert_same_state(target, source)


def test_remap_that_merges_keys_is_an_error(tmp_path: Path) -> None:
    source = _tiny(0)
    state = dict(source.state_dict())
    state["old.classifier.bias"] = state["classifier.bias"]
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"two checkpoint keys to 'classifier\.bias'"):
        load_pretrained(f"file:{tmp_path / 'c.pt'}", _tiny(1), remap={"old.": ""})


def test_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source, target = _tiny(0), _tiny(1)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    info = load_pretrained(f"file:{tmp_path / 'w.safetensors'}", target)
    assert info.sha256 == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    _assert_same_state(target, source)


# -- missing files and downloads ------------------------------------------------------------


def test_offline_torchvision_error_names_file_url_and_dirs(tmp_path: Path) -> None:
    weights_dir = tmp_path / "empty"
    with pytest.raises(PretrainedNotFoundError) as err:
        load_pretrained(
            TV_SPEC, _imagenet_resnet18(), weights_dir=weights_dir, allow_download=False
        )
    message = str(err.value)
    assert TV_NAME in message and TV_URL in message
    assert str(weights_dir) in message and str(pretrained.hub_checkpoint_dir()) in message
    assert "downloads are disabled" in message


@dataclass
class Served:
    url: str
    payload: bytes
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def http_file(tv_file: TvFile) -> Iterator[Served]:
    """Serves the stand-in ResNet-18 file from 127.0.0.1 (a plain 200, no Range support)."""
    served = Served(url="", payload=tv_file.path.read_bytes())

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            served.requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(served.payload)))
            self.end_headers()
            self.wfile.write(served.payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    served.url = f"http://{host}:{port}/models/{tv_file.path.name}"
    try:
        yield served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("to_hub", [False, True])
def test_download_fetches_verifies_and_loads(
    to_hub: bool,
    http_file: Served,
    tv_file: TvFile,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _patch_resolver(monkeypatch, _remote_for(tv_file, http_file.url))
    weights_dir = None if to_hub else tmp_path / "w"
    model = _imagenet_resnet18()
    info = load_pretrained(TV_SPEC, model, weights_dir=weights_dir)
    folder = pretrained.hub_checkpoint_dir() if to_hub else tmp_path / "w"
    assert http_file.requests == [f"/models/{tv_file.path.name}"]
    assert info.path == folder / tv_file.path.name
    assert info.path.read_bytes() == http_file.payload and info.sha256 == tv_file.sha256
    _assert_same_outputs(model, tv_file.reference)
    # Second call: found on disk, no request.
    load_pretrained(TV_SPEC, _imagenet_resnet18(), weights_dir=weights_dir, allow_download=False)
    assert len(http_file.requests) == 1


def test_download_with_wrong_content_is_rejected(
    http_file: Served, tv_file: TvFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    http_file.payload = http_file.payload[:-1] + bytes([http_file.payload[-1] ^ 1])
    remote = pretrained._Remote(http_file.url, tv_file.path.name, tv_file.sha256, None)
    _patch_resolver(monkeypatch, remote)
    with pytest.raises(PretrainedNotFoundError, match=r"download failed.*sha256"):
        load_pretrained(TV_SPEC, _imagenet_resnet18(), weights_dir=tmp_path / "w")
    assert not (tmp_path / "w" / tv_file.path.name).exists()


def test_unreachable_server_gives_the_manual_instructions(
    tv_file: TvFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{tv_file.path.name}"
    _patch_resolver(monkeypatch, _remote_for(tv_file, url))
    with pytest.raises(
        PretrainedNotFoundError, match=rf"download {url} and put it.*download failed"
    ):
        load_pretrained(TV_SPEC, _imagenet_resnet18(), weights_dir=tmp_path / "w")


def test_unrecorded_digest_is_not_downloaded(
    tv_file: TvFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_resolver(
        monkeypatch, pretrained._Remote("http://127.0.0.1:9/x.pth", "x-0123abcd.pth", None, None)
    )
    with pytest.raises(PretrainedNotFoundError, match=r"x-0123abcd\.pth.*not recorded"):
        load_pretrained(TV_SPEC, _imagenet_resnet18(), weights_dir=tmp_path / "w")


# -- timm -----------------------------------------------------------------------------------


def _timm_resnet18(seed: int, num_classes: int = 10) -> TimmModel:
    torch.manual_seed(seed)
    model = create_model(
        "timm", num_classes=num_classes, in_chans=3, resolution=32, model_name="resnet18"
    )
    assert isinstance(model, TimmModel)
    return model.eval()


@pytest.mark.parametrize("in_chans", [1, 3])
def test_timm_family_interface(in_chans: int) -> None:
    torch.manual_seed(0)
    model = create_model(
        "timm", num_classes=5, in_chans=in_chans, resolution=32, model_name="resnet18"
    ).eval()
    x = torch.randn(3, in_chans, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (3, 512) and model.num_features == 512
        out = model(x)
        assert out.shape == (3, 5)
        assert_close(out, model.forward_head(feats))
        assert_close(out, model.net(x))  # parity with timm's own forward


def test_timm_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"timm: unknown model_name 'resnet1800'"):
        create_model("timm", num_classes=5, in_chans=3, resolution=32, model_name="resnet1800")


def test_timm_options_reach_timm() -> None:
    model = create_model(
        "timm", num_classes=5, in_chans=3, resolution=32, model_name="resnet18", drop_rate=0.25
    )
    assert model.net.drop_rate == 0.25
    with pytest.raises(
        ValueError, match=r"model 'timm': bad options .*unexpected keyword argument 'zero_init_lst'"
    ):
        create_model(
            "timm",
            num_classes=5,
            in_chans=3,
            resolution=32,
            model_name="resnet18",
            zero_init_lst=False,
        )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_spec_loads_a_local_file_strictly(suffix: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source, target = _timm_resnet18(0), _timm_resnet18(1)
    path = tmp_path / f"resnet18{suffix}"
    (save_file if suffix == ".safetensors" else torch.save)(source.net.state_dict(), path)
    info = load_pretrained("timm:resnet18", target, weights_dir=tmp_path, allow_download=False)
    assert (info.spec, info.path, info.remap) == ("timm:resnet18", path, ())
    assert info.num_tensors == len(source.net.state_dict())
    _assert_same_state(target, source)
    _assert_same_outputs(target, source)


def test_timm_spec_is_strict(tmp_path: Path) -> None:
    source, target = _timm_resnet18(0, num_classes=1000), _timm_resnet18(1)
    torch.save(source.net.state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(PretrainedLoadError, match=r"fc\.weight: checkpoint \(1000, 512\)"):
        load_pretrained("timm:resnet18", target, weights_dir=tmp_path, allow_download=False)


def test_timm_missing_file_offline_names_model_hub_id_and_dir(tmp_path: Path) -> None:
    with pytest.raises(PretrainedNotFoundError) as err:
        load_pretrained(
            "timm:resnet18", _timm_resnet18(0), weights_dir=tmp_path, allow_download=False
        )
    message = str(err.value)
    assert "timm:resnet18" in message and "resnet18.safetensors" in message
    assert "'timm/resnet18.a1_in1k'" in message and str(tmp_path) in message


def test_timm_download_goes_through_timm_and_is_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, target = _timm_resnet18(0), _timm_resnet18(1)
    calls: list[str] = []

    def fake_pretrained(name: str) -> dict:
        calls.append(name)
        return source.net.state_dict()

    monkeypatch.setattr(pretrained, "_timm_pretrained_state_dict", fake_pretrained)
    info = load_pretrained("timm:resnet18", target, weights_dir=tmp_path)
    assert calls == ["resnet18"] and info.path == tmp_path / "resnet18.pth"
    _assert_same_state(target, source)
    load_pretrained("timm:resnet18", _timm_resnet18(2), weights_dir=tmp_path)  # now on disk
    assert calls == ["resnet18"]


def test_timm_download_failure_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(name: str) -> dict:
        raise OSError("network is unreachable")

    monkeypatch.setattr(pretrained, "_timm_pretrained_state_dict", offline)
    with pytest.raises(PretrainedNotFoundError, match=r"timm/resnet18.*network is unreachable"):
        load_pretrained("timm:resnet18", _timm_resnet18(0), weights_dir=tmp_path)


def test_timm_spec_needs_the_matching_timm_model() -> None:
    with pytest.raises(ValueError, match=r"create_model\('timm', model_name='resnet18'.*ResNet"):
        load_pretrained("timm:resnet18", _imagenet_resnet18(), allow_download=False)
    with pytest.raises(ValueError, match=r"'resnet50', but the model is a 'resnet18'"):
        load_pretrained("timm:resnet50.a1_in1k", _timm_resnet18(0), allow_download=False)
