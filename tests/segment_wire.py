"""Wire-level test support for the Segment webhook receiver.

Everything here is deliberately independent of the code under test (``webhook/``):

* ``capture_corpus()`` drives the *real* ``segment.analytics`` Python client
  against a local impersonation of Segment's Tracking API (``POST /v1/batch``)
  and returns the messages exactly as the library serialized them.
* ``node_deliveries()`` / ``node_sign()`` / ``node_stringify()`` compute bodies
  and ``X-Signature`` values with Node.js, i.e. with the same ``JSON.stringify``
  and ``crypto.createHmac`` that Segment's (JavaScript) delivery code uses, so a
  Python bug in the receiver cannot be mirrored by a Python bug in the fixture.
* ``classic_headers()`` / ``actions_headers()`` return the request headers the
  Webhooks (Classic) and Webhooks (Actions) destinations send.
* ``CaptureServer`` is a tiny recording HTTP server (on tests/loopback.py), usable as a
  stand-in for any upstream HTTP service.

Plain functions and classes only; pytest fixtures belong in the test modules.
"""

from __future__ import annotations

import base64
import gzip as _gzip
import json
import shutil
import subprocess
import threading
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

from requests.structures import CaseInsensitiveDict

from tests.loopback import LoopbackServer
from tests.waiting import wait_until

# --------------------------------------------------------------------------
# Fixed ids used by the scripted story (tests may assert on these).
# --------------------------------------------------------------------------

WRITE_KEY = "test-write-key"
ANON_ID = "anon-1"
USER_ID = "user-1"
GROUP_ID = "g-1"
ORDER_ID = "o-1"

PRODUCT_VIEWED = {
    "product_id": "sku-1",
    "sku": "SKU-1",
    "name": "Chaise longue",
    "price": 199.5,
    "category": "Furniture",
    "brand": "Möbel & Co",
    "url": "https://shop.example/p/sku-1",
    "image_url": "https://shop.example/i/sku-1.jpg",
}
PRODUCT_CLICKED = {"product_id": "sku-2", "name": "Lampe 💡", "price": 35}
PRODUCT_ADDED = {"product_id": "sku-1", "price": 199.5, "quantity": 1}
IDENTIFY_TRAITS = {
    "email": "jose@example.com",
    "name": "José Müller",
    "city": "Zürich",
    "purchased_products": ["sku-9"],
    "plan": "pro",
}
WISHLIST_ADDED = {"product_id": "sku-3", "name": "Tisch"}
ORDER_COMPLETED = {
    "order_id": ORDER_ID,
    "revenue": 234.5,
    "currency": "EUR",
    "products": [
        {
            "product_id": "sku-1",
            "sku": "SKU-1",
            "name": "Chaise longue",
            "price": 199.5,
            "quantity": 1,
        },
        {"product_id": "sku-2", "price": 35, "quantity": 1},
    ],
}
# E-commerce spec v1 event names/properties (v1 identified products by "id"/"sku").
V1_VIEWED_PRODUCT = {"sku": "SKU-4", "name": "Hocker"}
V1_COMPLETED_ORDER = {"products": [{"sku": "SKU-5"}]}
GROUP_TRAITS = {"name": "ACME"}

# The story in send order: (type, event name for track / name for page+screen / None).
STORY: list[tuple[str, str | None]] = [
    ("page", "Home"),
    ("track", "Product Viewed"),
    ("track", "Product Clicked"),
    ("track", "Product Added"),
    ("identify", None),
    ("alias", None),
    ("track", "Product Added to Wishlist"),
    ("track", "Order Completed"),
    ("track", "Viewed Product"),
    ("track", "Completed Order"),
    ("screen", "Cart"),
    ("group", None),
    ("track", "Signed Up"),
]
# The story's messages by position.
(
    PAGE,
    VIEWED,
    CLICKED,
    ADDED,
    IDENTIFY,
    ALIAS,
    WISHLIST,
    ORDER,
    V1_VIEWED,
    V1_ORDER,
    SCREEN,
    GROUP,
    SIGNED_UP,
) = range(len(STORY))


