"""The engine inside the service: the current model, recommendations, training.

* ``ModelHolder`` keeps the model a process serves and swaps in a newer version from the
  database (one reference assignment: a request sees the old model or the new one).
* ``LocalRecommender`` answers from the model and the person's *current* history, read from
  the store, so an accepted interaction changes the next answer without retraining.
* ``Trainer`` decides when to train (N new interactions, or T seconds and something new),
  takes the database lease so that one process trains at a time, trains (in a
  subprocess for background runs, so requests in this worker never compete with it) and
  saves the model where every worker picks it up.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from ..background import BackgroundThread
from ..memory import release_free_memory
from ..recommenders.base import Recommendation, ScoredItem
from ..storage import StoreUnavailable
from ..storage.leases import Lease, holder_name
from . import persistence as db
from .model import Model, Params, event_weights, top_n
from .model import train as train_model

log = logging.getLogger("webhook.engine")

LEASE_TTL = 180.0  # seconds; renewed every LEASE_TTL / 6 while training


class ModelHolder:
    def __init__(self, store, refresh_seconds: float):
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.version: int | None = None
        self.model: Model | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()

    def current(self) -> tuple[int | None, Model | None]:
        return self.version, self.model  # read together below: swapped as one tuple

    def refresh(self, force: bool = False) -> bool:
        """Load a newer model if the database has one. Only one thread of the process
        loads at a time; others go on serving the current model."""
        now = time.monotonic()
        if not force and now - self._checked_at < self.refresh_seconds:
            return False
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._checked_at = now
            info = db.latest_model_info(self.store)
            if info is None or info.version == self.version:
                return False
            model = db.load_model(self.store, info.version)
            if model is None:
                return False
            _ = model.index  # build the id → number map before anyone uses it
            self.model, self.version = model, info.version  # readers take .current()
            log.info("model loaded", extra={"model_version": info.version, "items": model.n_items})
            return True
        finally:
            self._lock.release()


class LocalRecommender:
    """``webhook.recommenders.Recommender`` on the local engine. Before the first model,
    and for people it knows nothing about, it answers with ``popular`` (the service's one
    popularity list, ``recommenders/popular.py``)."""

    name = "local"

    def __init__(self, store, settings, holder: ModelHolder, popular, inline_refresh: bool = True):
        self.store = store
        self.holder = holder
        self.popular = popular
        self.inline_refresh = inline_refresh  # False when a background thread refreshes
        self.weights = event_weights(settings.engine_event_weights)
        self.exclude_seen_default = getattr(settings, "engine_exclude_seen", True)
        # Interactions an answer reads: what it scores (the model's latest `history` of
        # them) and what counts as already seen.
        self.history_max = settings.engine_history_max

    # -- the protocol --------------------------------------------------------------------

    def recommend(
        self,
        *,
        user_id: str | None = None,
        item_id: str | None = None,
        num_results: int = 25,
        filter_values: Mapping[str, str] | None = None,
        exclude_seen: bool | None = None,
    ) -> Recommendation:
        """Items for a person (userId or anonymousId) or related to an item, best first.
        ``exclude_seen``: leave out items the person already interacted with (default:
        the ENGINE_EXCLUDE_SEEN setting). ``filter_values`` is not supported locally and
        is ignored."""
        version, model = self._model()
        num_results = max(0, int(num_results))
        exclude_seen = self.exclude_seen_default if exclude_seen is None else exclude_seen
        banned_ids: set[str] = set()
        details: dict = {"model_version": version}

        if item_id is not None and user_id is None:
            banned_ids.add(item_id)
            if model is not None and item_id in model.index:
                scores = model.score_item(model.index[item_id])
                return self._answer(
                    model, scores, banned_ids, num_results, "local", details, related=True
                )
            return self._popular_answer(banned_ids, num_results, details)

        history, seen = (
            db.read_history(self.store, user_id, self.history_max) if user_id else ([], set())
        )
        details["history"] = len(history)
        if exclude_seen:
            banned_ids.update(seen)
        if model is not None:
            index = model.index
            known = [
                (index[item], self.weights.get(event, 1.0))
                for item, event, _ in history
                if item in index
            ]
            if item_id is not None and item_id in index:  # a user looking at an item
                known.append((index[item_id], max(self.weights.values(), default=1.0)))
            if known:
                scores = model.score_history(known)
                return self._answer(model, scores, banned_ids, num_results, "local", details)
        return self._popular_answer(banned_ids, num_results, details)

    def _model(self):
        """(version, model) to answer with, refreshed first when no background thread
        does it (tests, ``flask`` commands); a store that is down keeps the current one."""
        if self.inline_refresh:
            try:
                self.holder.refresh()
            except StoreUnavailable:
                pass
        return self.holder.current()

    def rank(
        self,
        *,
        user_id: str | None = None,
        item_ids: Sequence[str] = (),
        filter_values: Mapping[str, str] | None = None,
    ) -> Recommendation:
        """``item_ids`` re-ordered for a person: by the model's scores for their current
        history; without a model or history, by popularity. Items neither knows come last,
        in the caller's order (as Personalize's GetPersonalizedRanking does).
        ``filter_values`` is ignored locally."""
        version, model = self._model()
        details: dict = {"model_version": version}
        ids = list(item_ids)
        history: list[tuple[str, str, float]] = []
        if model is not None and user_id:
            history, _ = db.read_history(
                self.store, user_id, min(self.history_max, model.params.history)
            )
        details["history"] = len(history)
        known_history = (
            [
                (model.index[item], self.weights.get(event, 1.0))
                for item, event, _ in history
                if item in model.index
            ]
            if model is not None
            else []
        )
        if not known_history:
            popular = self.popular.rank(item_ids=ids)
            return Recommendation(popular.items, "popular", uuid.uuid4().hex, details)
        index = model.index
        scores = model.score_history(known_history)
        known = [i for i in ids if i in index]
        known.sort(key=lambda i: -float(scores[index[i]]))
        rest = [i for i in ids if i not in index]
        return Recommendation(
            items=[ScoredItem(i, float(scores[index[i]])) for i in known]
            + [ScoredItem(i, 0.0) for i in rest],
            source="local",
            recommendation_id=uuid.uuid4().hex,
            details=details,
        )

    # -- helpers ---------------------------------------------------------------------------

    def _answer(
        self,
        model: Model,
        scores: np.ndarray,
        banned_ids: set,
        n: int,
        source: str,
        details: dict,
        related: bool = False,
    ) -> Recommendation:
        index = model.index
        banned = np.fromiter((index[i] for i in banned_ids if i in index), dtype=np.int64)
        best = top_n(scores, n, banned)
        ids = model.item_ids
        items = [ScoredItem(ids[i], float(scores[i])) for i in best.tolist()]
        return Recommendation(
            items=items, source=source, recommendation_id=uuid.uuid4().hex, details=details
        )

    def _popular_answer(self, banned_ids: set, n: int, details: dict) -> Recommendation:
        """The service's popular items (one algorithm: webhook/popularity.py), without the
        banned ones; those with interactions only (a list of everything would not be a
        recommendation)."""
        ranked = [s for s in self.popular.ranking() if s.score > 0 and s.item_id not in banned_ids][
            :n
        ]
        return Recommendation(
            items=ranked, source="popular", recommendation_id=uuid.uuid4().hex, details=details
        )


# -- training ------------------------------------------------------------------------------


def train_once(store, settings, params: Params | None = None) -> tuple[int, dict]:
    """Read the store, fit, save; returns (version, stats). The caller holds the lease."""
    started = time.perf_counter()
    count = db.count_interactions(store)
    limit = settings.engine_train_max_interactions
    if count > limit:
        log.info(
            "training on the most recent %d of %d interactions (ENGINE_TRAIN_MAX_INTERACTIONS)",
            limit,
            count,
            extra={"stored_interactions": count, "train_max_interactions": limit},
        )
    data, _ = db.load_training_data(
        store, event_weights(settings.engine_event_weights), limit if count > limit else None
    )
    loaded = time.perf_counter()
    model = train_model(data, params or Params())
    fitted = time.perf_counter()
    model.stats.update(
        load_seconds=round(loaded - started, 3),
        fit_seconds=round(fitted - loaded, 3),
        stored_interactions=count,
    )
    version = db.save_model(store, model, count)
    model.stats["save_seconds"] = round(time.perf_counter() - fitted, 3)
    log.info("model trained", extra={"model_version": version, **model.stats})
    return version, model.stats


def _train_in_child(settings, instance_path: str, params) -> None:
    """Entry point of the background training subprocess (spawned: a fresh interpreter):
    the service's parts as every process builds them (``wiring.build``)."""
    from ..wiring import build

    parts = build(settings, instance_path)
    try:
        train_once(parts.store, settings, params)
    finally:
        parts.store.dispose()


