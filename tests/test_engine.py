"""The local recommendation engine, as a shop would notice it: popular items before the first
model, training on demand, related items, real-time answers, anonymous history merged after
alias, event weights, several workers sharing one model, one trainer at a time, importing
a Personalize interactions CSV and Segment archives, and the evaluation's machinery."""

from __future__ import annotations

import gzip
import json
import threading
import time

import pytest

from tests import deliveries
from webhook.engine import engine_for, recommender_for, service
from webhook.engine import persistence as db
from webhook.storage.schema import engine_models

_counter = iter(range(10**9))


def track(user, item, second, event="Product Viewed", anon=None):
    return deliveries.track(
        event,
        item,
        message_id=f"m-{next(_counter)}",
        user_id=user,
        anonymous_id=anon,
        timestamp=f"2024-05-01T10:{second // 60:02d}:{second % 60:02d}Z",
    )


def post(app, messages):
    response = app.test_client().post("/segment", json=messages)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def catalogue_messages():
    """Two tastes: people who have a1 then a2 then a3, people who have b1 then b2 then b3;
    plus one heavily viewed item 'hot'."""
    messages = []
    second = 0
    for n in range(12):
        for item in ("a1", "a2", "a3"):
            messages.append(track(f"ua{n}", item, second))
            second += 1
        for item in ("b1", "b2", "b3"):
            messages.append(track(f"ub{n}", item, second))
            second += 1
    for n in range(30):
        messages.append(track(f"viewer{n}", "hot", second))
        second += 1
    return messages


def ids(answer):
    return [scored.item_id for scored in answer.items]


