"""The allocator policy (``wmdd.utils.set_allocator``): freed memory stays in the process.

Without it glibc serves every large tensor with a fresh ``mmap`` and the first touch of
each of its pages faults into the kernel; DM spent about a third of its CPU time there.
Each case runs in a fresh interpreter, because the policy is process-wide.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from wmdd import utils

ROOT = Path(__file__).resolve().parents[1]

glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the retain policy acts on glibc's malloc only"
)

FAULTS = """
import json, resource, torch
from wmdd.utils import allocator, set_allocator
{calls}
done = allocator()

def step():  # a training step's pattern: a large activation and small temporaries
    x = torch.ones(8 << 20)  # 32 MiB, above glibc's largest mmap threshold
    y = torch.ones(1000)
    del x, y

for _ in range(10):  # the heap settles
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"done": done, "faults": faults}}))
"""

DM_SET = """
import hashlib, sys
sys.path.insert(0, "tests")
import torch
from wmdd.utils import set_allocator
set_allocator({policy!r})
torch.set_num_threads(1)
from helpers import tiny_prepared
from baselines.dm import DMConfig, dm
data = tiny_prepared(num_classes=3, per_class=40, res=32)
config = DMConfig(iterations=3, real_per_class=32, embed_width=64)
out = dm(teacher=None, data=data, classes=range(3), ipc=2, config=config, seed=0,
         device=torch.device("cpu"), progress=False)
print(hashlib.sha256(out.images.numpy().tobytes()).hexdigest())
"""


def _python(code: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@glibc_only
def test_retain_reuses_freed_memory_where_glibc_would_fault_every_page_again() -> None:
    pages = (32 << 20) // 4096  # 8192 pages per 32 MiB tensor
    system = json.loads(_python(FAULTS.format(calls="set_allocator('system')")))
    retain = json.loads(_python(FAULTS.format(calls="set_allocator('retain')")))
    undone = json.loads(
        _python(FAULTS.format(calls="set_allocator('retain'); set_allocator('system')"))
    )
    assert system["done"] == undone["done"] == "system" and retain["done"] == "glibc-retain"
    assert system["faults"] >= 20 * pages * 0.9  # every tensor faulted in afresh
    assert retain["faults"] < pages  # reused: not one tensor's worth in 20 steps
    assert undone["faults"] >= 20 * pages * 0.9  # "system" after "retain" is glibc's again


@glibc_only
def test_the_policy_changes_no_result() -> None:
    assert _python(DM_SET.format(policy="retain")) == _python(DM_SET.format(policy="system"))


def test_the_policy_comes_from_wmdd_malloc_and_a_bad_value_is_named() -> None:
    done = _python(
        "from wmdd.utils import set_allocator; print(set_allocator())", WMDD_MALLOC="system"
    )
    assert done == "system"
    with pytest.raises(ValueError, match=r"WMDD_MALLOC='lots'.*retain, system"):
        utils.set_allocator("lots")


def test_a_c_library_other_than_glibc_is_left_alone(monkeypatch) -> None:
    monkeypatch.setattr(utils.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(utils, "_ALLOCATOR", "system")  # as in a fresh process
    assert utils.set_allocator("retain") == "system"
    assert utils.allocator() == "system"


@glibc_only
def test_every_stage_keeps_freed_memory_and_says_so() -> None:
    """``open_stage`` (every stage's start) applies the policy; the run tag reads it."""
    code = (
        "from pipelines.common import open_stage\n"
        "from wmdd.utils import allocator\n"
        "open_stage('prepare', None, ['--dataset', 'digits', '--params', 'params.yaml'])\n"
        "print(allocator())"
    )
    assert _python(code) == "glibc-retain"
    assert _python(code, WMDD_MALLOC="system") == "system"
