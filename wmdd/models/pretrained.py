"""Pretrained teacher weights, loaded strictly into a model built by ``create_model``.

A *spec* names where the weights come from:

* ``torchvision:<arch>.<WEIGHTS>`` — a torchvision weights enum entry, e.g.
  ``torchvision:resnet18.IMAGENET1K_V1`` (the SRe2L / WMDD ImageNet-1K teacher;
  ``DEFAULT`` is resolved to the entry it aliases). The file
  (``resnet18-f37072fd.pth``) is looked for in ``weights_dir``, then in torch hub's
  ``<torch.hub.get_dir()>/checkpoints``; the hex part of its name must be the start of the
  file's SHA-256 (and the whole SHA-256 where it is recorded in ``KNOWN_SHA256``). If it
  is absent it is downloaded (resumable, verified) into ``weights_dir`` or the hub directory.
* ``file:<path>`` — a local checkpoint: a raw state dict, or a dict holding one under
  ``state_dict`` (this project's teacher checkpoints), ``model`` or ``weights``;
  ``.safetensors`` files too. A ``module.`` prefix (DataParallel / DDP) is stripped.
* ``timm:<model_name>`` — timm's pretrained weights for a model built with
  ``create_model("timm", model_name=<model_name>, ...)``: read from
  ``<weights_dir>/<model_name>.safetensors`` (``.pth``, ``.bin``), else obtained through
  timm's own pretrained mechanism and saved there as ``<model_name>.pth``.

Loading is always ``strict=True``: every missing, unexpected or differently-shaped tensor is
a :class:`PretrainedLoadError` that names it. The one tolerated gap is the BatchNorm
``num_batches_tracked`` counters of a legacy file that stores none of them (torchvision's
ImageNet ResNets: 102 tensors for ResNet-18); they are set to 0, as ``load_state_dict`` would,
and listed in :attr:`PretrainedInfo.filled`. In particular 1000-class ImageNet weights do
not load into a model with another ``num_classes``: a pretrained teacher is used only on its
own label space, never with a silently re-initialised classifier.

Example (offline, with the file already in ``weights/``)::

    model = create_model("resnet18", num_classes=1000, in_chans=3, resolution=224)
    info = load_pretrained("torchvision:resnet18.IMAGENET1K_V1", model,
                           weights_dir=Path("weights"), allow_download=False)
    # info.path == weights/resnet18-f37072fd.pth, info.sha256 == "f37072fd47e8...", 102 tensors
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import torch
from torch import Tensor, nn

from wmdd.data.download import DownloadError, download, sha256sum
from wmdd.models.registry import TimmModel

__all__ = [
    "KNOWN_SHA256",
    "PretrainedInfo",
    "PretrainedLoadError",
    "PretrainedNotFoundError",
    "hub_checkpoint_dir",
    "load_pretrained",
]

log = logging.getLogger(__name__)

SOURCES = ("torchvision", "file", "timm")
CONTAINER_KEYS = ("state_dict", "model", "weights")  # where a checkpoint dict may hold weights
TIMM_SUFFIXES = (".safetensors", ".pth", ".bin")
_LISTED = 10  # keys listed per kind of mismatch in error messages

# Full SHA-256 and size in bytes of the torchvision files this project uses. A file's name
# only embeds a hash prefix; the full digest is what allows a verified download.
KNOWN_SHA256: dict[str, tuple[str, int]] = {
    "resnet18-f37072fd.pth": (
        "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
        46830571,
    ),
}


class PretrainedLoadError(ValueError):
    """Pretrained weights do not fit the model (or the file is not the one named)."""


class PretrainedNotFoundError(FileNotFoundError):
    """The weights file is not on disk and could not (or may not) be downloaded."""


@dataclass(frozen=True)
class PretrainedInfo:
    """What :func:`load_pretrained` loaded, for logs and run metadata."""

    spec: str  # canonical spec ("torchvision:resnet18.IMAGENET1K_V1", "file:/abs/path", ...)
    path: Path  # the file the weights were read from
    sha256: str  # hex SHA-256 of that file
    num_tensors: int  # tensors read from the file (parameters and buffers)
    remap: tuple[tuple[str, str], ...]  # (old prefix, new prefix) applied to checkpoint keys
    filled: tuple[str, ...] = ()  # BN num_batches_tracked absent from a legacy file, set to 0


@dataclass(frozen=True)
class _Remote:
    """A torchvision weights file: where it is published and how to verify it."""

    url: str
    file_name: str
    sha256: str | None  # full digest if recorded in KNOWN_SHA256
    size: int | None


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint directory (``$TORCH_HOME/hub/checkpoints`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_pretrained(
    spec: str,
    model: nn.Module,
    *,
    weights_dir: Path | None = None,
    allow_download: bool = True,
    remap: Mapping[str, str] | None = None,
) -> PretrainedInfo:
    """Loads the weights named by ``spec`` into ``model`` with ``strict=True``.

    Args:
        spec: ``torchvision:<arch>.<WEIGHTS>``, ``file:<path>`` or ``timm:<model_name>``
            (module docstring).
        model: a model from :func:`wmdd.models.registry.create_model` whose architecture, input
            channels and ``num_classes`` match the weights (1000 for ImageNet weights).
        weights_dir: directory searched first for torchvision / timm files, and where
            downloads go (torch hub's checkpoint directory when ``None``).
        allow_download: fetch missing files; ``False`` makes a missing file an error.
        remap: key prefixes to rename, old -> new, after any ``module.`` prefix is stripped
            (longest matching prefix wins; ``""`` prefixes every key). Each one must match a
            key.

    Returns:
        A :class:`PretrainedInfo`; ``model`` holds the weights (its train/eval mode is kept).

    Raises:
        ValueError: a malformed spec, or a remap that matches no key / merges keys.
        PretrainedNotFoundError: the file is absent and may not or could not be downloaded;
            names the URL (or hub id), the file name and the directories searched.
        PretrainedLoadError: the file's hash does not match its name, or any key or shape
            differs between the weights and the model.
    """
    source, _, rest = spec.partition(":")
    if source not in SOURCES or not rest:
        raise ValueError(
            f"pretrained spec {spec!r}: expected '<source>:<name>' with source one of "
            f"{', '.join(SOURCES)} (e.g. 'torchvision:resnet18.IMAGENET1K_V1', "
            "'file:teacher.pt', 'timm:resnet18')"
        )
    dirs = _search_dirs(weights_dir)
    target = _timm_target(rest, model) if source == "timm" else model
    spec, path = _locate(source, rest, dirs, allow_download=allow_download)
    state, applied = _remap_keys(_read_state_dict(path), dict(remap or {}), path=path)
    num_tensors = len(state)
    state, filled = _fill_legacy_bn_counters(target, state)
    _load_strict(target, state, source=spec if source == "file" else f"{spec} ({path})")
    info = PretrainedInfo(
        spec=spec,
        path=path,
        sha256=sha256sum(path),
        num_tensors=num_tensors,
        remap=applied,
        filled=filled,
    )
    log.info("loaded %s: %d tensors from %s (sha256 %s)", spec, num_tensors, path, info.sha256)
    return info


def _locate(source: str, name: str, dirs: list[Path], *, allow_download: bool) -> tuple[str, Path]:
    """The canonical spec and the local file of ``<source>:<name>`` (downloaded if allowed)."""
    if source == "torchvision":
        return _torchvision_file(name, dirs, allow_download=allow_download)
    if source == "timm":
        return f"timm:{name}", _timm_file(name, dirs, allow_download=allow_download)
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise PretrainedNotFoundError(f"pretrained spec 'file:{name}': no file at {path}")
    return f"file:{path}", path


def _search_dirs(weights_dir: Path | None) -> list[Path]:
    dirs = [Path(weights_dir)] if weights_dir is not None else []
    return [*dirs, hub_checkpoint_dir()]


# -- torchvision --------------------------------------------------------------------------


def _resolve_torchvision(name: str) -> tuple[str, _Remote]:
    """``resnet18.IMAGENET1K_V1`` -> (canonical name, published file) via torchvision's enums."""
    import torchvision

    arch, _, weights = name.partition(".")
    if not weights:
        raise ValueError(
            f"pretrained spec 'torchvision:{name}': expected '<arch>.<WEIGHTS>', "
            "e.g. 'torchvision:resnet18.IMAGENET1K_V1'"
        )
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        raise ValueError(
            f"pretrained spec 'torchvision:{name}': unknown torchvision model {arch!r}; "
            "see torchvision.models.list_models()"
        ) from None
    if weights not in enum.__members__:
        raise ValueError(
            f"pretrained spec 'torchvision:{name}': {enum.__name__} has no {weights!r}; "
            f"expected one of: {', '.join(enum.__members__)}"
        )
    entry = enum[weights]
    file_name = entry.url.rsplit("/", 1)[-1]
    sha, size = KNOWN_SHA256.get(file_name, (None, None))
    return f"{arch}.{entry.name}", _Remote(entry.url, file_name, sha, size)


def _torchvision_file(name: str, dirs: list[Path], *, allow_download: bool) -> tuple[str, Path]:
    """Finds (or downloads) and verifies the file; returns (canonical spec, path)."""
    canonical, remote = _resolve_torchvision(name)
    spec = f"torchvision:{canonical}"
    for d in dirs:
        if (d / remote.file_name).is_file():
            return spec, _verify_hash(d / remote.file_name, remote)
    where = ", ".join(str(d) for d in dirs)
    missing = (
        f"pretrained weights {spec}: {remote.file_name} is in none of {where}; "
        f"download {remote.url} and put it, named exactly {remote.file_name}, in one of them"
    )
    if not allow_download:
        raise PretrainedNotFoundError(f"{missing} (downloads are disabled)")
    if remote.sha256 is None:
        raise PretrainedNotFoundError(
            f"{missing} (not downloaded automatically: its full SHA-256 is not recorded in "
            "wmdd.models.pretrained.KNOWN_SHA256)"
        )
    dest = dirs[0] / remote.file_name
    try:
        download(remote.url, dest, sha256=remote.sha256, size=remote.size)
    except DownloadError as err:
        raise PretrainedNotFoundError(f"{missing} (download failed: {err})") from err
    return spec, _verify_hash(dest, remote)


def _verify_hash(path: Path, remote: _Remote) -> Path:
    """Checks the hash prefix in the file name (torch hub's convention) and the full digest."""
    digest = sha256sum(path)
    match = re.search(r"-([0-9a-f]{6,})\.[^.]+$", remote.file_name)
    if match is None and remote.sha256 is None:
        log.warning("%s: no hash in its name and none recorded; not verified", path)
    expected = remote.sha256 or (match.group(1) if match else "")
    if not digest.startswith(expected):
        raise PretrainedLoadError(
            f"{path}: sha256 {digest} does not match the expected "
            f"{'sha256 ' + expected if remote.sha256 else 'hash prefix ' + expected} of "
            f"{remote.file_name} ({remote.url}); the file is corrupt or not that checkpoint"
        )
    return path


# -- timm ---------------------------------------------------------------------------------


def _timm_target(name: str, model: nn.Module) -> nn.Module:
    """The wrapped timm module, after checking it is the architecture ``name`` names."""
    from timm.models import split_model_name_tag

    arch = split_model_name_tag(name)[0]
    if not isinstance(model, TimmModel):
        raise ValueError(
            f"pretrained spec 'timm:{name}' needs a model from "
            f"create_model('timm', model_name={name!r}, ...), got {type(model).__name__}"
        )
    if split_model_name_tag(model.model_name)[0] != arch:
        raise ValueError(
            f"pretrained spec 'timm:{name}' is a {arch!r}, but the model is a {model.model_name!r}"
        )
    return model.net


def _timm_file(name: str, dirs: list[Path], *, allow_download: bool) -> Path:
    """``<dir>/<name>{.safetensors,.pth,.bin}``, else timm's pretrained weights saved there."""
    suffixes = TIMM_SUFFIXES if _has_safetensors() else TIMM_SUFFIXES[1:]
    for d in dirs:
        for suffix in suffixes:
            if (d / f"{name}{suffix}").is_file():
                return d / f"{name}{suffix}"
    where = ", ".join(str(d) for d in dirs)
    missing = (
        f"pretrained weights timm:{name}: none of {', '.join(name + s for s in suffixes)} is in "
        f"{where}; put the weights of the Hugging Face hub model {_timm_hub_id(name)} there "
        f"(its model.safetensors renamed to {name}.safetensors)"
    )
    if not allow_download:
        raise PretrainedNotFoundError(f"{missing} (downloads are disabled)")
    try:
        state = _timm_pretrained_state_dict(name)
    except Exception as err:  # hub, network and cache errors alike: re-raised with the fix
        raise PretrainedNotFoundError(f"{missing} (timm could not fetch it: {err})") from err
    dest = dirs[0] / f"{name}.pth"
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest)
    return dest


