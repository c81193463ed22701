"""The recommendation pipeline's consent and exclusion steps, as a shop page sees them:
who gets personalized items and who popular ones (and what the answer says why), which
items are kept out and why, and the larger second fetch when too many were.

Written for the gaps that mutation testing (``make mutation``, docs/mutation.md) found in
webhook/recommend.py. Over the HTTP stand-ins of tests/test_recommendations.py: Amazon
Personalize (whose answer each test sets) and Segment's Profile API.
"""

from __future__ import annotations

import sqlalchemy as sa

from tests.conftest import metric, store_of
from tests.deliveries import deliver, order_completed, product_viewed
from tests.test_rank import catalogue
from tests.test_rank import post as post_messages
from tests.test_rank import track as view
from tests.test_recommendations import (  # noqa: F401  (fixtures)
    FILTER,
    get,
    ids,
    items,
    personalize_app,
    profile_api,
    recommendation_calls,
    runtime,
)
from webhook.storage.schema import profiles
from webhook.tokens import mint_token

ENGINE_KEY = "engine-secret-key-0123456789"
UNREAD = "the opt-out could not be read: popular items"
# Timeouts no busy machine reaches: here a slow answer must not pass for a failure.
PATIENT = {"profile_api_timeout_seconds": 10.0, "recommender_timeout_seconds": 10.0}


def popular(client) -> None:
    """pop-a (viewed 3 times), pop-b (2), pop-c (1): the popular fallback's order."""
    deliver(
        client,
        *[product_viewed("pop-a", anonymous_id=f"v{i}") for i in range(3)],
        *[product_viewed("pop-b", anonymous_id=f"v{i}") for i in range(2)],
        product_viewed("pop-c", anonymous_id="v9"),
    )


# --- consent ----------------------------------------------------------------------------