def train(app):
    result = app.test_cli_runner().invoke(args=["train"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def engine_app(make_app, database_url):
    return make_app(database_url=database_url, engine_model_refresh_seconds=0.001)


def test_popular_items_before_the_first_model(engine_app):
    post(engine_app, catalogue_messages())
    answer = recommender_for(engine_app).recommend(user_id="stranger", num_results=3)
    assert answer.source == "popular"
    assert ids(answer)[0] == "hot"
    assert answer.details["model_version"] is None


def test_train_command_then_personal_and_related_answers(engine_app):
    post(engine_app, catalogue_messages())
    assert "model version 1" in train(engine_app)

    recommender = recommender_for(engine_app)
    answer = recommender.recommend(user_id="newcomer", num_results=5)
    assert answer.source == "popular"  # nothing known about them: popular items

    post(engine_app, [track("newcomer", "b1", 900)])
    answer = recommender.recommend(user_id="newcomer", num_results=2)
    assert answer.source == "local" and answer.details["model_version"] == 1
    assert set(ids(answer)) == {"b2", "b3"}
    assert "b1" not in ids(recommender.recommend(user_id="newcomer"))  # seen: left out
    assert "b1" in ids(recommender.recommend(user_id="newcomer", exclude_seen=False))

    related = recommender.recommend(item_id="a2", num_results=2)
    assert related.source == "local" and set(ids(related)) == {"a1", "a3"}
    unknown = recommender.recommend(item_id="never-seen", num_results=1)
    assert unknown.source == "popular" and ids(unknown) == ["hot"]


def test_an_accepted_interaction_changes_the_next_answer_without_retraining(engine_app):
    post(engine_app, catalogue_messages())
    train(engine_app)
    recommender = recommender_for(engine_app)
    post(engine_app, [track("shopper", "a1", 900)])
    before = ids(recommender.recommend(user_id="shopper", num_results=2))
    assert before[0] == "a2"
    post(engine_app, [track("shopper", "b1", 901)])
    after = ids(recommender.recommend(user_id="shopper", num_results=2))
    assert after[0] == "b2"  # the latest interaction weighs most
    assert db.latest_model_info(engine_for(engine_app).trainer.store).version == 1


def test_anonymous_history_is_merged_into_the_user_after_alias_not_back(engine_app):
    post(engine_app, catalogue_messages())
    train(engine_app)
    recommender = recommender_for(engine_app)
    post(engine_app, [track(None, "b1", 900, anon="anon-7"), track(None, "b2", 901, anon="anon-7")])
    assert ids(recommender.recommend(user_id="anon-7", num_results=1)) == ["b3"]
    assert recommender.recommend(user_id="jane", num_results=1).source == "popular"

    post(
        engine_app,
        [
            {
                "type": "alias",
                "messageId": "alias-1",
                "previousId": "anon-7",
                "userId": "jane",
                "timestamp": "2024-05-01T11:00:00Z",
            }
        ],
    )
    answer = recommender.recommend(user_id="jane", num_results=1)
    assert answer.source == "local" and ids(answer) == ["b3"]
    # The anonymous id answers from its own history only, never the user's: a logged-out
    # browser (or a link forged with the public write key) sees nothing of jane's.
    as_anonymous = ids(recommender.recommend(user_id="anon-7", num_results=3))
    post(engine_app, [track("jane", "a1", 1000)])
    as_user = ids(recommender.recommend(user_id="jane", num_results=3))
    assert set(as_user) == {"b3", "a2", "a3"}
    assert ids(recommender.recommend(user_id="anon-7", num_results=3)) == as_anonymous
    assert as_anonymous != as_user


@pytest.mark.parametrize(
    "weights, expected",
    [
        ((("Product Viewed", 1.0), ("Order Completed", 5.0)), "b2"),
        ((("Product Viewed", 5.0), ("Order Completed", 1.0)), "a2"),
    ],
)
def test_event_weights_decide_what_counts_more(make_app, weights, expected):
    app = make_app(engine_event_weights=weights, engine_model_refresh_seconds=0.001)
    post(app, catalogue_messages())
    train(app)
    # Viewed a1 after buying b1: with purchases weighing more, b's side wins.
    post(app, [track("buyer", "b1", 900, event="Order Completed"), track("buyer", "a1", 901)])
    answer = recommender_for(app).recommend(user_id="buyer", num_results=1)
    assert ids(answer) == [expected]


def test_another_worker_serves_the_new_model_without_a_restart(make_app, database_url):
    trainer_app = make_app(database_url=database_url, engine_model_refresh_seconds=0.001)
    serving_app = make_app(database_url=database_url, engine_model_refresh_seconds=0.001)
    post(trainer_app, catalogue_messages())
    serving = recommender_for(serving_app)
    assert serving.recommend(user_id="ua1").source == "popular"
    train(trainer_app)
    answer = serving.recommend(user_id="ua1", num_results=1)
    assert answer.source == "local" and answer.details["model_version"] == 1
    post(trainer_app, [track("x", "hot", 950)])
    train(trainer_app)
    assert serving.recommend(user_id="ua1").details["model_version"] == 2


def test_only_one_process_trains_at_a_time(make_app, database_url, monkeypatch):
    apps = [make_app(database_url=database_url) for _ in range(4)]
    post(apps[0], catalogue_messages())
    running, most, runs = [0], [0], []
    lock = threading.Lock()
    real = service.train_once

    def slow_train_once(store, settings, params=None):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)
        try:
            return real(store, settings, params)
        finally:
            with lock:
                running[0] -= 1
                runs.append(1)

    monkeypatch.setattr(service, "train_once", slow_train_once)
    results = []
    barrier = threading.Barrier(len(apps))

    def trigger(app):
        barrier.wait()
        results.append(engine_for(app).trainer.train())  # due: there is no model yet

    threads = [threading.Thread(target=trigger, args=(app,)) for app in apps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and len(runs) == 1
    assert sorted(results, key=str) == [1, None, None, None]
    # The lease is released, and nothing is due right after a run.
    assert engine_for(apps[0]).trainer.lease.holder() is None
    assert engine_for(apps[1]).trainer.due() is None


def test_training_is_due_after_n_interactions_or_t_seconds(make_app):
    app = make_app(engine_train_after_interactions=5, engine_train_interval_seconds=3600)
    trainer = engine_for(app).trainer
    assert trainer.due() is None  # nothing stored
    post(app, catalogue_messages())
    assert trainer.due() == "no model yet"
    trainer.train()
    assert trainer.due() is None
    post(app, [track("u", "a1", 990 + n) for n in range(4)])
    assert trainer.due() is None
    post(app, [track("u", "a2", 999)])
    assert trainer.due() == "5 new interactions"
    trainer.train()
    post(app, [track("u", "a3", 1000)])
    assert trainer.due() is None
    # An hour later, one new interaction is enough.
    with trainer.store.write() as tx:
        tx.conn.execute(engine_models.update().values(created_at=time.time() - 3601))
    assert trainer.due() == "interval elapsed"


def test_background_training_runs_in_a_subprocess_and_the_worker_picks_it_up(make_app):
    app = make_app(engine_model_refresh_seconds=0.001)
    post(app, catalogue_messages())
    engine = engine_for(app)
    assert engine.trainer.train(subprocess=True) == 1
    assert engine.holder.current()[0] == 1  # swapped in at once in the training worker


def write_interactions_csv(path) -> int:
    """A Personalize interactions CSV shaped like the AWS workshop's (USER_ID, ITEM_ID,
    EVENT_TYPE, TIMESTAMP in epoch seconds; some fields quoted, some bare): 60 visitors,
    even ones browsing shoes, odd ones jumpers, six distinct items each. The row count."""
    events = ["Product Viewed", "Product Clicked", "Product Added"]
    lines = ["USER_ID,ITEM_ID,EVENT_TYPE,TIMESTAMP"]
    second = 1549847000
    for user in range(60):
        kind = "shoe" if user % 2 == 0 else "jumper"
        for k in range(6):
            item, event = f"{kind}-{(user + k) % 8}", events[k % 3]
            second += 7
            lines.append(
                f'{9254558000 + user},"{item}","{event}",{second}'
                if k % 2
                else f'{9254558000 + user},{item},"{event}",{second}'
            )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines) - 1


def test_import_personalize_csv_then_recommend_and_reimport_is_idempotent(make_app, tmp_path):
    interactions = tmp_path / "interactions.csv"
    rows = write_interactions_csv(interactions)
    app = make_app(engine_model_refresh_seconds=0.001)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["import", str(interactions)])
    assert result.exit_code == 0, result.output
    assert f"{rows} new interactions" in result.output
    train(app)
    # Visitor 0 browsed shoes 0-5: the two shoes left come first.
    answer = recommender_for(app).recommend(user_id="9254558000", num_results=2)
    assert answer.source == "local"
    assert sorted(ids(answer)) == ["shoe-6", "shoe-7"]

    again = runner.invoke(args=["import", str(interactions)])
    assert again.exit_code == 0, again.output
    assert f"{rows} duplicates" in again.output and "; 0 new interactions" in again.output


