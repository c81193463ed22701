"""Property-based tests (Hypothesis) on the webhook: arbitrary JSON, arbitrary bytes,
mutated genuine Segment messages (the corpus analytics-python really sends), mutated
signatures. Properties: never a 5xx for bad input; an answer is always one of the
documented ones and its summary adds up; never a stored message whose signature was
wrong; under gunicorn, never a dead worker.
"""

from __future__ import annotations

import copy
import json
import os
import string
from collections import Counter

import pytest
import requests
import sqlalchemy as sa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import store_of
from tests.deliveries import sign
from tests.gunicorn_server import gunicorn, wait_for_workers, worker_pids
from tests.segment_wire import capture_corpus
from webhook.signature import js_stringify

SECRET = "fuzz-shared-secret"
TOKEN = "fuzz-bearer-token"  # Actions batches of several need a whole-body credential
BEARER = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

CORPUS = capture_corpus()

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=30,
)
# Values a Segment field might be mangled into: right type wrong content, wrong type, odd text.
odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300) | st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\ud800",
        "a" * 257,
        "2026-13-45T99:99:99Z",
        "1e309",
        "NaN",
        "Order Completed",
        "track",
        "TRACK ",
        "delete",
    ]
)
mangled = json_values | odd_text
query_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300) | st.sampled_from(
    ["", " ", "\x00", "a" * 257, "0", "-1", "501", "1e3", "25 ", "\u00a0"]
)


def stored_ids(app) -> set[str]:
    with store_of(app).inbox_store.read() as conn:
        return {row[0] for row in conn.execute(sa.text("SELECT message_id FROM inbox"))}


def check_answer(response, sent_count: int | None = None) -> None:
    """The documented answers to bad or odd input, never a 5xx, summary consistent."""
    assert response.status_code in (200, 400, 401, 413), (
        response.status_code,
        response.get_data()[:300],
    )
    body = response.get_json()
    assert isinstance(body, dict)
    if response.status_code == 200:
        outcomes = (
            body["accepted"] + body["duplicates"] + len(body["skipped"]) + len(body["rejected"])
        )
        assert outcomes == body["received"], body
        if sent_count is not None:
            assert body["received"] == sent_count
    else:
        assert isinstance(body["error"]["code"], str)


@pytest.fixture
def open_app(make_app):
    return make_app(engine_background_training=False)


@pytest.fixture
def signed_app(make_app):
    return make_app(
        segment_shared_secrets=(SECRET,),
        webhook_bearer_tokens=(TOKEN,),
        engine_background_training=False,
    )


# --- arbitrary input ----------------------------------------------------------------------


@FUZZ
@given(body=json_values)
def test_arbitrary_json_is_never_a_5xx(open_app, body):
    response = open_app.test_client().post(
        "/segment", data=json.dumps(body), content_type="application/json"
    )
    check_answer(response)


@FUZZ
@given(
    body=st.binary(max_size=2000)
    | st.text(max_size=500).map(lambda t: t.encode("utf-8", "surrogatepass"))
)
def test_arbitrary_bytes_are_never_a_5xx(open_app, body):
    response = open_app.test_client().post("/segment", data=body, content_type="application/json")
    check_answer(response)


@FUZZ
@given(
    query=st.dictionaries(
        st.sampled_from(["userId", "anonymousId", "itemId", "numResults", "token", "x"]),
        query_text,
        max_size=4,
    )
)
def test_arbitrary_recommendation_queries_are_never_a_5xx(open_app, query):
    client = open_app.test_client()
    client.post("/segment", json=CORPUS)  # popular items exist
    response = client.get("/recommendations", query_string=query)
    assert response.status_code in (200, 400), (query, response.get_data()[:300])


# --- mutated genuine messages -------------------------------------------------------------


@st.composite
def mutated_pairs(draw):
    """1–5 messages of the genuine corpus, each with a few fields deleted, replaced by odd
    values, or added; as a Classic single message or an Actions array."""
    # The shape first, half and half: both shapes get examples in every run.
    single = draw(st.booleans())
    picks = draw(
        st.lists(st.sampled_from(range(len(CORPUS))), min_size=1, max_size=1 if single else 5)
    )
    messages, genuine = [], []
    for index in picks:
        message = copy.deepcopy(CORPUS[index])
        # A messageId of its own (unless a mutation below takes it away): a corpus id
        # would be a duplicate after its first use and never reach routing or appliers.
        message["messageId"] = f"fz-{draw(st.uuids())}"
        genuine.append(copy.deepcopy(message))
        for _ in range(draw(st.integers(0, 4))):
            keys = sorted(message) or ["type"]
            key = draw(
                st.sampled_from(
                    keys
                    + [
                        "properties.product_id",
                        "properties.products",
                        "traits.email",
                        "context.traits",
                    ]
                )
            )
            action = draw(st.sampled_from(["delete", "replace", "replace"]))
            target, _, inner = key.partition(".")
            holder = message.get(target) if inner else message
            name = inner or key
            if not isinstance(holder, dict):
                continue
            if action == "delete":
                holder.pop(name, None)
            else:
                holder[name] = draw(mangled)
        messages.append(message)
    if single:
        return genuine[0], messages[0]
    return genuine, messages