def _timm_pretrained_state_dict(name: str) -> dict[str, Tensor]:
    """timm's own pretrained loading (its download, cache and checkpoint filters)."""
    import timm

    return timm.create_model(name, pretrained=True).state_dict()


def _timm_hub_id(name: str) -> str:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return repr(hub_id) if hub_id else f"(none known to timm for {name!r})"


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


# -- state dicts --------------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a raw / wrapped ``torch.save`` file or a ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        if not _has_safetensors():
            raise ImportError(f"{path}: reading .safetensors needs the safetensors package")
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping):
        raise PretrainedLoadError(f"{path}: expected a dict, got a {type(ckpt).__name__}")
    for candidate in (ckpt, *(ckpt.get(key) for key in CONTAINER_KEYS)):
        if _is_state_dict(candidate):
            return dict(candidate)
    raise PretrainedLoadError(
        f"{path}: no state dict found; expected a dict of tensors, or one under "
        f"{' / '.join(CONTAINER_KEYS)}; top-level keys: {', '.join(map(str, list(ckpt)[:20]))}"
    )


def _is_state_dict(obj: object) -> TypeGuard[Mapping[str, Tensor]]:
    """A non-empty mapping of names to tensors."""
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _remap_keys(
    state: dict[str, Tensor], remap: dict[str, str], *, path: Path
) -> tuple[dict[str, Tensor], tuple[tuple[str, str], ...]]:
    """Strips a ``module.`` prefix from every key if all have it, then renames by ``remap``."""
    applied: list[tuple[str, str]] = []
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
        applied.append(("module.", ""))
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    by_length = sorted(remap, key=len, reverse=True)
    for key, value in state.items():
        old = next((p for p in by_length if key.startswith(p)), None)
        new_key = key if old is None else remap[old] + key.removeprefix(old)
        if old is not None:
            used.add(old)
        if new_key in out:
            raise ValueError(f"{path}: remap {remap} maps two checkpoint keys to {new_key!r}")
        out[new_key] = value
    unused = [p for p in remap if p not in used]
    if unused:
        raise ValueError(f"{path}: remap prefixes {unused} match no checkpoint key")
    applied += [(old, remap[old]) for old in remap]
    return out, tuple(applied)