class Trainer:
    """When to train, and making sure one process does it."""

    def __init__(
        self,
        store,
        settings,
        holder: ModelHolder,
        params: Params | None = None,
        instance_path: str = "",
    ):
        self.store = store
        self.instance_path = instance_path
        self.settings = settings
        self.holder = holder
        self.params = params
        self.name = f"{holder_name()}:{uuid.uuid4().hex[:8]}"
        self.lease = Lease(store, "train")  # one process of the fleet trains at a time

    def due(self) -> str | None:
        """Why a training run is due now, or None."""
        info = db.latest_model_info(self.store)
        count = db.count_interactions(self.store)
        if info is None:
            return "no model yet" if count else None
        new = abs(count - info.interactions)
        if new >= self.settings.engine_train_after_interactions:
            return f"{new} new interactions"
        if new and time.time() - info.created_at >= self.settings.engine_train_interval_seconds:
            return "interval elapsed"
        return None

    def train(self, force: bool = False, subprocess: bool = False) -> int | None:
        """Train if due (or forced) and the lease is free; returns the new version or None."""
        if not force and self.due() is None:
            return None
        if not self.lease.acquire(self.name, LEASE_TTL):
            return None
        renewing = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(renewing,), daemon=True)
        renewer.start()
        try:
            if not force and self.due() is None:  # someone else just trained
                return None
            if subprocess:
                import multiprocessing

                ctx = multiprocessing.get_context("spawn")
                child = ctx.Process(
                    target=_train_in_child,
                    args=(self.settings, self.instance_path, self.params),
                    daemon=True,
                )
                child.start()
                child.join()
                if child.exitcode != 0:
                    log.error("background training failed", extra={"exitcode": child.exitcode})
                    return None
                info = db.latest_model_info(self.store)
                version = info.version if info else None
            else:
                version, _ = train_once(self.store, self.settings, self.params)
            self.holder.refresh(force=True)
            return version
        finally:
            renewing.set()
            renewer.join()
            self.lease.release(self.name)

    def _renew(self, done: threading.Event) -> None:
        while not done.wait(LEASE_TTL / 6):
            try:
                self.lease.acquire(self.name, LEASE_TTL)
            except StoreUnavailable:
                pass


class ModelRefresher(BackgroundThread):
    """The web process: swaps in a newer model when the database has one."""

    name = "engine-refresh"

    def __init__(self, holder: ModelHolder):
        super().__init__()
        self.holder = holder
        self.interval = holder.refresh_seconds

    def step(self) -> None:
        self.holder.refresh(force=True)
        release_free_memory()  # see webhook/memory.py: RSS would otherwise creep up


class TrainingLoop(BackgroundThread):
    """The worker: trains when due (in a child process, under the database lease)."""

    name = "engine-training"

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.trainer = trainer
        self.interval = trainer.settings.engine_model_refresh_seconds

    def step(self) -> None:
        self.trainer.train(subprocess=True)
        release_free_memory()