def mutated_messages():
    """1–5 messages of the genuine corpus (fresh messageIds), mutated (``mutated_pairs``)."""
    return mutated_pairs().map(lambda pair: pair[1])


def signature_for(delivery: dict | list) -> str:
    """``X-Signature`` as Segment computes it: HMAC-SHA1 of the raw body for a Classic
    delivery; of ``JSON.stringify(body[0])`` (compact, JavaScript's number and escaping
    rules) for a Webhooks (Actions) array. ``js_stringify`` is checked byte for byte
    against Node's JSON.stringify in tests/test_js_stringify.py."""
    if isinstance(delivery, list):
        return sign(js_stringify(delivery[0]).encode("utf-8", "surrogatepass"), SECRET)
    return sign(json.dumps(delivery).encode(), SECRET)


def shape(delivery) -> str:
    return "actions" if isinstance(delivery, list) else "classic"


def test_mutated_genuine_messages_correctly_signed_reach_the_appliers(make_app, tmp_path):
    """Both shapes get past the signature check to the parser, the store and the
    appliers; never a 5xx. Every accepted message is applied: the interactions the answer
    counted are in the store once the local store applier is through, no entry failed
    to apply, and a redelivery is a duplicate. A fresh database every ten examples, and
    fresh messageIds, so that examples do not merely hit the duplicate check."""
    from tests.conftest import metric

    state = {"examples": 0, "app": None}
    reached: Counter = Counter()

    def app():
        if state["examples"] % 10 == 0:
            state["app"] = make_app(
                database_url=f"sqlite:///{tmp_path}/{state['examples']}.db",
                segment_shared_secrets=(SECRET,),
                webhook_bearer_tokens=(TOKEN,),
                engine_background_training=False,
            )
        state["examples"] += 1
        return state["app"]

    @FUZZ
    @given(delivery=mutated_messages())
    def deliver(delivery):
        try:
            signature = signature_for(delivery)
        except RecursionError:
            return
        current = app()
        client = current.test_client()  # applies the inbox after each request
        unreadable = metric(client, "inbox_unreadable_total")
        before = store_of(current).counts()["interactions"]
        body = json.dumps(delivery).encode()
        response = client.post(
            "/segment",
            data=body,
            content_type="application/json",
            headers={"X-Signature": signature, **BEARER},
        )
        check_answer(response, len(delivery) if isinstance(delivery, list) else 1)
        assert response.status_code != 401, response.get_json()
        reached[shape(delivery), "parsed"] += 1
        if response.status_code != 200:
            return
        answer = response.get_json()
        if answer["accepted"]:
            reached[shape(delivery), "accepted"] += 1
        messages = delivery if isinstance(delivery, list) else [delivery]
        deletes = any(
            isinstance(m, dict)
            and isinstance(m.get("type"), str)
            and m["type"].strip().lower() == "delete"
            for m in messages
        )
        services = current.extensions["segment"]
        assert not any(lag.pending for lag in services.inbox.lag(services.runners).values())
        assert metric(client, "inbox_unreadable_total") == unreadable, answer
        if not deletes:  # (a delete may forget what came before it)
            stored = store_of(current).counts()["interactions"] - before
            assert stored == answer["interactions"], (answer, stored)
            if answer["interactions"]:
                reached[shape(delivery), "applied"] += 1
        # Redelivery: what was accepted is now a duplicate; only a message without a
        # usable messageId (a delete may lack one) can be taken again.
        again = client.post(
            "/segment",
            data=body,
            content_type="application/json",
            headers={"X-Signature": signature, **BEARER},
        )
        check_answer(again)
        without_id = sum(
            1
            for m in messages
            if not isinstance(m, dict)
            or not (
                isinstance(m.get("messageId"), str)
                and m["messageId"]
                or isinstance(m.get("messageId"), int)
                and not isinstance(m["messageId"], bool)
            )
        )
        repeated = again.get_json()
        assert again.status_code == 200
        # ("deleted": a mutated delete in the same delivery forgot its sender.)
        taken = [e for e in repeated["skipped"] if e["reason"] != "deleted"]
        assert repeated["accepted"] + len(taken) <= without_id, repeated

    deliver()
    print(f"\n{dict(reached)}")
    for kind in ("classic", "actions"):
        assert reached[kind, "applied"] > 0, f"no {kind} delivery reached the store: {reached}"


# --- mutated signatures -------------------------------------------------------------------


@st.composite
def wrong_signatures(draw, right: str):
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "other", "prefix", "garbage"]))
    if kind == "flip":
        at = draw(st.integers(0, len(right) - 1))
        digit = draw(st.sampled_from([c for c in "0123456789abcdef" if c != right[at]]))
        return right[:at] + digit + right[at + 1 :]
    if kind == "truncate":
        return right[: draw(st.integers(0, len(right) - 1))]
    if kind == "extend":
        return right + draw(st.text(alphabet="0123456789abcdef", min_size=1, max_size=4))
    if kind == "other":
        return sign(b"x", draw(st.text(min_size=1, max_size=20)))
    if kind == "prefix":
        return draw(st.sampled_from(["sha1=", "sha256=", "v1,"])) + right
    return draw(st.text(alphabet=string.printable.strip() + " ", max_size=60))


