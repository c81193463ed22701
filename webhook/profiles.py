"""Profile sources: a user's traits, for the trait checks on recommendations.

``SegmentProfiles`` asks the Segment Profile API (Personas) for the traits the rules use,
with a short timeout, pooled connections and a TTL cache. ``LocalProfiles`` reads the local
profile store (identify traits) and adds ``purchased_products`` from the purchases this
service received. Neither ever raises: a failure is a ``Profile`` with ``status`` saying so.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence
from urllib.parse import quote

import requests
import sqlalchemy as sa
from cachetools import TTLCache
from requests.adapters import HTTPAdapter

from .store import Store, StoreUnavailable, identity_links, interactions, profiles

log = logging.getLogger("webhook.profiles")


@dataclass(frozen=True)
class Profile:
    traits: dict
    status: str  # "ok", "not_found", "timeout", "error", "unavailable"
    source: str  # "segment" or "local"
    cached: bool = False
    detail: str = ""

    @property
    def degraded(self) -> bool:
        return self.status not in ("ok",)


class ProfileSource(Protocol):
    name: str

    def traits(self, *, user_id: str | None, anonymous_id: str | None,
               names: Sequence[str]) -> Profile: ...


def _profile_ids(conn, user_id: str | None, anonymous_id: str | None) -> tuple[set, set]:
    """(user ids, anonymous ids) that are the same person."""
    users = {user_id} if user_id else set()
    anons = {anonymous_id} if anonymous_id else set()
    if anonymous_id and not user_id:
        linked = conn.execute(sa.select(identity_links.c.user_id).where(
            identity_links.c.anonymous_id == anonymous_id)).scalar()
        if linked:
            users.add(linked)
    if users:
        anons.update(row[0] for row in conn.execute(sa.select(identity_links.c.anonymous_id)
                                                     .where(identity_links.c.user_id.in_(users))))
    return users, anons


def local_purchases(store: Store, purchase_events: Sequence[str], *, user_id: str | None,
                    anonymous_id: str | None) -> list[str]:
    """Items this service has seen the person buy (Order Completed), newest first."""
    with store.read() as conn:
        users, anons = _profile_ids(conn, user_id, anonymous_id)
        who = []
        if users:
            who.append(interactions.c.user_id.in_(users))
        if anons:
            who.append(interactions.c.anonymous_id.in_(anons))
        if not who:
            return []
        rows = conn.execute(
            sa.select(interactions.c.item_id, sa.func.max(interactions.c.timestamp))
            .where(sa.or_(*who), interactions.c.event_type.in_(list(purchase_events)))
            .group_by(interactions.c.item_id)
            .order_by(sa.func.max(interactions.c.timestamp).desc())
        )
        return [row[0] for row in rows]


class LocalProfiles:
    """The local profile store: identify traits, plus purchases as ``purchased_products``."""
    name = "local"

    def __init__(self, store: Store, purchase_events: Sequence[str],
                 purchases_trait: str = "purchased_products"):
        self.store = store
        self.purchase_events = tuple(purchase_events)
        self.purchases_trait = purchases_trait

    def traits(self, *, user_id: str | None, anonymous_id: str | None,
               names: Sequence[str]) -> Profile:
        try:
            with self.store.read() as conn:
                users, anons = _profile_ids(conn, user_id, anonymous_id)
                keys = list(users | anons)
                merged: dict = {}
                # Anonymous traits first, so the user's own traits win.
                rows = conn.execute(sa.select(profiles.c.profile_id, profiles.c.traits)
                                    .where(profiles.c.profile_id.in_(keys))).all()
                for row in sorted(rows, key=lambda r: r.profile_id in users):
                    merged.update(row.traits or {})
            purchases = local_purchases(self.store, self.purchase_events,
                                        user_id=user_id, anonymous_id=anonymous_id)
        except StoreUnavailable as exc:
            return Profile({}, "unavailable", self.name, detail=str(exc))
        if purchases:
            known = merged.get(self.purchases_trait)
            known = list(known) if isinstance(known, list) else []
            merged[self.purchases_trait] = known + [p for p in purchases if p not in known]
        wanted = set(names)
        traits = {k: v for k, v in merged.items() if not wanted or k in wanted}
        return Profile(traits, "ok" if rows or purchases else "not_found", self.name)


class SegmentProfiles:
    """The Segment Profile API: GET …/collections/users/profiles/<id>/traits?include=…"""
    name = "segment"

    def __init__(self, base_url: str, space_id: str, token: str, *, timeout: float = 0.25,
                 cache_seconds: float = 60.0, cache_size: int = 50000, pool_size: int = 16):
        self.base_url = base_url.rstrip("/")
        self.space_id = space_id
        self.timeout = timeout
        self._session = requests.Session()
        self._session.auth = (token, "")  # the access token is the Basic user name
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._session.headers["Accept"] = "application/json"
        self._cache: TTLCache | None = (
            TTLCache(maxsize=cache_size, ttl=cache_seconds) if cache_seconds > 0 else None)
        self._lock = threading.Lock()

    def _url(self, identifier: str) -> str:
        return (f"{self.base_url}/v1/spaces/{quote(self.space_id, safe='')}/collections/users/"
                f"profiles/{quote(identifier, safe=':')}/traits")

    def traits(self, *, user_id: str | None, anonymous_id: str | None,
               names: Sequence[str]) -> Profile:
        identifier = f"user_id:{user_id}" if user_id else f"anonymous_id:{anonymous_id}"
        key = (identifier, tuple(sorted(names)))
        if self._cache is not None:
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None:
                return Profile(hit.traits, hit.status, self.name, cached=True)
        profile = self._fetch(identifier, names)
        if self._cache is not None and profile.status in ("ok", "not_found"):
            with self._lock:
                self._cache[key] = profile
        return profile

    def _fetch(self, identifier: str, names: Sequence[str]) -> Profile:
        params = {"limit": "200"}
        if names:
            params["include"] = ",".join(names)
        try:
            response = self._session.get(self._url(identifier), params=params,
                                         timeout=self.timeout)
        except requests.Timeout:
            return Profile({}, "timeout", self.name, detail=f"no answer in {self.timeout}s")
        except requests.RequestException as exc:
            return Profile({}, "error", self.name, detail=type(exc).__name__)
        if response.status_code == 404:
            return Profile({}, "not_found", self.name)
        if response.status_code != 200:
            log.warning("profile api answered %s", response.status_code)
            return Profile({}, "error", self.name, detail=f"HTTP {response.status_code}")
        try:
            traits = response.json().get("traits") or {}
        except ValueError:
            return Profile({}, "error", self.name, detail="not JSON")
        if not isinstance(traits, dict):
            return Profile({}, "error", self.name, detail="traits is not an object")
        return Profile(traits, "ok", self.name)


def trait_items(value) -> list[str]:
    """Item ids from a trait: a list, or a string separated by commas or '|'."""
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, (str, int)) and not isinstance(v, bool)]
    if isinstance(value, str):
        return [part.strip() for part in value.replace("|", ",").split(",") if part.strip()]
    return []


def truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "opted_out", "opt-out")
    return bool(value)
