"""Profile sources: a user's traits, for the trait checks on recommendations.

``SegmentProfiles`` asks the Segment Profile API (Personas) for the traits the rules use,
with a short timeout, pooled connections, a TTL cache, one call per visitor at a time
(single-flight), following the answer's pages while a trait asked for is still missing
(``MAX_PAGES`` at most, within the one timeout), and within the Profile API budget
(``webhook/budget.py``: at most ``PROFILE_API_MAX_RPS`` per space, shared by the workers
and hosts; a 429 pauses every call of the host for its ``Retry-After``, a second without
one). ``LocalProfiles`` reads the local profile store (identify traits) and adds
``purchased_products`` from the purchases this service received. Neither ever raises: a
failure is a ``Profile`` with ``status`` saying so.

A profile is *known* when it was read (``ok``) or does not exist (``not_found``: nobody
has set a trait, so nobody has opted out). Every other status (timeout, error, throttled,
paused, over_budget, unavailable) means the traits, the opt-out among them, are unknown.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

import requests
import sqlalchemy as sa
from cachetools import TTLCache
from requests.adapters import HTTPAdapter

from . import metrics
from .identity import Person, latest_interactions, subject
from .storage import Store, StoreUnavailable
from .storage.schema import interactions, profiles

log = logging.getLogger("webhook.profiles")

KNOWN = ("ok", "not_found")
MAX_PAUSE_SECONDS = 300.0  # a Retry-After longer than this is taken as this
# The Profile API answers traits a page at a time (``cursor.has_more``), and a page may
# hold fewer than the ``limit`` asked. Pages are followed while a trait asked for is
# missing, this many at most, within the one lookup's timeout; traits still missing then
# are unknown, not absent (an opt-out on page 4 must not read as "not opted out").
MAX_PAGES = 3


@dataclass(frozen=True)
class Profile:
    traits: dict
    # "ok", "not_found"; unknown: "timeout", "error", "throttled", "paused", "over_budget",
    # "unavailable"
    status: str
    source: str  # "segment" or "local"
    cached: bool = False
    detail: str = ""
    read_at: float = field(default_factory=time.time)

    @property
    def known(self) -> bool:
        """The traits are what the profile holds (none, for a profile that does not
        exist); otherwise nothing is known about them, the opt-out included."""
        return self.status in KNOWN

    @property
    def degraded(self) -> bool:
        return not self.known


class ProfileSource(Protocol):
    name: str

    def traits(
        self, *, user_id: str | None, anonymous_id: str | None, names: Sequence[str]
    ) -> Profile: ...


PURCHASES_READ = 500  # a visitor's latest interactions (per id) searched for purchases


def _purchases_of(
    conn, person: Person, purchase_events: Sequence[str], first: str | None = None
) -> list[str]:
    """Items bought among the person's latest ``PURCHASES_READ`` interactions, newest
    first: a bounded read (``identity.latest_interactions``), so a visitor with 100,000
    interactions costs an answer no more than one with a few hundred."""
    latest = latest_interactions(
        conn,
        person,
        (interactions.c.item_id, interactions.c.event_type, interactions.c.timestamp),
        PURCHASES_READ,
        first=first,
    )
    if latest is None:
        return []
    recent = latest.subquery()
    rows = conn.execute(
        sa.select(recent.c.item_id, sa.func.max(recent.c.timestamp))
        .where(recent.c.event_type.in_(list(purchase_events)))
        .group_by(recent.c.item_id)
        .order_by(sa.func.max(recent.c.timestamp).desc())
    )
    return [row[0] for row in rows]


def local_purchases(
    store: Store, purchase_events: Sequence[str], *, user_id: str | None, anonymous_id: str | None
) -> list[str]:
    """Items this service has seen the visitor buy (Order Completed) among their latest
    interactions (``_purchases_of``), newest first: of the data a request for them may
    read (``identity.subject``)."""
    with store.read() as conn:
        return _purchases_of(
            conn,
            subject(conn, user_id=user_id, anonymous_id=anonymous_id),
            purchase_events,
            first=anonymous_id,
        )


class LocalProfiles:
    """The local profile store: identify traits, plus purchases as ``purchased_products``."""

    name = "local"

    def __init__(
        self,
        store: Store,
        purchase_events: Sequence[str],
        purchases_trait: str = "purchased_products",
    ):
        self.store = store
        self.purchase_events = tuple(purchase_events)
        self.purchases_trait = purchases_trait

    def traits(
        self, *, user_id: str | None, anonymous_id: str | None, names: Sequence[str]
    ) -> Profile:
        try:
            with self.store.read() as conn:
                person = subject(conn, user_id=user_id, anonymous_id=anonymous_id)
                merged: dict = {}
                # Anonymous traits first, so the user's own traits win.
                rows = conn.execute(
                    sa.select(profiles.c.profile_id, profiles.c.traits).where(
                        profiles.c.profile_id.in_(person.ids)
                    )
                ).all()
                for row in sorted(rows, key=lambda r: r.profile_id == person.user_id):
                    merged.update(row.traits or {})
                purchases = _purchases_of(conn, person, self.purchase_events, first=anonymous_id)
        except StoreUnavailable as exc:
            return Profile({}, "unavailable", self.name, detail=str(exc))
        if purchases:
            known = merged.get(self.purchases_trait)
            known = list(known) if isinstance(known, list) else []
            merged[self.purchases_trait] = known + [p for p in purchases if p not in known]
        wanted = set(names)
        traits = {k: v for k, v in merged.items() if not wanted or k in wanted}
        return Profile(traits, "ok" if rows or purchases else "not_found", self.name)


class _Flight:
    """One Profile API call that concurrent requests for the same visitor share."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.profile: Profile | None = None