@FUZZ
@given(
    data=st.data(),
    index=st.integers(0, len(CORPUS) - 1),
    shape=st.sampled_from(["classic", "actions"]),
)
def test_a_wrong_signature_never_stores_anything(signed_app, data, index, shape):
    client = signed_app.test_client()
    if shape == "classic":
        body = json.dumps(CORPUS[index]).encode()
        right = sign(body, SECRET)
    else:
        batch = CORPUS[index:] + CORPUS[:index]
        body = json.dumps(batch).encode()
        right = sign(js_stringify(batch[0]).encode(), SECRET)
    presented = data.draw(wrong_signatures(right))
    assume(presented.strip().lower() != right)
    before = stored_ids(signed_app)
    response = client.post(
        "/segment",
        data=body,
        content_type="application/json",
        headers={"X-Signature": presented, **BEARER},
    )
    assert response.status_code == 401, (presented, response.get_json())
    assert stored_ids(signed_app) == before


def test_a_body_altered_after_signing_is_never_stored(signed_app):
    """Signed as the genuine delivery was, delivered with its (first) message mutated:
    refused, nothing stored. The same signature over the genuine delivery is accepted,
    so the 401 is for the alteration, not for a signature that never matched."""
    client = signed_app.test_client()
    checked: Counter = Counter()

    @FUZZ
    @given(pair=mutated_pairs())
    def deliver(pair):
        before_mutation, delivery = pair
        # The genuine first message (as signed), the rest as delivered.
        genuine = (
            [before_mutation[0], *delivery[1:]] if isinstance(delivery, list) else before_mutation
        )
        try:
            signature = signature_for(genuine)
            # What the signature covers must differ, else it is no alteration.
            assume(signature != signature_for(delivery))
        except RecursionError:
            return
        before = stored_ids(signed_app)
        response = client.post(
            "/segment",
            data=json.dumps(delivery).encode(),
            content_type="application/json",
            headers={"X-Signature": signature, **BEARER},
        )
        assert response.status_code == 401, response.get_json()
        assert stored_ids(signed_app) == before
        control = client.post(
            "/segment",
            data=json.dumps(genuine).encode(),
            content_type="application/json",
            headers={"X-Signature": signature, **BEARER},
        )
        if control.status_code != 200:
            # The corpus's people recur across examples: a genuine delete of an earlier
            # example forgot the genuine first message's sender, so it (older than the
            # delete) is skipped, and the rest of the array is as mutated. No message
            # left to accept, but the signature was accepted all the same (not a 401).
            answer = control.get_json()
            assert control.status_code == 400, answer
            assert answer["error"]["code"] == "no_valid_messages", answer
            first = [s for s in answer["details"]["skipped"] if s["index"] == 0]
            assert [s["reason"] for s in first] == ["deleted"], answer
        checked[shape(delivery)] += 1

    deliver()
    print(f"\naltered deliveries refused: {dict(checked)}")
    assert checked["classic"] > 0 and checked["actions"] > 0, checked


# --- under gunicorn: never a dead worker --------------------------------------------------


@pytest.mark.slow
def test_fuzzed_deliveries_under_gunicorn_never_kill_a_worker(tmp_path):
    """A bounded stream of generated hostile bodies into real gunicorn workers: no 5xx,
    the same two worker processes at the end, and they still store a good delivery."""
    bodies: list[bytes] = []

    @settings(
        max_examples=min(EXAMPLES, 120),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        body=json_values.map(lambda v: json.dumps(v).encode())
        | st.binary(max_size=3000)
        | mutated_messages().map(lambda v: json.dumps(v).encode())
    )
    def collect(body):
        bodies.append(body)

    collect()
    bodies += [
        b"[" * 100000,
        b'{"a":' * 50000,
        b"\xff\xfe" * 1000,
        b"[]",
        b"{}",
        json.dumps([CORPUS[1]] * 4001).encode(),
        b'{"type":"track","x":1e999}',
    ]
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/fuzz.db",
        "_LOG_DIR": str(tmp_path),
        "ENGINE_BACKGROUND_TRAINING": "false",
    }
    with gunicorn(env, workers=2) as (base, process):
        before = wait_for_workers(process.pid, 2)  # the second may still be booting
        statuses = {}
        for body in bodies:
            response = requests.post(
                base + "/segment",
                data=body,
                timeout=10,
                headers={"Content-Type": "application/json", "Connection": "close"},
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (body[:200], response.text[:300])
        assert worker_pids(process.pid) == before, "a worker died"
        good = requests.post(base + "/segment", json=CORPUS, timeout=10)
        assert good.status_code == 200 and good.json()["received"] == len(CORPUS)
        log = process.log_path.read_text(errors="replace")
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]
    assert "Worker exiting" not in log.split("Handling signal: term")[0], "a worker restarted"
    print(f"\n{len(bodies)} generated bodies: {statuses}")
