"""``make demo``'s experiment, end to end, as the README runs it (the shop generated,
imported and trained; the service started with EXPERIMENT=local:50,popular:50; 14 days of
visitors replayed through GET /recommendations and POST /segment), then GET /insights
and the insights page in headless Chromium.

In the generated shop visitors click what they like (demo/shop.py), and the local engine
shows visitors with a history what they like, so the comparison must name it the
winner, with results spread over the 14 days. Set SAVE_SCREENSHOT=1 to write
docs/insights.png (the README's picture) from this test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
import requests

from tests.gunicorn_server import ROOT, free_port
from tests.waiting import wait_until

pytestmark = [pytest.mark.requires("chromium"), pytest.mark.browser, pytest.mark.slow]

READY_SECONDS = 600.0
DAYS = 14
CSP_WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
                          (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``make demo PORT=N``, as the README gives it, in an environment with no
    ``DATABASE_URL`` and no secret, until it prints the insights' address; stopped with
    Ctrl-C (SIGINT to its process group), after which none of its processes is left."""
    import psutil

    port = free_port()
    folder = tmp_path_factory.mktemp("demo")
    log = folder / "demo.log"
    env = {"PATH": os.environ["PATH"], "HOME": str(folder), "LANG": "C.UTF-8"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["make", "demo", f"PORT={port}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started: list[psutil.Process] = []
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            return f"/insights?days={DAYS}" in log.read_text(errors="replace")

        wait_until(ready, READY_SECONDS, "the demo ready", interval=0.5)
        started = psutil.Process(process.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "gunicorn" in names and "worker" in names, names  # the Procfile's two
        yield f"http://127.0.0.1:{port}", log.read_text(errors="replace")
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"still running after Ctrl-C: {[p.cmdline() for p in alive]}"


def _report(base: str) -> dict:
    response = requests.get(
        f"{base}/insights?days={DAYS}", headers={"Accept": "application/json"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_the_demo_experiment_names_the_local_engine_with_always_valid_results(demo):
    base, output = demo
    report = _report(base)
    assert [v["variant"] for v in report["variants"]] == ["local", "popular"]
    assert report["baseline"] == "local" and report["days"] == DAYS

    # The 14 days have their own dates: answers and clicks on each of them, in both arms.
    today = datetime.now(UTC).date()
    dates = [(today - timedelta(days=n)).isoformat() for n in range(DAYS - 1, -1, -1)]
    for variant in report["variants"]:
        assert [d["date"] for d in variant["days"]] == dates
        assert all(d["impressions"] > 0 for d in variant["days"]), variant["days"]
        assert sum(d["clicks"] > 0 for d in variant["days"]) >= DAYS - 1, variant["days"]
        assert variant["visitors"] >= 400 and variant["orders"] > 0

    # A populated comparison with a verdict from the always-valid results.
    assert report["sampleRatio"]["mismatch"] is False
    assert report["analysis"]["comparisons"] == 4 and report["analysis"]["discoveries"] >= 1
    clicks = next(c for c in report["comparisons"] if c["metric"] == "visitorClickRate")
    assert clicks["variant"] == "popular" and clicks["difference"] < 0
    assert clicks["sequential"]["discovery"] and clicks["sequential"]["high"] < 0
    verdict = report["verdict"]
    assert verdict["leader"] == "local" and verdict["enough"], verdict
    assert verdict["text"].startswith("local is ahead of popular")
    assert "however often" in verdict["text"]
    # And the demo says where to look.
    assert (
        f"/insights?days={DAYS}" in output
        and "Traceback" not in output.split("starting the service")[-1]
    )


def test_the_insights_page_opens_on_the_verdict_in_chromium(demo, browser, tmp_path):
    base, _ = demo
    report = _report(base)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    context.add_init_script(CSP_WATCH)
    page = context.new_page()
    problems, requested = [], []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: requested.append(r.url))
    try:
        page.goto(f"{base}/insights?days={DAYS}")
        page.wait_for_selector("body[data-state='ready']", timeout=20000)
        verdict = page.locator("#verdict")
        assert verdict.inner_text() == report["verdict"]["text"]
        assert verdict.get_attribute("data-leader") == "local"
        assert verdict.get_attribute("data-enough") == "true"
        assert page.is_hidden("#sample-ratio")
        assert page.locator("#comparisons-body tr").count() == 4
        assert page.locator("svg[data-chart='intervals'] .mark").count() == 4
        assert page.locator("svg[data-chart='impressions'] .mark").count() == 2 * DAYS
        assert page.evaluate("window.__csp") == [] and problems == []
        assert requested and all(url.startswith(base + "/") for url in requested), requested
        shot = tmp_path / "insights.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("SAVE_SCREENSHOT"):
            shutil.copyfile(shot, ROOT / "docs" / "insights.png")
    finally:
        context.close()