def test_import_segment_json_lines_gzip_and_batch_json(make_app, tmp_path):
    app = make_app()
    lines = tmp_path / "archive.jsonl.gz"
    with gzip.open(lines, "wt", encoding="utf-8") as out:
        for message in catalogue_messages()[:10]:
            out.write(json.dumps(message) + "\n")
    batch = tmp_path / "batch.json"
    batch.write_text(
        json.dumps(
            {
                "batch": catalogue_messages()[:5]
                + [
                    {
                        "type": "alias",
                        "messageId": "al-1",
                        "previousId": "a",
                        "userId": "b",
                        "timestamp": "2024-05-01T11:00:00Z",
                    },
                    {"type": "nonsense"},
                ]
            }
        )
    )
    result = app.test_cli_runner().invoke(args=["import", str(lines), str(batch)])
    assert result.exit_code == 0, result.output
    assert "17 messages, 16 accepted" in result.output and "1 rejected" in result.output
    assert "15 new interactions" in result.output


def test_evaluate_machinery_on_a_small_synthetic_dataset(tmp_path):
    import numpy as np

    from webhook.engine.evaluate import Ratings, recall_ndcg, run_evaluation, temporal_split

    assert recall_ndcg(["x", "y"], {"y"}, 10) == (1.0, pytest.approx(1 / np.log2(3)))
    train_mask, test_mask = temporal_split(["u", "u", "u", "u", "v"], [4, 1, 3, 2, 1], 0.25)
    assert test_mask.tolist() == [True, False, False, False, False]

    # Sequences: each user walks a chain of items in order, starting somewhere.
    rng = np.random.default_rng(0)
    users, items, times = [], [], []
    for u in range(120):
        start = int(rng.integers(0, 40))
        for step in range(10):
            users.append(f"u{u}")
            items.append(f"i{(start + step) % 50}")
            times.append(1_000_000 + u * 100 + step)
    lines: list[str] = []
    results = run_evaluation(
        Ratings(users, items, times),
        holdout=0.2,
        k=10,
        tune_params=True,
        quick=True,
        log=lines.append,
        workdir=str(tmp_path),
    )
    assert set(results) == {
        "popularity",
        "ALS (implicit)",
        "item-kNN cosine (implicit)",
        "EASE",
        "engine",
    }
    assert any(line.startswith("engine ") for line in lines)
    assert results["engine"][0] > results["popularity"][0]
    assert results["engine"][0] > 0.9  # the next items of a chain are easy


def test_model_round_trips_through_bytes():
    import numpy as np

    from webhook.engine.model import Interactions, Model
    from webhook.engine.model import train as fit

    data = Interactions(
        users=np.array([0, 0, 1, 1, 2]),
        items=np.array([0, 1, 0, 1, 2]),
        weights=np.ones(5, dtype=np.float32),
        times=np.arange(5, dtype=float),
        item_ids=np.array(["x", "y", "z"], dtype=object),
        n_users=3,
    )
    model = fit(data)
    again = Model.from_bytes(model.to_bytes())
    assert again.item_ids.tolist() == ["x", "y", "z"]
    assert (again.similar != model.similar).nnz == 0
    assert np.allclose(again.score_history([(0, 1.0)]), model.score_history([(0, 1.0)]))
