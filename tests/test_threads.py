"""One thread count for torch and for the BLAS/OpenMP libraries, whatever started the process.

Dask's workers export ``OPENBLAS_NUM_THREADS=1``; a shell leaves OpenBLAS one thread per
core. Before ``wmdd.utils.set_threads`` a stage under the parallel runner therefore summed
numpy's BLAS calls in another order than the same stage under ``dvc repro`` (WMDD's IPC-10
digits set differed in its last bits). Each case runs in a fresh interpreter, because BLAS
reads those variables once, when it loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys, torch
from threadpoolctl import threadpool_info
{setup}
blas = sorted({{i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}})
print(torch.get_num_threads(), blas)
"""


def _probe(setup: str, blas_env: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    if blas_env is not None:
        env.update(OPENBLAS_NUM_THREADS=blas_env, OMP_NUM_THREADS=blas_env)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(setup=setup)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.mark.parametrize("blas_env", [None, "1"], ids=["shell", "dask-worker"])
@pytest.mark.parametrize("threads", [1, 2])
def test_blas_threads_follow_torch_threads_whatever_the_launcher(blas_env, threads) -> None:
    setup = f"from wmdd.utils import set_threads; set_threads({threads})"
    assert _probe(setup, blas_env) == f"{threads} [{threads}]"


def test_every_stage_sets_them_from_benchmark_threads(tmp_path: Path) -> None:
    """``open_stage`` (every stage's start) applies ``benchmark.threads`` (1 in params.yaml)
    to BLAS too, also where the environment leaves BLAS one thread per core."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: BLAS has one thread either way")
    setup = (
        "from pipelines.common import open_stage\n"
        "open_stage('prepare', None, ['--dataset', 'digits', '--params', 'params.yaml'])"
    )
    assert _probe(setup, None) == "1 [1]"
