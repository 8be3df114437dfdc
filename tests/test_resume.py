"""Long loops survive SIGKILL: a killed run, started again, resumes from its checkpoint and
ends with the same result as an uninterrupted run.

Each case runs a real loop of the suite (teacher training, the soft- and hard-label
students, the WMDD / SRe2L synthesis loop, DM) in a child process on tiny data, three times:
uninterrupted; killed with a real ``SIGKILL`` at a fixed point (the worker kills itself
from inside the loop, so the point is exact); and started again to completion. The
resumed result must equal the uninterrupted one exactly, and the resumed run must
say where it resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    r'''
    import json, os, signal, sys
    from pathlib import Path

    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[4])  # tests/ (helpers)
    from helpers import tiny_prepared, tiny_teacher
    from wmdd.checkpoint import Checkpointer

    kind, out, kill_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    ckpt = Checkpointer(out.with_suffix(".ckpt"), every_seconds=0, what=kind)
    calls = {"n": 0}

    def tick():
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def canon(obj):
        """Exact, canonical content: tensors as dtype, shape and raw bytes (a pickle would
        differ in how it memoises strings that came from a checkpoint, not in content)."""
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes().hex()
            return [str(t.dtype), list(t.shape), raw]
        if isinstance(obj, dict):
            return {str(k): canon(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [canon(v) for v in obj]
        return repr(obj)

    def save(obj):
        out.write_text(json.dumps(canon(obj), sort_keys=True))

    data = tiny_prepared(num_classes=3, per_class=8, res=8, seed=1)
    if kind == "teacher":
        from wmdd.config import ModelConfig, TeacherConfig
        from wmdd.models.teacher import train_teacher
        cfg = TeacherConfig(model=ModelConfig("tiny_cnn", {"width": 4}), epochs=6, batch_size=8)
        model, history = train_teacher(
            cfg, data, seed=3, device=torch.device("cpu"), progress=False,
            on_epoch=lambda h: tick(), checkpoint=ckpt,
        )
        save({"model": model.state_dict(), "history": history})
    elif kind in ("soft", "hard"):
        from wmdd.config import HardProtocolConfig, ModelConfig, SoftProtocolConfig
        from wmdd.models.accuracy import split_validator
        from wmdd.protocol import hard, soft
        from wmdd.protocol.runner import build_student
        student_cfg = ModelConfig("tiny_cnn", {"width": 4})
        student = build_student(student_cfg, num_classes=3, in_chans=3, resolution=8, seed=5)
        images = data.normalize(data.train_x[:9])
        validate = split_validator(data, device=torch.device("cpu"))
        if kind == "soft":
            cfg = SoftProtocolConfig(
                student=student_cfg, epochs=8, batch_size=4, crop_scale=(0.5, 1.0),
                relabel_mode="online",
            )
            labels = soft.OnlineLabels(tiny_teacher(3, 3, 8), cfg, seed=7)
            result = soft.train_student_soft(
                student=student, labels=labels, images=images, validate=validate, cfg=cfg,
                device=torch.device("cpu"), progress=False, on_epoch=lambda h: tick(),
                checkpoint=ckpt,
            )
        else:
            real_ce = hard.F.cross_entropy
            class CountingF:
                def cross_entropy(self, *a, **kw):
                    tick()
                    return real_ce(*a, **kw)
            hard.F = CountingF()
            cfg = HardProtocolConfig(
                student=student_cfg, epochs=6, batch_size=4, dsa_strategy="color_crop_flip"
            )
            result = hard.train_student_hard(
                student=student, images=images, labels=data.train_y[:9], validate=validate,
                cfg=cfg, seed=7, device=torch.device("cpu"), progress=False, checkpoint=ckpt,
            )
        save({"model": student.state_dict(), "result": result})
    elif kind == "synthesis":
        from wmdd.synthesis.loop import SynthesisConfig, class_batches, synthesize_dataset
        teacher = tiny_teacher(3, 3, 8)
        cfg = SynthesisConfig(iterations=5, lr=0.1, batch_budget=2, jitter=(-1, 1))
        def loss_fn(x, batch):
            tick()
            loss = teacher(x).logsumexp(1).mean() + x.square().mean()
            return loss, {"part": float(loss.detach())}
        images, labels, stats = synthesize_dataset(
            data, batches=class_batches(range(3), 2, 2), loss_fn=loss_fn, cfg=cfg, seed=4,
            device=torch.device("cpu"), progress=False, checkpoint=ckpt,
        )
        stats.pop("optimise_seconds")
        save({"images": images, "labels": labels, "stats": stats})
    elif kind == "dm":
        import baselines.dm as dm
        real_iteration = dm.dm_iteration
        def counting_iteration(*a, **kw):
            tick()
            return real_iteration(*a, **kw)
        dm.dm_iteration = counting_iteration
        cfg = dm.DMConfig(iterations=6, real_per_class=4, embed_width=4, embed_depth=2)
        synthetic = dm.dm(
            teacher=None, data=data, classes=range(3), ipc=2, config=cfg, seed=2,
            device=torch.device("cpu"), progress=False, checkpoint=ckpt,
        )
        synthetic.aux.pop("timings")
        save({"images": synthetic.images, "aux": synthetic.aux})
    print("checkpoint left:", ckpt.path.exists())
    '''
)


def _run(tmp_path: Path, kind: str, out: Path, kill_at: int) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(script), kind, str(out), str(kill_at), str(ROOT / "tests")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# (loop, where the worker kills itself: epoch ends / loss calls / iterations)
CASES = [("teacher", 3), ("soft", 5), ("hard", 7), ("synthesis", 8), ("dm", 4)]


@pytest.mark.parametrize(("kind", "kill_at"), CASES, ids=[c[0] for c in CASES])
def test_sigkilled_loop_resumes_to_the_identical_result(tmp_path: Path, kind: str, kill_at: int):
    reference = _run(tmp_path, kind, tmp_path / "reference.pt", kill_at=0)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "resumed.pt"
    killed = _run(tmp_path, kind, out, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists() and out.with_suffix(".ckpt").is_file()

    resumed = _run(tmp_path, kind, out, kill_at=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert out.read_bytes() == (tmp_path / "reference.pt").read_bytes()