def test_an_opted_out_visitor_gets_popular_items_and_only_they_are_told_why(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    popular(client)
    profile_api.set_traits("user_id:u-1", {"recommendations_opt_out": "yes"})
    body = get(client, "userId=u-1&numResults=2")
    assert (ids(body), body["source"]) == (["pop-a", "pop-b"], "popular")
    assert body["optedOut"] is True
    assert body["traitValues"] == {"recommendations_opt_out": "yes"}
    assert "degraded" not in body
    # Without the visitor's token (no SECRET_KEY) nothing says why.
    body = get(
        personalize_app(secret_key="", **PATIENT).test_client(),
        "userId=u-1&numResults=2",
        token=None,
    )
    assert "optedOut" not in body and "traitValues" not in body


def test_a_consenting_visitor_is_personalized_and_not_told_of_an_opt_out(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    popular(client)
    profile_api.set_traits("user_id:u-1", {"recommendations_opt_out": "no"})
    body = get(client, "userId=u-1&numResults=2")
    assert (ids(body), body["source"]) == (items(1, 2), "personalize")
    assert body["variant"] == "personalize"
    assert "optedOut" not in body


def test_a_visitor_unknown_to_segment_is_personalized(personalize_app, runtime, profile_api):
    client = personalize_app(**PATIENT).test_client()
    body = get(client, "userId=nobody&numResults=2")  # the Profile API answers 404
    assert (ids(body), body["source"]) == (items(1, 2), "personalize")
    assert "optedOut" not in body


def test_an_unreadable_opt_out_gives_popular_items_and_says_so(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    popular(client)
    profile_api.fail(500)
    body = get(client, "userId=u-1&numResults=2")
    assert (ids(body), body["source"]) == (["pop-a", "pop-b"], "popular")
    assert body["degraded"]["consent"] == UNREAD
    assert body["degraded"]["profile"] == "segment: error (HTTP 500)"
    assert "optedOut" not in body


def test_an_unreadable_opt_out_with_no_popular_items_is_an_empty_answer_not_an_error(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    profile_api.fail(500)
    body = get(client, "userId=u-1&numResults=2")
    assert (body["itemList"], body["source"]) == ([], "popular")
    assert body["degraded"]["consent"] == UNREAD


def test_without_an_opt_out_trait_every_visitor_is_personalized(
    personalize_app, runtime, profile_api
):
    client = personalize_app(opt_out_trait="", **PATIENT).test_client()
    profile_api.set_traits("user_id:u-1", {"recommendations_opt_out": True})
    assert get(client, "userId=u-1&numResults=2")["source"] == "personalize"


def test_related_items_involve_nobodys_consent(personalize_app, runtime, profile_api):
    client = personalize_app(**PATIENT).test_client()
    profile_api.fail(500)  # nobody's profile is read
    runtime.set_ranking("sku-1", ["sku-2", "sku-3"])
    body = get(client, "itemId=sku-1&numResults=2")
    assert (ids(body), body["source"]) == (["sku-2", "sku-3"], "personalize")
    assert "degraded" not in body


def test_with_a_filter_an_opted_out_or_unread_visitor_is_not_sent_to_personalize(
    personalize_app, runtime, profile_api
):
    """With a Personalize filter the traits are read first: no consent, no request."""
    client = personalize_app(
        personalize_filter_arn=FILTER, filter_values_map=(("PLAN", "plan"),), **PATIENT
    ).test_client()
    popular(client)
    profile_api.set_traits("user_id:out", {"recommendations_opt_out": True, "plan": "gold"})
    assert get(client, "userId=out&numResults=2")["source"] == "popular"
    profile_api.fail(503)
    body = get(client, "userId=unread&numResults=2")
    assert body["source"] == "popular"
    assert body["degraded"]["consent"] == UNREAD
    assert runtime.calls_for("GetRecommendations") == []
    profile_api.fail(None)
    profile_api.set_traits("user_id:in", {"plan": "gold"})
    assert get(client, "userId=in&numResults=2")["source"] == "personalize"
    (call,) = recommendation_calls(runtime)
    assert (call["userId"], call["filterValues"]) == ("in", {"PLAN": '"gold"'})
    # Related items: nobody's traits, so no filter values, and Personalize answers.
    runtime.set_ranking("sku-1", ["sku-2", "sku-3"])
    body = get(client, "itemId=sku-1&numResults=2")
    assert (ids(body), body["source"]) == (["sku-2", "sku-3"], "personalize")


# --- the recommender failing or having nothing to say -----------------------------------


def test_a_recommender_failure_gives_popular_items_and_says_so(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    popular(client)
    runtime.fail_next(5)
    body = get(client, "userId=u-1&numResults=2")
    assert (ids(body), body["source"]) == (["pop-a", "pop-b"], "popular")
    assert body["degraded"]["recommender"] == "Amazon Personalize: InternalFailure"
    assert "consent" not in body["degraded"]


def test_a_recommender_failure_with_no_popular_items_is_a_503(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    runtime.fail_next(5)
    body = get(client, "userId=u-1&numResults=2", expect=503)
    assert body["error"] == {
        "code": "recommender_unavailable",
        "message": "the recommender is unavailable and no popular items are known",
        "requestId": body["error"]["requestId"],
    }


def test_an_empty_personal_answer_gives_popular_items_when_there_are_some(
    personalize_app, runtime, profile_api
):
    app = personalize_app(**PATIENT)
    client = app.test_client()
    runtime.set_ranking("u-1", [])
    body = get(client, "userId=u-1&numResults=2")
    assert (body["itemList"], body["source"]) == ([], "personalize")
    popular(client)
    body = get(client, "userId=u-1&numResults=2")
    assert (ids(body), body["source"]) == (["pop-a", "pop-b"], "popular")
    assert "degraded" not in body


# --- exclusions -------------------------------------------------------------------------


def test_exclusions_keep_the_order_and_say_which_check_removed_what(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    profile_api.set_traits("user_id:u-1", {"purchased_products": ["item-1", "item-3"]})
    body = get(client, "userId=u-1&numResults=3")
    assert ids(body) == ["item-2", "item-4", "item-5"]
    assert body["filtered"] == {"count": 2, "reasons": {"purchased_products": 2}}
    assert body["traitsUsed"] == ["purchased_products"]


def test_a_local_purchase_is_excluded_as_a_recent_purchase(personalize_app, runtime, profile_api):
    client = personalize_app(**PATIENT).test_client()
    deliver(client, order_completed(["item-2", "item-4"], user_id="u-1"))
    body = get(client, "userId=u-1&numResults=3")
    assert ids(body) == ["item-1", "item-3", "item-5"]
    assert body["filtered"] == {"count": 2, "reasons": {"recent_purchase": 2}}


def test_the_seed_item_is_never_among_its_related_items(personalize_app, runtime, profile_api):
    client = personalize_app(**PATIENT).test_client()
    runtime.set_ranking("sku-1", ["sku-1", "sku-2", "sku-3", "sku-4"])
    body = get(client, "itemId=sku-1&numResults=3")
    assert ids(body) == ["sku-2", "sku-3", "sku-4"]


def test_every_exclusion_trait_counts(personalize_app, runtime, profile_api):
    client = personalize_app(
        exclusion_traits=("purchased_products", "hidden"), **PATIENT
    ).test_client()
    profile_api.set_traits(
        "user_id:u-1", {"purchased_products": ["item-2"], "hidden": "item-1", "other": ["item-3"]}
    )
    body = get(client, "userId=u-1&numResults=2")
    assert ids(body) == ["item-3", "item-4"]
    assert body["filtered"]["reasons"] == {"purchased_products": 1, "hidden": 1}


def test_exclusions_apply_to_popular_items_too(personalize_app, runtime, profile_api):
    client = personalize_app(**PATIENT).test_client()
    popular(client)
    profile_api.set_traits(
        "user_id:u-1", {"recommendations_opt_out": True, "purchased_products": ["pop-a"]}
    )
    body = get(client, "userId=u-1&numResults=2")
    assert (ids(body), body["source"]) == (["pop-b", "pop-c"], "popular")


def test_too_many_excluded_asks_once_more_for_as_many_as_allowed(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    # numResults=5: 15 are asked for (twice, and at least 10 more, than wanted).
    profile_api.set_traits("user_id:u-1", {"purchased_products": items(1, 12)})
    body = get(client, "userId=u-1&numResults=5")
    assert ids(body) == items(13, 17)
    assert body["filtered"] == {"count": 12, "reasons": {"purchased_products": 12}}
    first, second = recommendation_calls(runtime, userId="u-1")
    assert (first["numResults"], second["numResults"]) == (15, 500)
    # Still Personalize's answer, under the first request's id.
    assert body["source"] == "personalize"
    assert body["recommendationId"] == runtime.recommendation_ids[0]


def test_the_second_fetch_keeps_the_filter_values(personalize_app, runtime, profile_api):
    client = personalize_app(
        personalize_filter_arn=FILTER, filter_values_map=(("PLAN", "plan"),), **PATIENT
    ).test_client()
    profile_api.set_traits("user_id:u-1", {"plan": "gold", "purchased_products": items(1, 12)})
    assert ids(get(client, "userId=u-1&numResults=5")) == items(13, 17)
    calls = recommendation_calls(runtime, userId="u-1")
    assert [call["filterValues"] for call in calls] == [{"PLAN": '"gold"'}] * 2


def test_no_second_fetch_when_enough_are_left_or_the_first_answer_was_short(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    profile_api.set_traits("user_id:u-1", {"purchased_products": items(1, 10)})
    assert ids(get(client, "userId=u-1&numResults=5")) == items(11, 15)
    assert len(recommendation_calls(runtime, userId="u-1")) == 1
    # Fewer than asked for came back: there is no more to ask for.
    runtime.set_ranking("u-2", items(1, 8))
    profile_api.set_traits("user_id:u-2", {"purchased_products": items(1, 6)})
    assert ids(get(client, "userId=u-2&numResults=5")) == items(7, 8)
    assert len(recommendation_calls(runtime, userId="u-2")) == 1


def test_too_many_excluded_from_popular_items_asks_for_more_popular_ones(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    deliver(
        client,
        *[
            product_viewed(f"pop-{n:02d}", anonymous_id=f"v{i}")
            for n in range(1, 14)
            for i in range(20 - n)
        ],
    )
    # numResults=1: 11 popular items are asked for, and all 11 were bought.
    bought = [f"pop-{n:02d}" for n in range(1, 12)]
    profile_api.set_traits(
        "user_id:u-1", {"recommendations_opt_out": True, "purchased_products": bought}
    )
    body = get(client, "userId=u-1&numResults=1")
    assert (ids(body), body["source"]) == (["pop-12"], "popular")
    # The larger second fetch is of popular items: Personalize was asked once (at first,
    # beside the traits), never for more.
    assert len(runtime.calls_for("GetRecommendations")) == 1


# --- write-back -------------------------------------------------------------------------


def test_only_a_complete_personal_answer_for_a_consenting_known_user_is_written_back(
    personalize_app, runtime, profile_api
):
    """Without a write key the write-back lands in the local profile store: there it is
    seen whom it was written for. Each visitor below misses one condition; ``u-ok``
    meets them all (the positive control)."""
    app = personalize_app(
        activation_interval_seconds=0,
        personalize_filter_arn=FILTER,
        filter_values_map=(("LONG", "long"),),
        **PATIENT,
    )
    client = app.test_client()
    popular(client)
    profile_api.know_everyone({})
    profile_api.set_traits("user_id:u-out", {"recommendations_opt_out": True})
    # Personalize filter values are at most 1000 characters: the rest is left out, said
    # in ``degraded``.
    profile_api.set_traits("user_id:u-degraded", {"long": [f"value-{i:04d}" for i in range(300)]})
    runtime.set_ranking("u-empty", ["x-1", "x-2"])
    profile_api.set_traits("user_id:u-empty", {"purchased_products": ["x-1", "x-2"]})

    ok = get(client, "userId=u-ok&numResults=2")
    assert (ok["source"], "degraded" in ok) == ("personalize", False)
    assert get(client, "userId=u-out&numResults=2")["source"] == "popular"
    assert get(client, "userId=u-degraded&numResults=2")["degraded"] == {
        "filter": "filter value LONG cut to 1000 characters"
    }
    assert get(client, "userId=u-empty&numResults=2")["itemList"] == []
    assert get(client, "anonymousId=a-1&numResults=2")["source"] == "personalize"
    profile_api.fail(500)
    assert get(client, "userId=u-unread&numResults=2")["source"] == "popular"
    profile_api.fail(None)
    profile_api.know_everyone(None)  # a Profile API 404: Segment does not know them
    assert get(client, "userId=u-stranger&numResults=2")["source"] == "personalize"

    services = app.extensions["segment"]
    assert services.activation.wait_idle(10)
    with store_of(app).read() as conn:
        written = {
            row.profile_id: row.traits["recommended_products"]
            for row in conn.execute(sa.select(profiles.c.profile_id, profiles.c.traits))
            if "recommended_products" in row.traits
        }
    assert written == {"u-ok": ids(ok)}


def test_a_visitor_looking_at_an_item_is_not_recommended_that_item(make_app):
    """The local engine scores the item a signed-in visitor is looking at with their
    history, so the item itself comes back from it: the answer leaves it out, and tells
    the visitor why."""
    app = make_app(engine_model_refresh_seconds=0.001, secret_key=ENGINE_KEY)
    post_messages(app, catalogue())
    assert app.test_cli_runner().invoke(args=["train"]).exit_code == 0
    post_messages(app, [view("newcomer", "b1", 900)])
    token = mint_token(ENGINE_KEY, user_id="newcomer")
    response = app.test_client().get(
        "/recommendations?userId=newcomer&itemId=b2&numResults=3",
        headers={"Authorization": f"Bearer {token}"},
    )
    body = response.get_json()
    assert body["source"] == "local"
    assert "b2" not in ids(body) and len(ids(body)) == 3
    assert body["filtered"] == {"count": 1, "reasons": {"seed_item": 1}}


def test_every_answer_is_counted_by_source_and_whether_it_was_degraded(
    personalize_app, runtime, profile_api
):
    client = personalize_app(**PATIENT).test_client()
    popular(client)

    def count(source: str, degraded: str) -> float:
        return metric(client, "recommendations_total", source=source, degraded=degraded)

    before = {key: count(*key) for key in (("personalize", "false"), ("popular", "true"))}
    get(client, "userId=u-1&numResults=2")
    profile_api.fail(500)
    get(client, "userId=u-2&numResults=2")
    after = {key: count(*key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        ("personalize", "false"): 1,
        ("popular", "true"): 1,
    }
