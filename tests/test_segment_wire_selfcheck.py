"""Self-checks for tests/segment_wire.py (the helpers, not the service)."""

import json
import re
import uuid

import pytest
import requests

from tests.deliveries import sign
from tests.segment_wire import (
    ANON_ID,
    GROUP_ID,
    IDENTIFY_TRAITS,
    ORDER_COMPLETED,
    PRODUCT_VIEWED,
    STORY,
    USER_ID,
    WRITE_KEY,
    CaptureServer,
    actions_headers,
    capture_posts,
    classic_headers,
    node_deliveries,
    node_sign,
    node_stringify,
)

needs_node = pytest.mark.requires("node")

# analytics-python: isoformat(timespec="milliseconds") of an aware UTC datetime.
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


def _key(m):
    return m["type"], m.get("event") or m.get("name")


def test_corpus_follows_story_with_library_fields(corpus):
    assert [_key(m) for m in corpus] == STORY
    for m in corpus:
        assert isinstance(m, dict)
        uuid.UUID(m["messageId"])
        assert TIMESTAMP_RE.match(m["timestamp"]), m["timestamp"]
        assert m["context"]["library"]["name"] == "analytics-python"
    assert len({m["messageId"] for m in corpus}) == len(corpus)
    assert [m["timestamp"] for m in corpus] == sorted(m["timestamp"] for m in corpus)


def test_corpus_contents(corpus):
    by_key = {_key(m): m for m in corpus}
    viewed = by_key[("track", "Product Viewed")]
    assert viewed["anonymousId"] == ANON_ID and viewed["userId"] is None
    assert viewed["properties"] == PRODUCT_VIEWED
    identify = by_key[("identify", None)]
    assert (identify["userId"], identify["anonymousId"]) == (USER_ID, ANON_ID)
    assert identify["traits"] == IDENTIFY_TRAITS
    alias = by_key[("alias", None)]
    assert (alias["previousId"], alias["userId"]) == (ANON_ID, USER_ID)
    assert by_key[("track", "Order Completed")]["properties"] == ORDER_COMPLETED
    assert by_key[("group", None)]["groupId"] == GROUP_ID
    assert by_key[("track", "Signed Up")]["properties"] == {}


def test_gzip_and_envelope():
    posts = capture_posts(gzip=True)
    assert len(posts) == len(STORY)  # sync mode: one POST per call
    first = posts[0]
    assert first.headers["content-encoding"] == "gzip"
    assert first.body[:2] == b"\x1f\x8b"
    envelope = first.json()
    assert set(envelope) == {"batch", "sentAt", "writeKey"}
    assert envelope["writeKey"] == WRITE_KEY and len(envelope["batch"]) == 1
    assert first.headers["Authorization"].startswith("Basic ")
    assert [_key(p.json()["batch"][0]) for p in posts] == STORY


@needs_node
def test_node_deliveries_match_python_hmac_and_js_stringify(corpus):
    secret = "s3cr3t"
    out = node_deliveries(corpus, secret)
    assert len(out["messages"]) == len(corpus)
    for msg, d in zip(corpus, out["messages"]):
        assert isinstance(d["body"], bytes)
        assert json.loads(d["body"]) == msg
        # For this corpus (no integral floats, no numeric keys) JS output equals
        # compact Python JSON with raw UTF-8.
        assert d["body"] == json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8"
        )
        assert d["signature"] == sign(d["body"], secret)
    clicked = out["messages"][STORY.index(("track", "Product Clicked"))]["body"]
    assert "Lampe 💡".encode() in clicked  # not \u-escaped, unlike the library's wire JSON


@needs_node
def test_batch_signature_covers_first_element_only(corpus):
    secret = "s3cr3t"
    out = node_deliveries(corpus[:3], secret)
    bodies = [d["body"] for d in out["messages"]]
    assert out["batch_body"] == b"[" + b",".join(bodies) + b"]"
    assert out["batch_signature"] == sign(bodies[0], secret)
    assert out["batch_signature"] != sign(out["batch_body"], secret)
    assert node_deliveries([], secret)["batch_signature"] is None


@needs_node
def test_node_stringify_and_sign_are_javascript():
    assert (
        node_stringify({"b": 1, "2": 2, "f": 1.0, "e": "é"})
        == '{"2":2,"b":1,"f":1,"e":"é"}'.encode()
    )
    body = '{"name":"José"}'.encode()
    assert node_sign(body, "clé") == sign(body, "clé")
    assert node_sign(b"\xff\x00raw", b"\x01key") == sign(b"\xff\x00raw", b"\x01key")


def test_headers():
    assert classic_headers("abc") == {
        "Content-Type": "application/json",
        "User-Agent": "Segment.io/1.0",
        "X-Signature": "abc",
    }
    assert "X-Signature" not in classic_headers()
    assert actions_headers("abc", bearer="tok") == {
        "Content-Type": "application/json",
        "User-Agent": "Segment (Actions)",
        "X-Signature": "abc",
        "Authorization": "Bearer tok",
    }
    assert set(actions_headers()) == {"Content-Type", "User-Agent"}


def test_capture_server_records_and_answers():
    with CaptureServer(status=202, json_body={"ok": True}) as srv:
        r = requests.put(srv.url + "/x?y=1", data=b"hello", headers={"X-Test": "1"}, timeout=5)
        assert (r.status_code, r.json()) == (202, {"ok": True})
        srv.status, srv.json_body = 500, {"err": 1}
        r = requests.post(
            srv.url + "/chunked", data=iter([b"ab", b"cd"]), timeout=5
        )  # chunked upload
        assert r.status_code == 500
        method, path, headers, body = srv.wait_for(2)[0]
    assert (method, path, body) == ("PUT", "/x?y=1", b"hello")
    assert headers["x-test"] == "1"
    assert srv.requests[1].body == b"abcd"


def test_capture_server_custom_responder():
    def respond(req):
        return 201, {"Content-Type": "text/plain"}, req.body.upper()

    with CaptureServer(respond=respond) as srv:
        r = requests.post(srv.url, data=b"echo", timeout=5)
    assert (r.status_code, r.text) == (201, "ECHO")