def emit_story(client) -> None:
    """Emit the scripted e-commerce story through a ``segment.analytics.Client``.

    Property/trait dicts are deep-copied so the module constants stay pristine
    whatever the client does with what it is given.
    """

    def cp(d):
        return json.loads(json.dumps(d))

    # Anonymous browsing.
    client.page(anonymous_id=ANON_ID, name="Home")
    client.track(anonymous_id=ANON_ID, event="Product Viewed", properties=cp(PRODUCT_VIEWED))
    client.track(anonymous_id=ANON_ID, event="Product Clicked", properties=cp(PRODUCT_CLICKED))
    client.track(anonymous_id=ANON_ID, event="Product Added", properties=cp(PRODUCT_ADDED))
    # Sign-in: identify + alias stitch anon-1 to user-1.
    client.identify(user_id=USER_ID, anonymous_id=ANON_ID, traits=cp(IDENTIFY_TRAITS))
    client.alias(previous_id=ANON_ID, user_id=USER_ID)
    # Known user.
    client.track(user_id=USER_ID, event="Product Added to Wishlist", properties=cp(WISHLIST_ADDED))
    client.track(user_id=USER_ID, event="Order Completed", properties=cp(ORDER_COMPLETED))
    client.track(user_id=USER_ID, event="Viewed Product", properties=cp(V1_VIEWED_PRODUCT))
    client.track(user_id=USER_ID, event="Completed Order", properties=cp(V1_COMPLETED_ORDER))
    client.screen(user_id=USER_ID, name="Cart")
    client.group(user_id=USER_ID, group_id=GROUP_ID, traits=cp(GROUP_TRAITS))
    client.track(user_id=USER_ID, event="Signed Up", properties={})  # not a product event


# --------------------------------------------------------------------------
# CaptureServer
# --------------------------------------------------------------------------


class CapturedRequest(NamedTuple):
    """One request as received. Unpacks as ``method, path, headers, body``."""

    method: str
    path: str  # includes the query string, as sent
    headers: CaseInsensitiveDict  # compares equal to a plain dict, case-insensitively
    body: bytes  # raw bytes off the wire (still compressed if the client compressed)

    def decoded_body(self) -> bytes:
        """The body with any ``Content-Encoding`` (gzip/deflate) undone."""
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding in ("", "identity"):
            return self.body
        if encoding in ("gzip", "x-gzip"):
            return _gzip.decompress(self.body)
        if encoding == "deflate":
            return zlib.decompress(self.body)
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")

    def json(self) -> Any:
        return json.loads(self.decoded_body())


def _read_body(handler) -> bytes:
    """The request's body as sent: Content-Length, or chunked transfer coding."""
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                # Skip optional trailers up to the terminating blank line.
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()  # CRLF after each chunk
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


# respond(request) -> (status, headers, body bytes)
Responder = Callable[[CapturedRequest], "tuple[int, dict[str, str], bytes]"]


