"""The MLflow UI, as a reader of the benchmark uses it, in a real headless browser (slow).

Starts ``mlflow server`` on 127.0.0.1 over a small store laid out as the pipeline logs it
(evaluate runs of one dataset, the cell as params and tags, ``top1_mean``, per-epoch
``set0.seed0.top1`` curves), drives Debian's Chromium with Playwright (``executable_path``,
never a downloaded browser), filters the runs of one dataset's evaluate stage, and checks
that the method, IPC and top-1 columns are shown and that the compare page renders the
chosen metric for the selected runs. Screenshots go to ``$WMDD_UI_SCREENSHOTS`` (default:
the test's temporary directory). Skips, saying what is missing, without Playwright or
Chromium: ``pip install playwright`` and ``apt-get install chromium``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CELLS = [("random", 1, 61.5), ("wmdd", 1, 66.25), ("random", 10, 80.0), ("wmdd", 10, 84.5)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(root: Path) -> tuple[str, str]:
    """A store with the runs of one evaluate stage (as pipelines.evaluate logs them) and one
    of another dataset; returns (tracking URI, experiment id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(
        "wmdd-benchmark", artifact_location=(root / "artifacts").as_uri()
    )
    for dataset, cells in (("digits", CELLS), ("cifar10_cpu", CELLS[:1])):
        for method, ipc, top1 in cells:
            run = client.create_run(exp, run_name=f"evaluate/{dataset}/{method}/ipc{ipc}")
            rid = run.info.run_id
            params = {
                "dataset": dataset,
                "method": method,
                "ipc": ipc,
                "budget": "cpu",
                "protocol_hash": "abc",
            }
            curve = [Metric("set0.seed0.top1", top1 * e / 3, 0, e) for e in (1, 2, 3)]
            client.log_batch(
                rid,
                metrics=[Metric("top1_mean", top1, 0, 0), Metric("top1_std", 0.5, 0, 0), *curve],
                params=[Param(k, str(v)) for k, v in params.items()],
                tags=[RunTag("stage", "evaluate"), *(RunTag(k, str(v)) for k, v in params.items())],
            )
            client.set_terminated(rid)
    return uri, exp


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    root = tmp_path_factory.mktemp("mlflow")
    uri, exp = _store(root)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
         "--default-artifact-root", (root / "artifacts").as_uri(), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health within 120 s")
    yield url, exp
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        yield page
        browser.close()


def _shots() -> Path:
    out = Path(os.environ.get("WMDD_UI_SCREENSHOTS", "ui-screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _choose_columns(page, names: tuple[str, ...]) -> None:
    """What README step 2 tells a reader to do: "Columns", search each column, tick it."""
    for name in names:
        page.get_by_role("button", name="Columns").click()
        page.get_by_placeholder("Search columns").fill(name)
        # a checkable tree: metrics, then params, then tags; the first node of that name is
        # the metric or the param, and clicking its title ticks it
        title = page.locator("[class*='tree-title']").filter(has_text=re.compile(f"^{name}$"))
        title.first.click()
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)
    close = page.get_by_role("button", name=re.compile("close", re.I))
    if close.count():  # the assistant side panel takes a third of the width
        close.first.click()
    page.wait_for_timeout(1000)


def test_runs_of_one_dataset_show_method_ipc_and_top1(server, page) -> None:
    url, exp = server
    query = "tags.stage = 'evaluate' and params.dataset = 'digits'"
    page.goto(f"{url}/#/experiments/{exp}/runs")
    page.wait_for_selector("text=evaluate/digits/wmdd/ipc10", timeout=60_000)
    search = page.get_by_placeholder('metrics.rmse < 1 and params.model = "tree"')
    search.fill(query)
    search.press("Enter")
    page.wait_for_timeout(2000)
    body = page.inner_text("body")
    assert "evaluate/digits/wmdd/ipc10" in body and "evaluate/cifar10_cpu" not in body
    assert "4 matching runs" in body
    _choose_columns(page, ("top1_mean", "method", "ipc"))
    page.screenshot(path=str(_shots() / "runs-filtered.png"), full_page=True)
    headers = page.locator("[role=columnheader]").all_inner_texts()
    for column in ("method", "ipc", "top1_mean"):
        assert any(column == h.strip() for h in headers), f"column {column!r} not in {headers}"
    cells = page.locator("[role=gridcell]").all_inner_texts()
    for _, _, top1 in CELLS:
        assert f"{top1:g}" in cells, f"top-1 {top1} not shown in the table"
    assert "wmdd" in cells and "random" in cells


def test_compare_page_renders_the_chosen_metric(server, page) -> None:
    url, exp = server
    page.goto(f"{url}/#/experiments/{exp}/runs")
    page.wait_for_selector("text=evaluate/digits/wmdd/ipc10", timeout=60_000)
    ids = page.evaluate(
        "async (exp) => (await (await fetch('/ajax-api/2.0/mlflow/runs/search', {method: 'POST',"
        " headers: {'Content-Type': 'application/json'}, body: JSON.stringify({experiment_ids: [exp],"
        " filter: \"params.dataset = 'digits'\"})})).json()).runs.map(r => r.info.run_id)",
        exp,
    )
    assert len(ids) == 4
    runs = ",".join(f'"{i}"' for i in ids)
    page.goto(f'{url}/#/compare-runs?runs=[{runs}]&experiments=["{exp}"]')
    page.wait_for_selector("text=top1_mean", timeout=60_000)
    page.wait_for_timeout(2000)
    body = page.inner_text("body")
    page.screenshot(path=str(_shots() / "compare.png"), full_page=True)
    assert "top1_mean" in body and "84.5" in body and "61.5" in body
    assert "Parallel Coordinates Plot" in body
    assert "method" in body and "wmdd" in body and "ipc" in body
