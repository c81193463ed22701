"""The service's parts, built from ``Settings``: the one place that decides what runs.

``build(settings, instance_path)`` makes every part; the web process (``create_app``),
the worker (``flask --app webhook worker``), the command-line tools and the engine's
training child all call it, so no part is ever built from settings a second way.

| role | embedded default | production |
|---|---|---|
| appliers of the inbox | local store | local store + Personalize (PutEvents, PutUsers, PutItems) |
| recommender | local engine (popular items until a model exists) | Personalize GetRecommendations |
| profile source | local profile store | Segment Profile API |
| activation | local profile store | Segment Tracking API (identify) |

Which process runs what: the web process answers requests and reloads models
(``start_web``); the worker runs everything else (``start_worker``): the appliers,
retention, WAL checkpoints, data deletion jobs, training, and the write-backs that follow
a purchase. ``WORKER_IN_WEB`` runs the worker's part in the web process too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from .activation import Activation, LocalPublisher, SegmentPublisher
from .appliers import Runner
from .appliers.attribution import AttributionApplier
from .appliers.local import LocalStoreApplier
from .background import BackgroundThread
from .budget import HostBudget, HostShare, budget_path
from .consent import OptOut
from .deadletters import DeadLetters
from .deletions import DeletionSync
from .engine import Engine, make_engine
from .engine.model import event_weights
from .experiments import Experiment, Variant
from .impressions import ImpressionRecorder
from .inbox import Inbox
from .ingest import Ingestor
from .profiles import LocalProfiles, SegmentProfiles
from .recommend import NoRecommendations, RecommendationService, Request
from .recommenders.personalize import PersonalizeRecommender
from .recommenders.popular import PopularItems
from .retention import Retention
from .routing import Router
from .settings import Settings, reveal
from .storage import Store, StoreUnavailable, WalCheckpointer, sqlite_url_for
from .tombstones import Tombstones

log = logging.getLogger("webhook")

UNSIGNED_WARNING = (
    "UNSIGNED DELIVERIES ARE ACCEPTED: neither SEGMENT_SHARED_SECRET nor "
    "WEBHOOK_BEARER_TOKEN is set, so anyone who can reach POST /segment can write events"
)
OPEN_RECOMMENDATIONS_WARNING = (
    "GET /recommendations IS OPEN: SECRET_KEY is not set, so anyone can read anyone's "
    "recommendations (what the trait checks did is never shown without a token); set "
    "SECRET_KEY to require signed tokens"
)
OPEN_INSIGHTS_WARNING = (
    "GET /insights IS OPEN: INSIGHTS_TOKEN is not set, so anyone who can reach the service "
    "can read its click-through and revenue figures; set INSIGHTS_TOKEN to require it"
)
DELETIONS_WARNING = (
    "DELETION REQUESTS DO NOT REACH AMAZON PERSONALIZE YET: set "
    "PERSONALIZE_DATASET_GROUP_ARN, PERSONALIZE_DELETION_ROLE_ARN and "
    "PERSONALIZE_DELETION_S3_URI; deleted users are kept in a list until then"
)


@dataclass
class Parts:
    settings: Settings
    instance_path: str
    store: Store
    router: Router
    tombstones: Tombstones
    inbox: Inbox
    ingestor: Ingestor
    dead_letters: DeadLetters
    impressions: ImpressionRecorder | None  # None: INSIGHTS_RETENTION_DAYS=0
    popular: PopularItems
    engine: Engine
    recommendations: RecommendationService
    activation: Activation
    runners: dict[str, Runner] = field(default_factory=dict)  # applier name -> its runner
    retention: Retention | None = None
    checkpointer: WalCheckpointer | None = None  # SQLite: the WAL copied back off the lock
    deletions: DeletionSync | None = None  # Personalize mode: the data deletion jobs
    warnings: list[str] = field(default_factory=list)
    _web_started_in: int = 0

    # -- the schema -------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """The tables up to date and every applier's position there (once a process)."""
        if not self.store._schema_ready:
            self.store.ensure_schema()
            self.inbox.ensure_consumers(self.runners)

    # -- what runs where --------------------------------------------------------------------

    def worker_threads(self) -> list[BackgroundThread]:
        """The worker's loops: appliers, retention, checkpoints, deletion jobs, training."""
        threads: list[BackgroundThread] = [*self.runners.values()]
        for extra in (self.retention, self.checkpointer, self.deletions):
            if extra is not None:
                threads.append(extra)
        if self.settings.mode == "embedded" and self.settings.engine_background_training:
            threads.append(self.engine.training)
        return threads

    def web_threads(self) -> list[BackgroundThread]:
        """The web process's own loop: reloading the engine's newer models."""
        return (
            [self.engine.refresher]
            if self.settings.mode == "embedded" or self.settings.experiment
            else []
        )

    def start_worker(self) -> None:
        self.ensure_schema()
        for thread in self.worker_threads():
            thread.start()
        # Deliveries this process accepts wake its runners at once (WORKER_IN_WEB); a web
        # process without them has nothing to tell after each delivery.
        if self.wake_appliers not in self.ingestor.listeners:
            self.ingestor.listeners.append(self.wake_appliers)

    def start_web(self) -> None:
        """A web process's background work (once per process, after the server forked;
        then nothing: a comparison of process ids)."""
        if self._web_started_in == os.getpid():
            return
        self._web_started_in = os.getpid()
        for thread in self.web_threads():
            thread.start()
        self.engine.recommender.inline_refresh = False
        if self.settings.worker_in_web:
            try:
                self.start_worker()
            except StoreUnavailable as exc:
                log.warning("worker threads not started, the store is unavailable: %s", exc)

    def stop(self) -> None:
        """Everything this process started, batches in flight given back."""
        for runner in self.runners.values():
            sender = getattr(runner.applier, "sender", None)
            if sender is not None:
                sender.stop()
        for thread in [*self.worker_threads(), *self.web_threads()]:
            thread.stop()
        if self.impressions is not None:
            self.impressions.stop()

    def wake_appliers(self) -> None:
        """A delivery was committed: a runner of this process (WORKER_IN_WEB) looks now."""
        for runner in self.runners.values():
            if runner.running:
                runner.wake()

    def drain(self, names: Iterable[str] | None = None, timeout: float = 60.0) -> bool:
        """Apply what the inbox holds now, in this thread (CLI, tests); True if caught up.
        This process's recorded answers are written first (the attribution reads them)."""
        self.ensure_schema()
        if self.impressions is not None:
            self.impressions.flush()
        return all(
            self.runners[name].drain(timeout)
            for name in (names if names is not None else self.runners)
        )

    # -- write-back after a purchase (the local store applier reports them) -----------------

    def after_purchases(self, user_ids: Iterable[str]) -> None:
        """An Order Completed arrived: recompute and publish, off the applier's thread (on
        the activation queue: bounded; what does not fit is dropped and counted)."""
        for user_id in list(dict.fromkeys(user_ids))[:100]:
            self.activation.later(self._activate_after_purchase, user_id)

    def _activate_after_purchase(self, user_id: str) -> None:
        try:
            # The pipeline offers the list for write-back if, and only if, it may.
            self.recommendations.recommend(Request(user_id=user_id, record=False))
        except (NoRecommendations, StoreUnavailable) as exc:
            # Expected while the database or the recommender is down: no trace, a reason.
            log.warning("no write-back after a purchase: %s", type(exc).__name__)
        except Exception:
            log.exception("recommendations after a purchase failed")


