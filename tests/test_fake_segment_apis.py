"""Self-checks for tests/fake_segment_apis.py, driven by the real clients the service uses:
``requests`` for the Profile API, segment-analytics-python for the HTTP Tracking API.

They prove the stand-ins answer what Segment's documentation says Segment answers, so a
product test that passes against them is not passing only because they are lenient.
"""
from __future__ import annotations

import pytest
import requests

from tests.fake_segment_apis import FakeProfileAPI

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


def test_following_next_reads_every_trait_once_and_the_last_page_says_so(profile_api,
                                                                          session):
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


def test_a_cursor_at_a_trait_removed_meanwhile_goes_on_from_the_next_one(profile_api,
                                                                         session):
    profile_api.set_traits("user_id:u-1", {"a": 1, "b": 2, "c": 3, "d": 4})
    first = read(session, traits_url(profile_api), limit=2)
    assert first["cursor"]["next"] == "c"
    profile_api.set_traits("user_id:u-1", {"a": 1, "b": 2, "d": 4})
    assert read(session, traits_url(profile_api), limit=2, next="c")["traits"] == {"d": 4}


def test_errors_are_answered_as_documented(profile_api, session):
    response = session.get(traits_url(profile_api, "user_id:nobody"), timeout=5)
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found",
                                         "message": "Profile was not found."}}
    response = requests.get(traits_url(profile_api), auth=("wrong-token", ""), timeout=5,
                            proxies=NO_PROXY)
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