class CaptureServer(LoopbackServer):
    """A recording HTTP server on 127.0.0.1 with an ephemeral port.

    ``with CaptureServer(status=200, json_body={}) as srv: ... srv.url ...``

    Every request (any method) is recorded in ``srv.requests`` in arrival order
    and answered with ``status`` and ``json_body`` (both can be changed while
    running), or by ``respond(request)`` if given, which returns
    ``(status, headers, body_bytes)``.
    """

    poll_interval = 0.02  # keeps stop() (shutdown waits for one poll) fast

    def __init__(
        self,
        status: int = 200,
        json_body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        respond: Responder | None = None,
    ):
        super().__init__()
        self.status = status
        self.json_body = {} if json_body is None else json_body
        self.headers = dict(headers or {})
        self.respond = respond
        self._requests: list[CapturedRequest] = []
        self._cond = threading.Condition()

    def _serve(self, handler) -> None:
        req = CapturedRequest(
            method=handler.command,
            path=handler.path,
            headers=CaseInsensitiveDict(handler.headers.items()),
            body=_read_body(handler),
        )
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()
        status, headers, payload = self._response_for(req)
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(payload)

    # -- inspection --------------------------------------------------------

    @property
    def requests(self) -> list[CapturedRequest]:
        """Snapshot of the requests received so far, in arrival order."""
        with self._cond:
            return list(self._requests)

    def clear(self) -> None:
        with self._cond:
            self._requests.clear()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[CapturedRequest]:
        """Wait until at least ``count`` requests arrived (for async clients)."""

        def arrived() -> list[CapturedRequest] | None:
            with self._cond:
                return list(self._requests) if len(self._requests) >= count else None

        return wait_until(arrived, timeout, f"{count} request(s) captured")

    def _response_for(self, req: CapturedRequest) -> tuple[int, dict[str, str], bytes]:
        if self.respond is not None:
            return self.respond(req)
        headers = {"Content-Type": "application/json", **self.headers}
        return self.status, headers, json.dumps(self.json_body).encode("utf-8")


# --------------------------------------------------------------------------
# Real analytics-python client -> captured corpus
# --------------------------------------------------------------------------

# requests merges HTTP(S)_PROXY from the environment unless a key is present
# with value None (None entries suppress the env value and are then dropped).
# Without this, a proxy in the environment would swallow our 127.0.0.1 posts.
_NO_PROXY = {"http": None, "https": None}


def capture_posts(*, gzip: bool = False, write_key: str = WRITE_KEY) -> list[CapturedRequest]:
    """Run the story through the real client; return the raw ``/v1/batch`` POSTs.

    Useful when a test needs the envelope (``sentAt``, ``writeKey``) or the
    client's request headers. ``sync_mode=True`` makes the library post each
    call immediately as its own batch, so request order == call order.
    """
    from segment.analytics import Client  # imported lazily: only needed here

    with CaptureServer(status=200, json_body={}) as srv:
        client = Client(
            write_key=write_key, host=srv.url, sync_mode=True, gzip=gzip, proxies=_NO_PROXY
        )
        emit_story(client)
        posts = srv.requests
    for req in posts:
        if (req.method, req.path) != ("POST", "/v1/batch"):
            raise AssertionError(
                f"unexpected request from analytics client: {req.method} {req.path}"
            )
    return posts


def capture_corpus(*, gzip: bool = False) -> list[dict]:
    """The story's messages exactly as analytics-python serialized them, in send order."""
    messages: list[dict] = []
    for req in capture_posts(gzip=gzip):
        messages.extend(req.json()["batch"])
    return messages


# --------------------------------------------------------------------------
# Node.js (JavaScript-exact) serialization and signing
# --------------------------------------------------------------------------

# Protocol: one JSON request on stdin, one JSON answer on stdout. Byte strings
# travel base64-encoded both ways so nothing is re-encoded in transit.
_NODE_SCRIPT = r"""
const crypto = require('crypto');
const chunks = [];
process.stdin.on('data', (c) => chunks.push(c));
process.stdin.on('end', () => {
  const req = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  const key = req.secret_b64 !== undefined ? Buffer.from(req.secret_b64, 'base64') : req.secret;
  // Same call as Segment's destinations: createHmac('sha1', secret).update(str, 'utf8').
  const signStr = (s) => crypto.createHmac('sha1', key).update(s, 'utf8').digest('hex');
  const b64 = (s) => Buffer.from(s, 'utf8').toString('base64');
  let out;
  if (req.op === 'deliveries') {
    const msgs = req.messages;
    out = {
      messages: msgs.map((m) => {
        const body = JSON.stringify(m);
        return { body: b64(body), signature: signStr(body) };
      }),
      batch_body: b64(JSON.stringify(msgs)),
      // Webhooks (Actions) batches sign JSON.stringify(payload[0]) only.
      batch_signature: msgs.length ? signStr(JSON.stringify(msgs[0])) : null,
    };
  } else if (req.op === 'sign') {
    const raw = Buffer.from(req.body_b64, 'base64');
    out = { signature: crypto.createHmac('sha1', key).update(raw).digest('hex') };
  } else if (req.op === 'stringify') {
    out = { body: b64(JSON.stringify(req.value)) };
  } else {
    throw new Error('unknown op ' + req.op);
  }
  process.stdout.write(JSON.stringify(out));
});
"""