def _personalize(settings: Settings, arn: str = "", *, ranking: bool = False):
    """A Personalize recommender: the configured campaign or recommender, or ``arn``."""
    if ranking:
        campaign, recommender = settings.personalize_ranking_campaign_arn, ""
    elif arn:
        is_recommender = ":recommender/" in arn
        campaign, recommender = ("" if is_recommender else arn), (arn if is_recommender else "")
    else:
        campaign = settings.personalize_campaign_arn
        recommender = settings.personalize_recommender_arn
    return PersonalizeRecommender(
        campaign_arn=campaign,
        recommender_arn=recommender,
        filter_arn=settings.personalize_filter_arn,
        region=settings.aws_region,
        timeout=settings.recommender_timeout_seconds,
    )


def _variants(settings: Settings, engine: Engine, popular: PopularItems) -> list[Variant]:
    """The experiment's variants (EXPERIMENT), or the one configured recommender. Ranking
    (POST /recommendations/rank) uses PERSONALIZE_RANKING_CAMPAIGN_ARN when it is set,
    else the local engine; in an experiment, the ``local`` variant always ranks with the
    local engine and ``popular`` by popularity."""
    ranker = (
        _personalize(settings, ranking=True)
        if settings.personalize_ranking_campaign_arn
        else engine.recommender
    )
    chosen = settings.experiment or ((settings.recommender_mode, 1.0),)
    variants = []
    for name, share in chosen:
        if name == "local":
            variants.append(
                Variant(
                    name,
                    engine.recommender,
                    engine.recommender if settings.experiment else ranker,
                    share,
                )
            )
        elif name == "popular":
            variants.append(Variant(name, popular, popular, share))
        else:  # personalize, or personalize:<ARN>
            arn = name.partition(":")[2]
            variants.append(Variant(name, _personalize(settings, arn), ranker, share))
    return variants


