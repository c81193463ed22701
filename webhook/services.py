"""The service's parts, chosen by configuration: the one place that decides what runs.

| role | embedded default | production |
|---|---|---|
| appliers of the inbox | local store | local store + Amazon Personalize (PutEvents/PutUsers/PutItems) |
| recommender | local engine (popular items until a model exists) | Personalize GetRecommendations |
| profile source | local profile store | Segment Profile API |
| activation | local profile store | Segment Tracking API (identify) |
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .activation import Activation, LocalPublisher, SegmentPublisher
from .appliers import Runner
from .appliers.attribution import AttributionApplier
from .appliers.local import LocalStoreApplier
from .appliers.process import AppliersProcess
from .budget import HostBudget, HostShare, budget_path
from .config import SECRET_FIELDS, Settings
from .consent import OptOut
from .deadletters import DeadLetters
from .deletions import DeletionSync
from .engine import make_engine
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
from .store import Store, StoreUnavailable, WalCheckpointer, sqlite_url_for
from .tombstones import Tombstones

log = logging.getLogger("webhook")

UNSIGNED_WARNING = (
    "UNSIGNED DELIVERIES ARE ACCEPTED: neither SEGMENT_SHARED_SECRET nor "
    "WEBHOOK_BEARER_TOKEN is set, so anyone who can reach POST /segment can write events"
)
OPEN_RECOMMENDATIONS_WARNING = (
    "GET /recommendations IS OPEN: SECRET_KEY is not set, so anyone can read anyone's "
    "recommendations (trait values are never shown without a token); set SECRET_KEY to "
    "require signed tokens"
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
class Services:
    settings: Settings
    store: Store
    ingestor: Ingestor
    inbox: Inbox
    runners: dict[str, Runner] = field(default_factory=dict)  # applier name -> its runner
    # The appliers' own process (APPLIER_NICE); None: the runners' threads in each worker.
    applier_process: AppliersProcess | None = None
    retention: Retention | None = None
    checkpointer: WalCheckpointer | None = None  # SQLite: the WAL copied back off the lock
    dead_letters: DeadLetters | None = None
    tombstones: Tombstones | None = None
    warnings: list[str] = field(default_factory=list)
    _schema_ready: bool = False
    _schema_lock: threading.Lock = field(default_factory=threading.Lock)
    _background_pid: int = 0

    def ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                self.store.create_schema()
                self.inbox.ensure_consumers(self.runners)
                self._schema_ready = True

    # -- the inbox's appliers and retention, in the background ---------------------------

    def start_background(self) -> None:
        """Start this process's applier threads and retention loop (once per process; a
        server worker calls it after the fork)."""
        if self._background_pid == os.getpid():
            return
        self._background_pid = os.getpid()
        if self.checkpointer is not None:
            self.checkpointer.start()
        if self.applier_process is not None:
            self.applier_process.start()
        else:
            self.start_runner_threads()
        if self.retention is not None:
            self.retention.start()
        if self.deletions is not None:  # one process of the fleet per run (a lease)
            self.deletions.start_background()
        if self.engine is not None and self.settings.mode == "embedded":
            # Swaps in new models and, when due, trains (in a subprocess, under the
            # database lease); the recommender then no longer refreshes inline.
            self.engine.trainer.start_background(self.settings.engine_model_refresh_seconds)
            self.engine.recommender.inline_refresh = False

    def start_runner_threads(self) -> None:
        """The appliers as threads of this process (APPLIER_NICE=off, or no lock file)."""
        for runner in self.runners.values():
            runner.start()

    def stop_background(self) -> None:
        if self.applier_process is not None:
            self.applier_process.stop()
        for runner in self.runners.values():
            sender = getattr(runner.applier, "sender", None)
            if sender is not None:
                sender.stop()
            runner.stop()
        if self.retention is not None:
            self.retention.stop()
        if self.deletions is not None:
            self.deletions.stop_background()
        if self.impressions is not None:
            self.impressions.stop()
        if self.engine is not None:
            self.engine.trainer.stop_background()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self._background_pid = 0

    def wake_appliers(self) -> None:
        if self.applier_process is not None:
            self.applier_process.wake()
        for runner in self.runners.values():  # a set flag is not set again: no lock
            runner.wake()

    def drain(self, names=None, timeout: float = 60.0) -> bool:
        """Apply what the inbox holds now, in this thread (CLI, tests); True if caught up.
        This worker's recorded answers are written first (the attribution reads them)."""
        self.ensure_schema()
        if self.impressions is not None:
            self.impressions.flush()
        return all(self.runners[name].drain(timeout)
                   for name in (names if names is not None else self.runners))

    recommendations: RecommendationService | None = None
    activation: Activation | None = None
    popular: PopularItems | None = None
    engine: object | None = None  # webhook.engine.Engine: the local engine's parts
    impressions: ImpressionRecorder | None = None  # None: INSIGHTS_RETENTION_DAYS=0
    deletions: object | None = None  # webhook.deletions.DeletionSync (Personalize mode)

    def after_purchases(self, user_ids: Iterable[str]) -> None:
        """An Order Completed arrived: recompute and publish, off the request path (on the
        activation queue: bounded; what does not fit is dropped and counted)."""
        if self.recommendations is None or self.activation is None:
            return
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