def node_available() -> bool:
    return shutil.which("node") is not None


def _run_node(request: dict, secret: str | bytes | None = None) -> dict:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node (Node.js) is not on PATH")
    if isinstance(secret, bytes):
        request["secret_b64"] = base64.b64encode(secret).decode("ascii")
    elif secret is not None:
        request["secret"] = secret
    # ASCII-escaped JSON decodes to exactly the same JS strings as raw UTF-8
    # (JSON.parse turns \uXXXX back into the same UTF-16 code units), and it
    # also carries lone surrogates, which UTF-8 cannot. allow_nan=False: NaN
    # and Infinity are not JSON and JS would reject them anyway.
    stdin = json.dumps(request, ensure_ascii=True, allow_nan=False).encode("ascii")
    proc = subprocess.run([node, "-e", _NODE_SCRIPT], input=stdin, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(
            f"node failed ({proc.returncode}): {proc.stderr.decode('utf-8', 'replace')}"
        )
    return json.loads(proc.stdout)


def node_deliveries(messages: list[dict], secret: str | bytes) -> dict:
    """Bodies and signatures exactly as Segment's JavaScript would produce them.

    Returns::

        {
          "messages": [{"body": bytes, "signature": str}, ...],  # one per message
          "batch_body": bytes,        # JSON.stringify(messages)  (Actions batch)
          "batch_signature": str|None # HMAC-SHA1 of JSON.stringify(messages[0]) only
        }

    ``body`` is ``JSON.stringify(message)`` as UTF-8 bytes (compact, non-ASCII
    unescaped, JS number formatting: 1.0 -> 1, 1e21 -> 1e+21; integer-like keys
    such as "2" are moved first by JS object key ordering; ints beyond 2**53
    lose precision). ``signature`` is hex HMAC-SHA1(secret, body). Runs a single
    node process for the whole list.
    """
    out = _run_node({"op": "deliveries", "messages": messages}, secret)
    return {
        "messages": [
            {"body": base64.b64decode(m["body"]), "signature": m["signature"]}
            for m in out["messages"]
        ],
        "batch_body": base64.b64decode(out["batch_body"]),
        "batch_signature": out["batch_signature"],
    }


def node_sign(body: bytes, secret: str | bytes) -> str:
    """Hex HMAC-SHA1 of the exact ``body`` bytes, computed by node's crypto."""
    out = _run_node({"op": "sign", "body_b64": base64.b64encode(body).decode("ascii")}, secret)
    return out["signature"]


def node_stringify(obj: Any) -> bytes:
    """``JSON.stringify(obj)`` as UTF-8 bytes, computed by node."""
    return base64.b64decode(_run_node({"op": "stringify", "value": obj})["body"])


# --------------------------------------------------------------------------
# Destination request headers
# --------------------------------------------------------------------------


def _headers(user_agent: str, signature: str | None, bearer: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": user_agent}
    if signature is not None:
        headers["X-Signature"] = signature
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    return headers


def classic_headers(signature: str | None = None, bearer: str | None = None) -> dict[str, str]:
    """Headers of a Webhooks (Classic) delivery (``bearer``: a configured Authorization
    token, where the destination adds one)."""
    return _headers("Segment.io/1.0", signature, bearer)


def actions_headers(signature: str | None = None, bearer: str | None = None) -> dict[str, str]:
    """Headers of a Webhooks (Actions) delivery (``bearer``: a configured Authorization token)."""
    return _headers("Segment (Actions)", signature, bearer)