def _appliers(
    settings: Settings,
    store: Store,
    router: Router,
    dead_letters: DeadLetters,
    tombstones: Tombstones,
    parts: Parts,
) -> list:
    """The inbox's appliers: the local store's, Personalize's when it is configured, the
    attribution's when insights are kept."""
    appliers: list = [
        LocalStoreApplier(
            router,
            settings.purchase_events,
            store,
            on_purchases=parts.after_purchases,
            tombstones=tombstones,
            record_for_personalize=bool(settings.personalize_tracking_id),
        )
    ]
    if settings.personalize_tracking_id:
        from .appliers.personalize import PersonalizeApplier, Sender
        from .personalize_mapping import MappingConfig

        sender = Sender(
            region=settings.aws_region,
            call_timeout=settings.personalize_call_timeout_seconds,
            max_concurrency=settings.personalize_max_concurrency,
            events_per_second=settings.personalize_put_events_per_second,
            records_per_second=settings.personalize_put_records_per_second,
        )
        appliers.append(
            PersonalizeApplier(
                router,
                MappingConfig.from_settings(settings),
                sender,
                users_dataset_arn=settings.personalize_users_dataset_arn,
                items_dataset_arn=settings.personalize_items_dataset_arn,
                dead_letters=dead_letters,
                tombstones=tombstones,
            )
        )
    if settings.insights_retention_days:
        appliers.append(
            AttributionApplier(
                store,
                router,
                settings.purchase_events,
                window_hours=settings.attribution_window_hours,
                hold_seconds=settings.attribution_hold_seconds,
                before_apply=parts.impressions.flush if parts.impressions else None,
                tombstones=tombstones,
            )
        )
    return appliers