class SegmentProfiles:
    """The Segment Profile API: GET …/collections/users/profiles/<id>/traits?include=…"""

    name = "segment"

    def __init__(
        self,
        base_url: str,
        space_id: str,
        token: str,
        *,
        timeout: float = 0.25,
        cache_seconds: float = 60.0,
        cache_size: int = 50000,
        pool_size: int = 16,
        budget=None,
        share=None,
        tombstones=None,
    ):
        self.base_url = base_url.rstrip("/")
        self.space_id = space_id
        self.timeout = timeout
        self.budget = budget  # webhook.budget.HostBudget, or None: no budget
        self.share = share  # webhook.budget.HostShare: this host's calls per second
        # A cached profile of a person deleted since it was read is not served: every
        # worker's cache lets go of them within the tombstones' refresh (a second).
        self.tombstones = tombstones
        self._session = requests.Session()
        self._session.auth = (token, "")  # the access token is the Basic user name
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._session.headers["Accept"] = "application/json"
        self._cache: TTLCache | None = (
            TTLCache(maxsize=cache_size, ttl=cache_seconds) if cache_seconds > 0 else None
        )
        self._lock = threading.Lock()
        self._flights: dict[tuple, _Flight] = {}
        # The outcome of each call that reached the Profile API, for the 404 warning.
        self._answers: deque[tuple[float, str]] = deque(maxlen=10_000)

    def _url(self, identifier: str) -> str:
        return (
            f"{self.base_url}/v1/spaces/{quote(self.space_id, safe='')}/collections/users/"
            f"profiles/{quote(identifier, safe=':')}/traits"
        )

    def traits(
        self, *, user_id: str | None, anonymous_id: str | None, names: Sequence[str]
    ) -> Profile:
        identifier = f"user_id:{user_id}" if user_id else f"anonymous_id:{anonymous_id}"
        key = (identifier, tuple(sorted(names)))
        with self._lock:
            hit = self._cache.get(key) if self._cache is not None else None
            if hit is None:
                flight = self._flights.get(key)
                leader = flight is None
                if leader:
                    flight = self._flights[key] = _Flight()
        if hit is not None and self._forgotten(hit, user_id, anonymous_id):
            with self._lock:
                if self._cache is not None:
                    self._cache.pop(key, None)
            return self.traits(user_id=user_id, anonymous_id=anonymous_id, names=names)
        if hit is not None:
            metrics.PROFILE_LOOKUPS.labels(outcome="cached").inc()
            return Profile(hit.traits, hit.status, self.name, cached=True, read_at=hit.read_at)
        assert flight is not None  # hit is None: this request leads, or another does
        if not leader:
            # Single-flight: another request is asking for this visitor right now.
            metrics.PROFILE_LOOKUPS.labels(outcome="shared").inc()
            if flight.done.wait(self.timeout + 0.05) and flight.profile is not None:
                return flight.profile
            return Profile({}, "timeout", self.name, detail=f"no answer in {self.timeout}s")
        profile = Profile({}, "error", self.name, detail="lookup failed")
        try:
            profile = self._lookup(identifier, names)
        finally:
            with self._lock:
                if self._cache is not None and profile.known:
                    self._cache[key] = profile
                del self._flights[key]
            flight.profile = profile
            flight.done.set()
        return profile

    def _forgotten(self, hit: Profile, user_id: str | None, anonymous_id: str | None) -> bool:
        if self.tombstones is None:
            return False
        try:
            return self.tombstones.deleted_since((user_id, anonymous_id), hit.read_at)
        except StoreUnavailable:
            return True  # cannot tell: ask Segment again

    def _lookup(self, identifier: str, names: Sequence[str]) -> Profile:
        deadline = time.monotonic() + self.timeout
        traits: dict = {}
        after = ""  # the cursor of the next page
        profile = Profile(
            {}, "error", self.name, detail=f"traits incomplete after {MAX_PAGES} pages"
        )
        for _page in range(MAX_PAGES):
            ticket = 0
            if self.budget is not None:  # every page is a call within the budget
                share = self.share.share() if self.share is not None else self.budget.capacity
                admitted, ticket = self.budget.acquire(share)
                if admitted != "ok":
                    metrics.PROFILE_LOOKUPS.labels(outcome=admitted).inc()
                    detail = (
                        "calls paused after a 429 (Retry-After)"
                        if admitted == "paused"
                        else "PROFILE_API_MAX_RPS reached"
                    )
                    return Profile({}, admitted, self.name, detail=detail)
            try:
                answer, after = self._fetch(identifier, names, after, deadline)
            finally:
                if ticket:
                    self.budget.complete(ticket)
            if answer.status != "ok":
                profile = answer
                break
            traits.update(answer.traits)
            if not after or all(name in traits for name in names):
                profile = Profile(traits, "ok", self.name)
                break
        metrics.PROFILE_LOOKUPS.labels(outcome=profile.status).inc()
        self._answers.append((time.monotonic(), profile.status))
        return profile

    def not_found_share(self, window: float = 60.0) -> tuple[float, int]:
        """(share of 404s, calls) among this process's Profile API calls in the last
        ``window`` seconds: mostly 404s suggests a wrong SEGMENT_SPACE_ID."""
        since = time.monotonic() - window
        recent = [status for at, status in list(self._answers) if at >= since]
        if not recent:
            return 0.0, 0
        return sum(status == "not_found" for status in recent) / len(recent), len(recent)

    def _fetch(
        self, identifier: str, names: Sequence[str], after: str, deadline: float
    ) -> tuple[Profile, str]:
        """One page of traits, from the cursor ``after`` (""): the page, and the cursor
        of the next one ("" when there is none)."""
        timed_out = Profile({}, "timeout", self.name, detail=f"no answer in {self.timeout}s")
        params = {"limit": "200"}
        if names:
            params["include"] = ",".join(names)
        if after:
            params["next"] = after
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return timed_out, ""
        try:
            response = self._session.get(self._url(identifier), params=params, timeout=remaining)
        except requests.Timeout:
            return timed_out, ""
        except requests.RequestException as exc:
            return Profile({}, "error", self.name, detail=type(exc).__name__), ""
        if response.status_code == 404:
            return Profile({}, "not_found", self.name), ""
        if response.status_code == 429:
            seconds = retry_after_seconds(response.headers.get("Retry-After"))
            if self.budget is not None:
                self.budget.pause(seconds)
            log.warning("profile api answered 429: calls paused for %.1f s", seconds)
            return Profile(
                {}, "throttled", self.name, detail=f"HTTP 429, calls paused for {seconds:g} s"
            ), ""
        if response.status_code != 200:
            log.warning("profile api answered %s", response.status_code)
            return Profile({}, "error", self.name, detail=f"HTTP {response.status_code}"), ""
        try:
            body = response.json()
        except ValueError:
            return Profile({}, "error", self.name, detail="not JSON"), ""
        traits = (body.get("traits") or {}) if isinstance(body, dict) else None
        if not isinstance(traits, dict):
            return Profile({}, "error", self.name, detail="traits is not an object"), ""
        cursor = body.get("cursor")
        following = ""
        if isinstance(cursor, dict) and cursor.get("has_more") is True:
            following = cursor.get("next") or ""
            if not isinstance(following, str) or not following:
                return Profile(
                    {}, "error", self.name, detail="more traits, but no cursor to them"
                ), ""
        return Profile(traits, "ok", self.name), following


def retry_after_seconds(value: str | None, default: float = 1.0) -> float:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date; bounded."""
    if value:
        value = value.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                seconds = when.timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                seconds = default
        if seconds == seconds:  # not NaN
            return min(max(seconds, 0.0), MAX_PAUSE_SECONDS)
    return default


def trait_items(value) -> list[str]:
    """Item ids from a trait: a list, or a string separated by commas or '|'."""
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, (str, int)) and not isinstance(v, bool)]
    if isinstance(value, str):
        return [part.strip() for part in value.replace("|", ",").split(",") if part.strip()]
    return []
