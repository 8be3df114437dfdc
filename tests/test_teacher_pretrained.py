"""The teacher stage's pretrained branch (wmdd.models.teacher.pretrained_teacher): strict loading of
a weights file into the profile's model, and a loud failure when it does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_prepared

from wmdd.config import ModelConfig, TeacherConfig
from wmdd.models.pretrained import PretrainedLoadError
from wmdd.models.teacher import build_teacher, pretrained_teacher


def _cfg(spec: str, **model_kwargs) -> TeacherConfig:
    return TeacherConfig(
        model=ModelConfig(
            name="convnet", kwargs={"width": 8, "depth": 2, "norm": "batch", **model_kwargs}
        ),
        pretrained=spec,
    )


def test_pretrained_teacher_loads_file_strictly(tmp_path: Path) -> None:
    data = tiny_prepared(num_classes=3, res=16)
    torch.manual_seed(0)
    source = build_teacher(_cfg("").model, data).eval()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model, info = pretrained_teacher(
        _cfg(f"file:{tmp_path / 'w.pth'}"), data, device=torch.device("cpu")
    )
    x = data.normalize(data.val_x)
    assert torch.equal(model(x), source(x))
    assert not model.training
    assert info.path == (tmp_path / "w.pth").resolve() and len(info.sha256) == 64


def test_pretrained_teacher_with_other_classes_fails(tmp_path: Path) -> None:
    source = build_teacher(_cfg("").model, tiny_prepared(num_classes=5, res=16))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(PretrainedLoadError, match="classifier"):
        pretrained_teacher(
            _cfg(f"file:{tmp_path / 'w.pth'}"),
            tiny_prepared(num_classes=3, res=16),
            device=torch.device("cpu"),
        )
