"""Self-checks for tests/fake_segment_apis.py, driven by the real clients the service uses:
``requests`` for the Profile API, segment-analytics-python for the HTTP Tracking API.

They prove the stand-ins answer what Segment's documentation says Segment answers, so a
product test that passes against them is not passing only because they are lenient.
"""

from __future__ import annotations

import json

import pytest
import requests
from segment.analytics import Client
from segment.analytics.request import APIError, post

from tests.fake_segment_apis import (
    MAX_BATCH_BYTES,
    MAX_EVENT_BYTES,
    FakeProfileAPI,
    FakeTrackingAPI,
)

SPACE = "spa_check"
TOKEN = "check-profile-token"
NO_PROXY = {"http": None, "https": None}


# --------------------------------------------------------------------------------------
# Profile API
# --------------------------------------------------------------------------------------


@pytest.fixture
def profile_api():
    with FakeProfileAPI(space_id=SPACE, token=TOKEN) as fake:
        yield fake


@pytest.fixture
def session():
    with requests.Session() as s:
        s.auth = (TOKEN, "")
        s.proxies.update(NO_PROXY)
        yield s


def traits_url(fake, identifier: str = "user_id:u-1") -> str:
    return f"{fake.url}/v1/spaces/{SPACE}/collections/users/profiles/{identifier}/traits"