def _fill_legacy_bn_counters(
    model: nn.Module, state: dict[str, Tensor]
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Adds ``num_batches_tracked = 0`` for every BN layer if the file stores none at all.

    Files saved before PyTorch 0.4.1 (torchvision's ImageNet ResNets among them) have no
    BatchNorm ``num_batches_tracked`` buffers; ``load_state_dict`` would fill them with 0
    itself. They are filled here explicitly, and only when the file has none, so these are the
    exact expected missing keys; a file holding some of them must hold all. The counter only
    matters for BN with ``momentum=None``; eval-mode BN uses the running statistics.
    """
    if any(k.endswith(".num_batches_tracked") for k in state):
        return state, ()
    counters = [
        f"{name}.num_batches_tracked"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None
    ]
    state = dict(state) | {k: torch.zeros((), dtype=torch.long) for k in counters}
    return state, tuple(counters)


def _load_strict(model: nn.Module, state: dict[str, Tensor], *, source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` after a check that names every problem."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = [
        _listed(f"{len(items)} {kind}", items)
        for kind, items in (
            ("missing key(s)", missing),
            ("unexpected key(s)", unexpected),
            ("shape mismatch(es)", shapes),
        )
        if items
    ]
    if problems:
        hint = _classifier_hint(model, state, expected)
        raise PretrainedLoadError(
            f"pretrained weights {source} do not fit the {type(model).__name__} "
            f"(loading is strict): " + "; ".join(problems) + hint
        )
    model.load_state_dict(state, strict=True)


def _listed(head: str, items: list[str]) -> str:
    more = f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return f"{head}: {', '.join(items[:_LISTED])}{more}"


def _classifier_hint(
    model: nn.Module, state: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> str:
    """Explains a classifier-size mismatch (the last ``nn.Linear`` of the model)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    key = f"{linears[-1]}.weight" if linears else ""
    if key in state and key in expected and state[key].shape[0] != expected[key].shape[0]:
        return (
            f". The checkpoint classifier has {state[key].shape[0]} classes and the model "
            f"{expected[key].shape[0]}: a pretrained teacher is used only on its own label "
            f"space, so build the model with num_classes={state[key].shape[0]}"
        )
    return ""
