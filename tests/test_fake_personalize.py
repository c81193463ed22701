"""Self-checks for tests/fake_personalize.py, driven by the real boto3 clients.

They prove the fakes parse what boto3 actually sends and that botocore turns
the fakes' error answers into the exceptions real AWS answers produce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta, timezone

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.fake_personalize import FakePersonalizeEvents, FakePersonalizeRuntime

DATASET_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/ITEMS"
TRACKING_IDS = ["t", "track-1"]  # the event trackers that exist
CAMPAIGN_ARN = "arn:aws:personalize:us-east-1:123456789012:campaign/recs"
# Note: Config's retries["max_attempts"] counts *retries* (max_attempts=1 means two
# attempts); total_max_attempts counts attempts, like AWS_MAX_ATTEMPTS.
NO_RETRY = Config(retries={"total_max_attempts": 1, "mode": "standard"})


def make_client(service: str, url: str, config: Config = NO_RETRY):
    return boto3.client(
        service,
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=config,
    )


@pytest.fixture
def events_fake():
    with FakePersonalizeEvents(tracking_ids=TRACKING_IDS) as fake:
        yield fake


@pytest.fixture
def events(events_fake):
    return make_client("personalize-events", events_fake.url)


@pytest.fixture
def runtime_fake():
    with FakePersonalizeRuntime() as fake:
        yield fake


@pytest.fixture
def runtime(runtime_fake):
    return make_client("personalize-runtime", runtime_fake.url)


def event(**overrides):
    e = {"eventType": "click", "sentAt": datetime(2024, 5, 1, 12, 0, tzinfo=UTC)}
    e.update(overrides)
    return e


# --------------------------------------------------------------------------
# Personalize Events: what boto3 sends
# --------------------------------------------------------------------------


def test_put_events_wire_format(events, events_fake):
    cest = timezone(timedelta(hours=2))
    events.put_events(
        trackingId="track-1",
        userId="u1",
        sessionId="s1",
        eventList=[
            # Aware, non-UTC, with microseconds -> float epoch seconds in UTC.
            event(
                eventId="e1",
                itemId="sku-1",
                eventValue=2.5,
                sentAt=datetime(2024, 5, 1, 14, 0, 0, 250000, tzinfo=cest),
                properties=json.dumps({"discount": "yes"}),
                recommendationId="RID-1",
                impression=["sku-1", "sku-2"],
            ),
            # Naive datetime: botocore assumes UTC; whole seconds -> int.
            event(eventId="e2", sentAt=datetime(2024, 5, 1, 12, 0, 1)),
        ],
    )
    (call,) = events_fake.calls
    op, body, _ = call  # calls are (operation, body, time) tuples
    assert op == "PutEvents"
    first, second = body["eventList"]
    assert first["sentAt"] == 1714564800.25 and isinstance(first["sentAt"], float)
    assert second["sentAt"] == 1714564801 and isinstance(second["sentAt"], int)
    # jsonvalue body members travel as plain JSON strings.
    assert first["properties"] == '{"discount": "yes"}'
    assert first["eventValue"] == 2.5
    assert [e["eventId"] for e in events_fake.events()] == ["e1", "e2"]
    assert events_fake.events()[1] == {
        "eventId": "e2",
        "eventType": "click",
        "sentAt": 1714564801,
        "trackingId": "track-1",
        "sessionId": "s1",
        "userId": "u1",
    }


def test_put_users_and_items(events, events_fake):
    events.put_users(
        datasetArn=DATASET_ARN, users=[{"userId": "u1", "properties": json.dumps({"plan": "pro"})}]
    )
    events.put_items(datasetArn=DATASET_ARN, items=[{"itemId": "sku-1"}, {"itemId": "sku-2"}])
    assert events_fake.users() == [
        {"userId": "u1", "properties": '{"plan": "pro"}', "datasetArn": DATASET_ARN}
    ]
    assert [i["itemId"] for i in events_fake.items()] == ["sku-1", "sku-2"]
    assert [c.operation for c in events_fake.calls] == ["PutUsers", "PutItems"]


# --------------------------------------------------------------------------
# Personalize Events: server-side validation -> InvalidInputException
# --------------------------------------------------------------------------

INVALID_PUT_EVENTS = {
    "11 events": dict(eventList=[event()] * 11),
    "userId 257 chars": dict(userId="u" * 257, eventList=[event()]),
    "properties 1025 chars": dict(eventList=[event(properties=json.dumps({"k": "v" * 1016}))]),
    "properties not JSON": dict(eventList=[event(properties="{not json")]),
    "properties not an object": dict(eventList=[event(properties="[1, 2]")]),
    "recommendationId 41 chars": dict(eventList=[event(recommendationId="R" * 41)]),
    "26 impressions": dict(eventList=[event(impression=[f"i{n}" for n in range(26)])]),
    "itemId 257 chars": dict(eventList=[event(itemId="i" * 257)]),
}


@pytest.mark.parametrize("overrides", INVALID_PUT_EVENTS.values(), ids=INVALID_PUT_EVENTS.keys())
def test_put_events_invalid_input(events, events_fake, overrides):
    kwargs = dict(trackingId="t", sessionId="s")
    kwargs.update(overrides)
    with pytest.raises(events.exceptions.InvalidInputException) as info:
        events.put_events(**kwargs)
    err = info.value.response
    assert err["Error"]["Code"] == "InvalidInputException"
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert err["Error"]["Message"]
    assert events_fake.calls == [] and events_fake.attempts == 1


def test_botocore_checks_only_minimums_client_side(events, events_fake):
    # Missing sentAt / empty eventList never leave the client...
    with pytest.raises(botocore.exceptions.ParamValidationError):
        events.put_events(trackingId="t", sessionId="s", eventList=[{"eventType": "x"}])
    with pytest.raises(botocore.exceptions.ParamValidationError):
        events.put_events(trackingId="t", sessionId="s", eventList=[])
    assert events_fake.attempts == 0
    # ...but maximums and patterns are the service's job.
    with pytest.raises(events.exceptions.InvalidInputException):
        events.put_items(datasetArn="not-an-arn", items=[{"itemId": "sku-1"}])
    with pytest.raises(events.exceptions.InvalidInputException):
        events.put_users(datasetArn=DATASET_ARN, users=[{"userId": f"u{i}"} for i in range(11)])


def test_rejected_ids(events, events_fake):
    events_fake.reject_event_ids({"bad-event"})
    events_fake.reject_items({"bad-sku"})
    with pytest.raises(events.exceptions.InvalidInputException, match="bad-event"):
        events.put_events(
            trackingId="t",
            sessionId="s",
            eventList=[event(eventId="ok"), event(eventId="bad-event")],
        )
    with pytest.raises(events.exceptions.InvalidInputException, match="bad-sku"):
        events.put_items(datasetArn=DATASET_ARN, items=[{"itemId": "bad-sku"}])
    events.put_items(datasetArn=DATASET_ARN, items=[{"itemId": "good-sku"}])
    assert [c.operation for c in events_fake.calls] == ["PutItems"]
    assert events_fake.attempts == 3
    events_fake.reset()
    events.put_items(datasetArn=DATASET_ARN, items=[{"itemId": "bad-sku"}])
    assert events_fake.attempts == 1


# --------------------------------------------------------------------------
# Failure injection as botocore sees it
# --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 429])
def test_throttling_is_a_client_error_with_throttling_code(events, events_fake, status):
    events_fake.throttle_next(1, status=status)
    with pytest.raises(ClientError) as info:
        events.put_events(trackingId="t", sessionId="s", eventList=[event()])
    err = info.value.response
    assert err["Error"] == {"Code": "ThrottlingException", "Message": "Rate exceeded"}
    assert err["ResponseMetadata"]["HTTPStatusCode"] == status
    events.put_events(trackingId="t", sessionId="s", eventList=[event()])
    assert len(events_fake.calls) == 1 and events_fake.attempts == 2


@pytest.mark.parametrize("status", [400, 429])
def test_botocore_retries_throttling(events_fake, status):
    # Standard mode treats ThrottlingException as retryable (one retry: <= 1 s backoff).
    client = make_client(
        "personalize-events",
        events_fake.url,
        Config(retries={"total_max_attempts": 2, "mode": "standard"}),
    )
    events_fake.throttle_next(1, status=status)
    client.put_events(trackingId="t", sessionId="s", eventList=[event()])
    log = events_fake.attempt_log
    assert [(a.status, a.error_code) for a in log] == [(status, "ThrottlingException"), (200, None)]
    assert "attempt=2" in log[1].headers["amz-sdk-request"]


@pytest.mark.parametrize("status", [400, 429])
def test_throttle_for_window(events, events_fake, status):
    events_fake.throttle_for(60, status=status)
    for _ in range(3):
        with pytest.raises(ClientError, match="ThrottlingException") as info:
            events.put_items(datasetArn=DATASET_ARN, items=[{"itemId": "a"}])
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    events_fake.reset()
    events.put_items(datasetArn=DATASET_ARN, items=[{"itemId": "a"}])


def test_throttling_has_no_status_aws_does_not_send(events_fake):
    for bad in (403, 500, 503):
        with pytest.raises(ValueError):
            events_fake.throttle_next(1, status=bad)
        with pytest.raises(ValueError):
            events_fake.throttle_for(1, status=bad)


# --------------------------------------------------------------------------
# Personalize Events: only the event trackers that exist
# --------------------------------------------------------------------------


def test_an_unknown_tracking_id_is_resource_not_found(events, events_fake):
    with pytest.raises(events.exceptions.ResourceNotFoundException) as info:
        events.put_events(trackingId="no-such-tracker", sessionId="s", eventList=[event()])
    err = info.value.response
    assert err["Error"]["Code"] == "ResourceNotFoundException"
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert "no-such-tracker" in err["Error"]["Message"]
    assert events_fake.calls == [] and events_fake.attempts == 1
    # A tracking id differing only in case is another tracker.
    with pytest.raises(events.exceptions.ResourceNotFoundException):
        events.put_events(trackingId="T", sessionId="s", eventList=[event()])
    # The known ones are accepted (the positive control), under the id they were sent with.
    events.put_events(trackingId="track-1", sessionId="s", eventList=[event(eventId="e1")])
    assert [(e["eventId"], e["trackingId"]) for e in events_fake.events()] == [("e1", "track-1")]


def test_input_errors_are_answered_before_the_tracking_id_is_looked_up(events, events_fake):
    with pytest.raises(events.exceptions.InvalidInputException):
        events.put_events(trackingId="no-such-tracker", sessionId="s", eventList=[event()] * 11)


def test_a_tracker_created_later_is_accepted_from_then_on(events, events_fake):
    with pytest.raises(events.exceptions.ResourceNotFoundException):
        events.put_events(trackingId="new-tracker", sessionId="s", eventList=[event()])
    events_fake.add_tracking_ids(["new-tracker"])
    events_fake.reset()  # history and failures go; the trackers stay
    events.put_events(trackingId="new-tracker", sessionId="s", eventList=[event()])
    assert events_fake.tracking_ids == {"t", "track-1", "new-tracker"}
    assert len(events_fake.calls) == 1


def test_the_tracking_ids_must_be_given():
    with pytest.raises(TypeError):
        FakePersonalizeEvents()  # no "accept any tracking id"
    with pytest.raises(TypeError):
        FakePersonalizeEvents(tracking_ids="t")  # one string is not a list of ids


@pytest.mark.parametrize("status, code", [(500, "InternalFailure"), (503, "ServiceUnavailable")])
def test_server_errors(events, events_fake, status, code):
    events_fake.fail_next(1, status=status)
    with pytest.raises(ClientError) as info:
        events.put_events(trackingId="t", sessionId="s", eventList=[event()])
    assert info.value.response["Error"]["Code"] == code
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status


def test_delay_causes_read_timeout_but_call_lands(events_fake):
    client = make_client(
        "personalize-events",
        events_fake.url,
        Config(read_timeout=0.2, retries={"total_max_attempts": 1}),
    )
    events_fake.delay(0.6, n=1)
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        client.put_events(trackingId="t", sessionId="s", eventList=[event(eventId="e1")])
    # The server still processed it: a retry by the caller would duplicate it.
    events_fake.wait_for_calls(1, timeout=5)
    client.put_events(trackingId="t", sessionId="s", eventList=[event(eventId="e1")])
    assert [e["eventId"] for e in events_fake.events()] == ["e1", "e1"]


def test_unsigned_requests_are_refused(events_fake):
    req = urllib.request.Request(events_fake.url + "/events", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    with info.value as response:  # close the socket it holds
        assert response.code == 403
        assert response.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
    assert events_fake.attempts == 1 and events_fake.calls == []


# --------------------------------------------------------------------------
# Endpoint from the environment
# --------------------------------------------------------------------------


def test_endpoint_url_from_environment(events_fake, runtime_fake, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_PERSONALIZE_EVENTS", events_fake.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_PERSONALIZE_RUNTIME", runtime_fake.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # Fresh session: nothing cached from other tests.
    session = boto3.session.Session()
    session.client("personalize-events").put_events(
        trackingId="t", sessionId="s", eventList=[event()]
    )
    session.client("personalize-runtime").get_recommendations(campaignArn=CAMPAIGN_ARN, userId="u1")
    assert len(events_fake.calls) == 1 and len(runtime_fake.calls) == 1


def test_endpoint_url_from_environment_in_subprocess(events_fake):
    # A whole process configured only through its environment, as the service runs.
    code = (
        "import boto3, datetime\n"
        "boto3.client('personalize-events').put_events(trackingId='t', sessionId='s',"
        " eventList=[{'eventType': 'x', 'sentAt': datetime.datetime(2024, 1, 1)}])\n"
    )
    env = {
        "AWS_ENDPOINT_URL_PERSONALIZE_EVENTS": events_fake.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert events_fake.events()[0]["sentAt"] == 1704067200


# --------------------------------------------------------------------------
# Personalize Runtime
# --------------------------------------------------------------------------


def test_get_recommendations(runtime, runtime_fake):
    runtime_fake.set_ranking("u1", ["a", "b", "c"])
    resp = runtime.get_recommendations(campaignArn=CAMPAIGN_ARN, userId="u1", numResults=2)
    assert [i["itemId"] for i in resp["itemList"]] == ["a", "b"]
    assert resp["itemList"][0]["score"] > resp["itemList"][1]["score"]
    assert resp["recommendationId"].startswith("RID-")
    # Everyone else gets the default ranking, 25 results by default.
    resp = runtime.get_recommendations(campaignArn=CAMPAIGN_ARN, userId="someone")
    assert len(resp["itemList"]) == 25 and resp["itemList"][0]["itemId"] == "item-1"
    # Related items are keyed by itemId.
    runtime_fake.set_ranking("sku-1", ["sku-2", "sku-1", "sku-3"])
    resp = runtime.get_recommendations(campaignArn=CAMPAIGN_ARN, itemId="sku-1")
    assert [i["itemId"] for i in resp["itemList"]] == ["sku-2", "sku-3"]
    assert runtime_fake.calls[0].body == {
        "campaignArn": CAMPAIGN_ARN,
        "userId": "u1",
        "numResults": 2,
    }


INVALID_GET_RECOMMENDATIONS = {
    "numResults 501": dict(campaignArn=CAMPAIGN_ARN, userId="u", numResults=501),
    "numResults 0": dict(campaignArn=CAMPAIGN_ARN, userId="u", numResults=0),
    "no arn": dict(userId="u"),
    "two arns": dict(campaignArn=CAMPAIGN_ARN, recommenderArn=CAMPAIGN_ARN, userId="u"),
    "no user or item": dict(campaignArn=CAMPAIGN_ARN),
    "26 filter keys": dict(
        campaignArn=CAMPAIGN_ARN,
        userId="u",
        filterArn=CAMPAIGN_ARN,
        filterValues={f"k{i}": '"v"' for i in range(26)},
    ),
    "filter value 1001": dict(
        campaignArn=CAMPAIGN_ARN, userId="u", filterArn=CAMPAIGN_ARN, filterValues={"k": "v" * 1001}
    ),
}


@pytest.mark.parametrize(
    "kwargs", INVALID_GET_RECOMMENDATIONS.values(), ids=INVALID_GET_RECOMMENDATIONS.keys()
)
def test_get_recommendations_invalid_input(runtime, kwargs):
    with pytest.raises(runtime.exceptions.InvalidInputException):
        runtime.get_recommendations(**kwargs)


def test_get_personalized_ranking(runtime, runtime_fake):
    runtime_fake.set_ranking("u1", ["c", "a", "b"])
    resp = runtime.get_personalized_ranking(
        campaignArn=CAMPAIGN_ARN, userId="u1", inputList=["x", "a", "b", "y", "c"]
    )
    assert [i["itemId"] for i in resp["personalizedRanking"]] == ["c", "a", "b", "x", "y"]
    assert resp["personalizedRanking"][-1]["score"] == 0.0


def test_runtime_failure_injection(runtime, runtime_fake):
    runtime_fake.throttle_next(1)
    runtime_fake.fail_next(1)
    with pytest.raises(ClientError, match="ThrottlingException"):
        runtime.get_recommendations(campaignArn=CAMPAIGN_ARN, userId="u")
    with pytest.raises(ClientError, match="InternalFailure"):
        runtime.get_recommendations(campaignArn=CAMPAIGN_ARN, userId="u")
    runtime.get_recommendations(campaignArn=CAMPAIGN_ARN, userId="u")
    assert runtime_fake.attempts == 3 and len(runtime_fake.calls) == 1