def read(session, url: str, **params) -> dict:
    response = session.get(url, params=params, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


TWENTY_FIVE = {f"t{n:02d}": n for n in range(25)}


def test_without_a_limit_a_page_holds_ten_traits_in_key_order(profile_api, session):
    """The documented default ("By default, the response includes 10 traits"); the
    documented example lists traits in key order, with cursor.next the next key."""
    profile_api.set_traits("user_id:u-1", {**TWENTY_FIVE, "Zeta": "z", "alpha": "a"})
    body = read(session, traits_url(profile_api))
    assert list(body["traits"]) == ["Zeta", "alpha"] + [f"t{n:02d}" for n in range(8)]
    assert body["cursor"]["has_more"] is True
    assert body["cursor"]["next"] == "t08"
    assert body["cursor"]["limit"] == 10
    assert "next=t08" in body["cursor"]["url"]


def test_following_next_reads_every_trait_once_and_the_last_page_says_so(profile_api, session):
    profile_api.set_traits("user_id:u-1", TWENTY_FIVE)
    url, seen, pages, after = traits_url(profile_api), {}, 0, ""
    while True:
        body = read(session, url, limit=7, **({"next": after} if after else {}))
        pages += 1
        assert not set(body["traits"]) & set(seen), "a trait came twice"
        seen.update(body["traits"])
        if not body["cursor"]["has_more"]:
            break
        after = body["cursor"]["next"]
        assert pages < 10, "the pages never end"
    assert seen == TWENTY_FIVE
    assert pages == 4  # 7 + 7 + 7 + 4
    assert body["cursor"]["next"] == "" and len(body["traits"]) == 4


def test_limit_up_to_200_fits_in_one_page(profile_api, session):
    many = {f"k{n:03d}": n for n in range(200)}
    profile_api.set_traits("user_id:u-1", many)
    body = read(session, traits_url(profile_api), limit=200)
    assert body["traits"] == many and body["cursor"]["has_more"] is False


@pytest.mark.parametrize("limit", ["0", "201", "-1", "ten", "1.5", "", "²"])
def test_a_limit_outside_1_to_200_is_a_bad_request(profile_api, session, limit):
    profile_api.set_traits("user_id:u-1", {"a": 1})
    response = session.get(traits_url(profile_api), params={"limit": limit}, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request_error"
    assert read(session, traits_url(profile_api), limit=1)["traits"] == {"a": 1}


def test_include_is_applied_before_paging(profile_api, session):
    profile_api.set_traits("user_id:u-1", TWENTY_FIVE)
    url = traits_url(profile_api)
    first = read(session, url, include="t20,t03,t11,nope", limit=2)
    assert first["traits"] == {"t03": 3, "t11": 11}
    assert first["cursor"]["has_more"] is True and first["cursor"]["next"] == "t20"
    second = read(session, url, include="t20,t03,t11,nope", limit=2, next="t20")
    assert second["traits"] == {"t20": 20} and second["cursor"]["has_more"] is False


def test_page_size_makes_pages_shorter_than_the_limit_asked(profile_api, session):
    """Segment's documents disagree on the most a page holds: a client must follow
    has_more, whatever limit it asked for."""
    profile_api.page_size = 2
    profile_api.set_traits("user_id:u-1", {"a": 1, "b": 2, "c": 3})
    body = read(session, traits_url(profile_api), limit=200)
    assert body["traits"] == {"a": 1, "b": 2}
    assert body["cursor"] == {**body["cursor"], "has_more": True, "next": "c", "limit": 2}


def test_a_cursor_at_a_trait_removed_meanwhile_goes_on_from_the_next_one(profile_api, session):
    profile_api.set_traits("user_id:u-1", {"a": 1, "b": 2, "c": 3, "d": 4})
    first = read(session, traits_url(profile_api), limit=2)
    assert first["cursor"]["next"] == "c"
    profile_api.set_traits("user_id:u-1", {"a": 1, "b": 2, "d": 4})
    assert read(session, traits_url(profile_api), limit=2, next="c")["traits"] == {"d": 4}


def test_errors_are_answered_as_documented(profile_api, session):
    response = session.get(traits_url(profile_api, "user_id:nobody"), timeout=5)
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "Profile was not found."}}
    response = requests.get(
        traits_url(profile_api), auth=("wrong-token", ""), timeout=5, proxies=NO_PROXY
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_error"


def test_an_injected_429_has_no_retry_after_unless_asked(profile_api, session):
    profile_api.set_traits("user_id:u-1", {"a": 1})
    profile_api.fail(429)
    response = session.get(traits_url(profile_api), timeout=5)
    assert response.status_code == 429 and "Retry-After" not in response.headers
    profile_api.fail(429, retry_after=3)
    response = session.get(traits_url(profile_api), timeout=5)
    assert response.status_code == 429 and response.headers["Retry-After"] == "3"
    profile_api.fail(None)
    assert read(session, traits_url(profile_api))["traits"] == {"a": 1}


def test_over_the_rate_limit_a_429_without_retry_after(session):
    with FakeProfileAPI(space_id=SPACE, token=TOKEN, rate_limit=3) as fake:
        fake.set_traits("user_id:u-1", {"a": 1})
        statuses = [session.get(traits_url(fake), timeout=5) for _ in range(5)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429, 429]
    assert "Retry-After" not in statuses[3].headers
    assert statuses[3].json()["error"]["code"] == "rate_limit_error"


# --------------------------------------------------------------------------------------
# HTTP Tracking API
# --------------------------------------------------------------------------------------

WRITE_KEY = "check-write-key"


@pytest.fixture
def tracking():
    with FakeTrackingAPI(write_key=WRITE_KEY) as fake:
        yield fake


def client(fake, write_key: str = WRITE_KEY, **options) -> Client:
    return Client(write_key=write_key, host=fake.url, sync_mode=True, proxies=NO_PROXY, **options)


def send(fake, events: list[dict], write_key: str = WRITE_KEY, gzip: bool = False):
    """One batch request as segment-analytics-python makes it, without its consumer's
    own size checks (which a client written by hand would not have)."""
    return post(write_key, fake.url, gzip=gzip, timeout=10, proxies=NO_PROXY, batch=events)


def event_of_size(size: int, n: int = 0) -> dict:
    """An identify whose JSON, as analytics-python measures it, is ``size`` bytes."""
    event = {"type": "identify", "userId": f"u-{n}", "traits": {"pad": ""}}
    event["traits"]["pad"] = "x" * (size - len(json.dumps(event).encode()))
    assert len(json.dumps(event).encode()) == size
    return event


@pytest.mark.parametrize("gzip", [False, True])
def test_events_under_the_right_write_key_are_accepted(tracking, gzip):
    client(tracking, gzip=gzip).identify(user_id="u-1", traits={"plan": "pro"})
    (message,) = tracking.identifies("u-1")
    assert message["traits"] == {"plan": "pro"}
    (batch,) = tracking.batches
    assert batch.write_key == WRITE_KEY and batch.gzipped is gzip
    assert tracking.refused == 0 and tracking.discarded() == []


def test_a_wrong_write_key_is_answered_200_and_its_events_go_nowhere(tracking):
    """Segment answers 200 to every request but too large or not JSON: the client
    cannot tell, and nothing arrives under the right key."""
    client(tracking, write_key="not-the-key").identify(user_id="u-1", traits={"a": 1})
    assert tracking.identifies() == [] and tracking.batches == []
    (dropped,) = tracking.discarded()
    assert dropped.reason == "write_key" and dropped.write_key == "not-the-key"
    assert dropped.message["userId"] == "u-1"
    assert tracking.refused == 0
    client(tracking).identify(user_id="u-2", traits={"a": 1})  # the right key still works
    assert [m["userId"] for m in tracking.identifies()] == ["u-2"]


def test_the_write_key_may_come_in_the_body(tracking):
    batch = [{"type": "identify", "userId": "u-1", "traits": {}}]
    answer = requests.post(
        f"{tracking.url}/v1/batch",
        timeout=5,
        proxies=NO_PROXY,
        json={"batch": batch, "writeKey": WRITE_KEY},
    )
    assert answer.status_code == 200
    assert [m["userId"] for m in tracking.identifies()] == ["u-1"]
    answer = requests.post(
        f"{tracking.url}/v1/batch",
        timeout=5,
        proxies=NO_PROXY,
        json={"batch": batch, "writeKey": "not-the-key"},
    )
    assert answer.status_code == 200 and len(tracking.identifies()) == 1


def test_an_event_over_32_kb_gets_400_and_nothing_of_its_request_is_kept(tracking):
    with pytest.raises(APIError) as refused:
        send(tracking, [event_of_size(100, 1), event_of_size(MAX_EVENT_BYTES + 1, 2)])
    assert refused.value.status == 400
    assert tracking.messages() == [] and tracking.refused == 1
    assert "over 32768 bytes" in tracking.refusals[0]
    send(tracking, [event_of_size(MAX_EVENT_BYTES, 3)])  # 32 KB exactly: accepted
    assert [m["userId"] for m in tracking.messages()] == ["u-3"]


@pytest.mark.parametrize("gzip", [False, True])
def test_a_request_over_500_kb_gets_400_compressed_or_not(tracking, gzip):
    per_event = 30 * 1024
    over = [event_of_size(per_event, n) for n in range(MAX_BATCH_BYTES // per_event + 1)]
    with pytest.raises(APIError) as refused:
        send(tracking, over, gzip=gzip)  # gzipped, the body is a few KB
    assert refused.value.status == 400
    assert tracking.messages() == [] and "request over" in tracking.refusals[0]
    under = over[: MAX_BATCH_BYTES // per_event - 1]
    send(tracking, under, gzip=gzip)
    assert len(tracking.messages()) == len(under)


def test_over_2500_events_a_batch_is_answered_200_and_dropped(tracking):
    small = [{"type": "identify", "userId": f"u-{n}", "traits": {}} for n in range(2501)]
    send(tracking, small)  # no exception: 200
    assert tracking.messages() == []
    assert len(tracking.discarded("too_many_events")) == 2501
    send(tracking, small[:2500])
    assert len(tracking.messages()) == 2500


def test_events_segment_would_not_accept_are_answered_200_and_dropped(tracking):
    send(
        tracking,
        [
            {"type": "identify", "traits": {"a": 1}},  # no userId/anonymousId
            {"type": "track", "userId": "u-1", "properties": {}},  # no event name
            {"type": "track", "anonymousId": "a-1", "event": "Viewed"},
        ],
    )
    assert [m.get("anonymousId") for m in tracking.messages()] == ["a-1"]
    assert [d.reason for d in tracking.discarded()] == ["no_user_anon_id", "no_event_name"]


def test_not_json_gets_400(tracking):
    answer = requests.post(
        f"{tracking.url}/v1/batch",
        data=b"{oops",
        timeout=5,
        proxies=NO_PROXY,
        auth=(WRITE_KEY, ""),
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 400 and tracking.refusals == ["not JSON"]