def secret_values(settings: Settings) -> list[str]:
    values: list[str] = []
    for name in SECRET_FIELDS:
        value = getattr(settings, name)
        values.extend(value if isinstance(value, tuple) else [value])
    # boto3 reads AWS credentials from the environment itself; they are secrets all the same.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        values.append(os.environ.get(name, ""))
    # A database URL's password is the secret part of it.
    match = re.match(r"^[^:]+://[^:/@]*:([^@]+)@", settings.database_url)
    if match:
        values.append(match.group(1))
    return [v for v in values if v]


def _personalize_applier(settings: Settings, router: Router, dead_letters: DeadLetters,
                         tombstones: Tombstones):
    from .appliers.personalize import PersonalizeApplier, Sender
    from .personalize_mapping import MappingConfig
    sender = Sender(region=settings.aws_region,
                    call_timeout=settings.personalize_call_timeout_seconds,
                    max_concurrency=settings.personalize_max_concurrency,
                    events_per_second=settings.personalize_put_events_per_second,
                    records_per_second=settings.personalize_put_records_per_second,
                    nice=settings.personalize_sender_nice)
    return PersonalizeApplier(router, MappingConfig.from_settings(settings), sender,
                              users_dataset_arn=settings.personalize_users_dataset_arn,
                              items_dataset_arn=settings.personalize_items_dataset_arn,
                              dead_letters=dead_letters, tombstones=tombstones)


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
        campaign_arn=campaign, recommender_arn=recommender,
        filter_arn=settings.personalize_filter_arn, region=settings.aws_region,
        timeout=settings.recommender_timeout_seconds)


def _variants(settings: Settings, engine, popular: PopularItems) -> list[Variant]:
    """The experiment's variants (EXPERIMENT), or the one configured recommender. Ranking
    (POST /recommendations/rank) uses PERSONALIZE_RANKING_CAMPAIGN_ARN when it is set,
    else the local engine; in an experiment, the ``local`` variant always ranks with the
    local engine and ``popular`` by popularity."""
    ranker = (_personalize(settings, ranking=True)
              if settings.personalize_ranking_campaign_arn else engine.recommender)
    chosen = settings.experiment or ((settings.recommender_mode, 1.0),)
    variants = []
    for name, share in chosen:
        if name == "local":
            variants.append(Variant(name, engine.recommender,
                                    engine.recommender if settings.experiment else ranker,
                                    share))
        elif name == "popular":
            variants.append(Variant(name, popular, popular, share))
        else:  # personalize, or personalize:<ARN>
            arn = name.partition(":")[2]
            variants.append(Variant(name, _personalize(settings, arn), ranker, share))
    return variants


def build_appliers(settings: Settings, store: Store, router: Router,
                   dead_letters: DeadLetters, tombstones: Tombstones, *,
                   on_purchases: Callable[[list[str]], None] | None,
                   before_attribution: Callable[[], object] | None) -> list:
    """The inbox's appliers for these settings: the local store's, Personalize's when it
    is configured, the attribution's when insights are kept. Built alike in a worker (the
    CLI's and tests' drain, APPLIER_NICE=off) and in the appliers' own process."""
    appliers = [LocalStoreApplier(router, settings.purchase_events, store,
                                  on_purchases=on_purchases, tombstones=tombstones,
                                  record_for_personalize=bool(settings.personalize_tracking_id))]
    if settings.personalize_tracking_id:
        appliers.append(_personalize_applier(settings, router, dead_letters, tombstones))
    if settings.insights_retention_days:
        appliers.append(AttributionApplier(
            store, router, settings.purchase_events,
            window_hours=settings.attribution_window_hours,
            hold_seconds=settings.attribution_hold_seconds,
            before_apply=before_attribution, tombstones=tombstones))
    return appliers


