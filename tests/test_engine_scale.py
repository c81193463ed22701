"""The local engine at shop scale, as a shop would notice it: a very active visitor (or a
bot) is answered as fast as a typical one, training keeps to ENGINE_TRAIN_MAX_INTERACTIONS
(the most recent), and the scale bench refuses to report figures for an empty model."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import raw_client
from tests.waiting import wait_until
from webhook.engine import engine_for, recommender_for
from webhook.engine.importer import ImportReport, import_messages

ROOT = Path(__file__).resolve().parent.parent
EVENTS = (
    ["Product Viewed"] * 14 + ["Product Clicked"] * 3 + ["Product Added"] * 2 + ["Order Completed"]
)


def ingest(app, visits) -> None:
    """Store ``visits`` — (user, item) in time order, one second apart, ending an hour
    ago — through the webhook's ingestion and the local store's applier."""
    services = app.extensions["segment"]
    start = time.time() - 3600 - len(visits)

    def messages():
        for n, (user, item) in enumerate(visits):
            yield {
                "type": "track",
                "messageId": f"scale-{n}",
                "userId": user,
                "event": EVENTS[n % len(EVENTS)],
                "timestamp": datetime.fromtimestamp(start + n, tz=UTC).isoformat(),
                "properties": {"product_id": item},
            }

    import_messages(
        services.ingestor,
        messages(),
        ImportReport(),
        lambda _: services.drain(["local"]),
        chunk=5000,
    )
    assert services.drain(timeout=120)


def train(app) -> None:
    result = app.test_cli_runner().invoke(args=["train"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_a_visitor_with_50000_interactions_is_answered_as_fast_as_one_with_50(
    make_app, database_url
):
    app = make_app(
        database_url=database_url, engine_model_refresh_seconds=0.001, insights_retention_days=0
    )
    rng = np.random.default_rng(5)
    visits = [(f"shopper-{u}", f"item-{i}") for u in range(400) for i in rng.integers(0, 1000, 20)]
    visits += [("typical", f"item-{i}") for i in rng.integers(0, 1000, 50)]
    visits += [("crawler", f"item-{i}") for i in rng.integers(0, 1000, 50_000)]
    ingest(app, visits)
    train(app)
    # The write-backs after the purchases just applied run first (they answer too).
    assert app.extensions["segment"].activation.wait_idle(60)

    client = raw_client(app)  # nothing to apply after a GET: time the answer alone

    def answer(user):
        started = time.perf_counter()
        response = client.get(f"/recommendations?userId={user}&numResults=10")
        assert response.status_code == 200
        return response.get_json()["source"], time.perf_counter() - started

    wait_until(  # until this process has loaded the model
        lambda: answer("crawler")[0] == "local", 30, "the model loaded", interval=0
    )
    timings: dict[str, list[float]] = {"typical": [], "crawler": []}
    for round_ in range(320):  # alternately, so that the machine's noise hits both alike
        for user in ("typical", "crawler") if round_ % 2 else ("crawler", "typical"):
            source, seconds = answer(user)
            assert source == "local"
            timings[user].append(seconds)
    typical, crawler = (np.percentile(timings[u][20:], 99) for u in ("typical", "crawler"))
    assert crawler <= 2 * typical, (
        f"p99 {crawler * 1000:.1f} ms for 50,000 interactions, {typical * 1000:.1f} ms for 50"
    )


def test_training_reads_the_most_recent_interactions_up_to_the_limit(make_app, caplog):
    app = make_app(engine_train_max_interactions=300, engine_model_refresh_seconds=0.001)
    # 100 interactions with items of last year's range, then 300 with this year's.
    ingest(
        app,
        [(f"u{n % 10}", f"old-{n % 20}") for n in range(100)]
        + [(f"u{n % 30}", f"new-{n % 40}") for n in range(300)],
    )
    with caplog.at_level(logging.INFO, logger="webhook.engine"):
        train(app)

    _, model = engine_for(app).holder.current()
    assert model.stats["interactions"] == 300
    assert sorted(model.item_ids.tolist()) == sorted(f"new-{n}" for n in range(40))
    assert any("most recent 300 of 400 interactions" in r.getMessage() for r in caplog.records)
    related = recommender_for(app).recommend(item_id="old-3", num_results=3)
    assert related.source == "popular"  # the model does not know it


def test_training_without_a_cut_says_nothing_of_one(make_app, caplog):
    app = make_app(engine_train_max_interactions=400, engine_model_refresh_seconds=0.001)
    ingest(app, [(f"u{n % 10}", f"item-{n % 20}") for n in range(400)])
    with caplog.at_level(logging.INFO, logger="webhook.engine"):
        train(app)
    _, model = engine_for(app).holder.current()
    assert model.stats["interactions"] == 400
    assert not any("most recent" in r.getMessage() for r in caplog.records)


def run_bench(tmp_path, *args, **env):
    return subprocess.run(
        [
            sys.executable,
            "bench/engine_scale.py",
            "--users",
            "300",
            "--items",
            "500",
            "--visitors",
            "20",
            "--rounds",
            "1",
            "--workdir",
            str(tmp_path),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **env},
    )


@pytest.mark.slow
def test_the_scale_bench_reports_a_model_that_holds_what_it_was_given(tmp_path):
    result = run_bench(tmp_path, "--sizes", "3000")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3,000 interactions (3,000 stored" in result.stdout
    assert "GET /recommendations, gunicorn 2 workers" in result.stdout


@pytest.mark.slow
def test_the_scale_bench_fails_loudly_when_the_model_is_empty(tmp_path):
    # No event counts as an interaction: nothing reaches the store, the model is empty.
    result = run_bench(tmp_path, "--sizes", "3000", INTERACTION_EVENTS="Checkout Started")
    assert result.returncode != 0
    assert "the model is empty" in result.stderr
    assert "GET /recommendations" not in result.stdout