def build(settings: Settings, instance_path: str) -> Parts:
    """Every part of the service for these settings (see the module's docstring)."""
    store = Store(
        settings.database or sqlite_url_for(instance_path), synchronous=settings.sqlite_synchronous
    )
    router = Router(settings.interaction_events, settings.item_id_properties)
    tombstones = Tombstones(store)
    inbox = Inbox(store)
    ingestor = Ingestor(
        inbox,
        router,
        max_message_age_seconds=settings.max_message_age_seconds or None,
        interaction_retention_seconds=settings.interaction_retention_days * 86400.0 or None,
        consent_categories=settings.consent_categories,
        tombstones=tombstones,
    )
    dead_letters = DeadLetters(store, settings.dead_letters_max)
    impressions = (
        ImpressionRecorder(store, tombstones=tombstones)
        if settings.insights_retention_days
        else None
    )

    popular = PopularItems(store, weights=event_weights(settings.engine_event_weights))
    engine = make_engine(store, settings, popular, instance_path)
    experiment = Experiment(store, _variants(settings, engine, popular))
    if settings.profile_api_enabled:
        # A call in flight longer than its connect and read timeouts has reached Segment
        # or failed: counting it until then, and one second more, is enough.
        budget = HostBudget(
            budget_path(store.url, settings.segment_space_id),
            capacity=settings.profile_api_max_rps,
            stale_after=2 * settings.profile_api_timeout_seconds + 1,
        )
        profile_source = SegmentProfiles(
            settings.segment_profile_api_url,
            settings.segment_space_id,
            reveal(settings.segment_profile_api_token),
            timeout=settings.profile_api_timeout_seconds,
            cache_seconds=settings.profile_cache_seconds,
            budget=budget,
            share=HostShare(store, settings.profile_api_max_rps),
            tombstones=tombstones,
        )
    else:
        profile_source = LocalProfiles(store, settings.purchase_events)  # type: ignore[assignment]
    publisher = (
        SegmentPublisher(reveal(settings.segment_write_key), settings.segment_api_host)
        if settings.segment_write_key
        else LocalPublisher(store)
    )
    activation = Activation(
        store,
        publisher,
        settings.activation_trait,
        settings.activation_interval_seconds,
        queue_max=settings.activation_queue_max,
        tombstones=tombstones,
    )
    recommendations = RecommendationService(
        store=store,
        experiment=experiment,
        profiles=profile_source,
        popular=popular,
        activation=activation,
        recorder=impressions,
        exclusion_traits=settings.exclusion_traits,
        opt_out=OptOut(settings.opt_out_trait, settings.opt_out_values),
        purchase_events=settings.purchase_events,
        filter_values_map=settings.filter_values_map,
    )

    parts = Parts(
        settings=settings,
        instance_path=instance_path,
        store=store,
        router=router,
        tombstones=tombstones,
        inbox=inbox,
        ingestor=ingestor,
        dead_letters=dead_letters,
        impressions=impressions,
        popular=popular,
        engine=engine,
        recommendations=recommendations,
        activation=activation,
    )
    parts.runners = {
        applier.name: Runner(inbox, applier)
        for applier in _appliers(settings, store, router, dead_letters, tombstones, parts)
    }
    parts.retention = Retention(
        inbox,
        parts.runners,
        settings.message_retention_hours,
        settings.interaction_retention_days,
        settings.retention_interval_seconds,
        settings.insights_retention_days,
    )
    if store.dialect == "sqlite":
        parts.checkpointer = WalCheckpointer(store)
    if settings.mode == "personalize":
        parts.deletions = DeletionSync(store, settings)
        if not parts.deletions.configured:
            parts.warnings.append(DELETIONS_WARNING)
    if not settings.authentication_enforced:
        parts.warnings.append(UNSIGNED_WARNING)
    if not settings.secret_key:
        parts.warnings.append(OPEN_RECOMMENDATIONS_WARNING)
    if settings.insights_retention_days and not settings.insights_token:
        parts.warnings.append(OPEN_INSIGHTS_WARNING)
    return parts


def secret_values(settings: Settings) -> list[str]:
    """Every secret the log filter masks: the settings' and, since boto3 reads them from
    the environment itself, the AWS credentials."""
    values = settings.secret_values()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(name):
            values.append(os.environ[name])
    return values


def instance_folder() -> str:
    """The Flask instance folder of the ``webhook`` package (``instance/`` beside it):
    where SQLite lives without DATABASE_URL."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "instance")