def build_services(settings: Settings, instance_path: str) -> Services:
    store = Store(settings.database_url or sqlite_url_for(instance_path),
                  synchronous=settings.sqlite_synchronous)
    router = Router(settings.interaction_events, settings.item_id_properties)
    tombstones = Tombstones(store)
    ingestor = Ingestor(
        store, router, max_message_age_seconds=settings.max_message_age_seconds or None,
        interaction_retention_seconds=settings.interaction_retention_days * 86400.0 or None,
        consent_categories=settings.consent_categories, tombstones=tombstones)
    inbox = Inbox(store)
    dead_letters = DeadLetters(store, settings.dead_letters_max)
    services = Services(settings=settings, store=store, ingestor=ingestor, inbox=inbox,
                        dead_letters=dead_letters, tombstones=tombstones)
    if settings.insights_retention_days:
        services.impressions = ImpressionRecorder(store, tombstones=tombstones)
    appliers = build_appliers(settings, store, router, dead_letters, tombstones,
                              on_purchases=services.after_purchases,
                              before_attribution=(services.impressions.flush
                                                  if services.impressions else None))
    services.runners = {applier.name: Runner(inbox, applier) for applier in appliers}
    if settings.applier_nice != "off" and not store.in_memory:
        # An in-memory database is one process's alone: its appliers stay in it.
        services.applier_process = AppliersProcess(settings, instance_path, store.url,
                                                   on_purchases=services.after_purchases,
                                                   fallback=services.start_runner_threads)
    if store.dialect == "sqlite":
        services.checkpointer = WalCheckpointer(store)
    services.retention = Retention(inbox, services.runners, settings.message_retention_hours,
                                   settings.interaction_retention_days,
                                   settings.retention_interval_seconds,
                                   settings.insights_retention_days)
    ingestor.listeners.append(services.wake_appliers)
    if not settings.authentication_enforced:
        services.warnings.append(UNSIGNED_WARNING)
    if not settings.secret_key:
        services.warnings.append(OPEN_RECOMMENDATIONS_WARNING)
    if settings.insights_retention_days and not settings.insights_token:
        services.warnings.append(OPEN_INSIGHTS_WARNING)

    # The one wiring of the read side: popular items, the local engine (it answers before
    # Personalize is configured and ranks without a ranking campaign), the recommenders
    # of the experiment's variants, the profile source and activation; nothing is
    # replaced later.
    popular = PopularItems(store, weights=event_weights(settings.engine_event_weights))
    engine = make_engine(store, settings, popular)
    experiment = Experiment(store, _variants(settings, engine, popular))
    if settings.profile_api_enabled:
        # A call in flight longer than its connect and read timeouts has reached Segment
        # or failed: counting it until then, and one second more, is enough.
        budget = HostBudget(budget_path(store.url, settings.segment_space_id),
                            capacity=settings.profile_api_max_rps,
                            stale_after=2 * settings.profile_api_timeout_seconds + 1)
        profile_source = SegmentProfiles(
            settings.segment_profile_api_url, settings.segment_space_id,
            settings.segment_profile_api_token, timeout=settings.profile_api_timeout_seconds,
            cache_seconds=settings.profile_cache_seconds, budget=budget,
            share=HostShare(store, settings.profile_api_max_rps), tombstones=tombstones)
    else:
        profile_source = LocalProfiles(store, settings.purchase_events)
    publisher = (SegmentPublisher(settings.segment_write_key, settings.segment_api_host)
                 if settings.segment_write_key else LocalPublisher(store))
    activation = Activation(store, publisher, settings.activation_trait,
                            settings.activation_interval_seconds,
                            queue_max=settings.activation_queue_max, tombstones=tombstones)
    services.popular = popular
    services.engine = engine
    services.activation = activation
    services.recommendations = RecommendationService(
        store=store, experiment=experiment, profiles=profile_source,
        popular=popular, activation=activation, recorder=services.impressions,
        exclusion_traits=settings.exclusion_traits,
        opt_out=OptOut(settings.opt_out_trait, settings.opt_out_values),
        purchase_events=settings.purchase_events,
        filter_values_map=settings.filter_values_map)
    if settings.mode == "personalize":
        services.deletions = DeletionSync(store, settings)
        if not services.deletions.configured:
            services.warnings.append(DELETIONS_WARNING)
    return services
