"""Settings: read once from the environment at start-up, validated, typed.

Every setting has one canonical upper-case name; a few also answer to the lower-case
names the AWS workshop's Lambda functions used. A bad value stops the start with a
message naming the variable (``ConfigError``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

DEFAULT_INTERACTION_EVENTS = (
    # E-commerce spec v2 names ...
    "Product Viewed",
    "Product Clicked",
    "Product Added",
    "Product Added to Wishlist",
    "Order Completed",
    # ... and their v1 names, which older sources still send.
    "Viewed Product",
    "Clicked Product",
    "Added Product",
    "Added Product to Wishlist",
    "Completed Order",
)


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


def _text(value: str) -> str:
    return value.strip()


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _positive_int(value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"must be greater than 0, got {number}")
    return number


def _nice(value: str) -> int | str:
    if value.strip().lower() == "idle":
        return "idle"
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"expected idle or a whole number from 0 to 19, got {value!r}") \
            from None
    if not 0 <= number <= 19:
        raise ValueError(f"must be from 0 to 19, got {number}")
    return number


def _nice_or_off(value: str) -> int | str:
    if value.strip().lower() == "off":
        return "off"
    try:
        return _nice(value)
    except ValueError:
        raise ValueError(f"expected off, idle or a whole number from 0 to 19, got {value!r}") \
            from None


def _positive_float(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"must be a finite number greater than 0, got {value!r}")
    return number


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError(f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {value!r}")
    return level


LOG_FORMATS = ("auto", "text", "json")


def _log_format(value: str) -> str:
    name = value.strip().lower()
    if name not in LOG_FORMATS:
        raise ValueError(f"expected auto, text or json, got {value!r}")
    return name


def _database_url(value: str) -> str:
    url = value.strip()
    # Heroku still hands out postgres:// URLs, which SQLAlchemy no longer accepts.
    if url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url[len("postgres://"):]
    elif url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if not (url.startswith("postgresql+") or url.startswith("sqlite:")):
        raise ValueError("expected a postgres://, postgresql:// or sqlite:/// URL")
    return url


def _item_id_properties(value: str) -> tuple[str, ...]:
    names = _csv(value)
    if not names:
        raise ValueError("name at least one property, e.g. product_id,sku")
    return names


def _secrets(value: str) -> tuple[str, ...]:
    return _csv(value)


def _pairs(value: str) -> tuple[tuple[str, str], ...]:
    """``a=b,c=d`` (or a JSON object) as ordered pairs; ``a`` alone means ``a=camelCase(a)``."""
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a JSON object: {exc}") from None
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in data.items()):
            raise ValueError("expected a JSON object of non-empty strings")
        return tuple(data.items())
    pairs = []
    for part in _csv(text):
        source, sep, target = (p.strip() for p in part.partition("="))
        if not source or (sep and not target):
            raise ValueError(f"expected name=value pairs, got {part!r}")
        pairs.append((source, target or camel_case(source)))
    return tuple(pairs)


def camel_case(name: str) -> str:
    """``image_url`` → ``imageUrl``, ``Product Category`` → ``productCategory``."""
    words = [w for w in re.split(r"[^0-9A-Za-z]+", name) if w]
    if not words:
        return name
    return words[0][:1].lower() + words[0][1:] + "".join(w[:1].upper() + w[1:] for w in words[1:])


def _arn(value: str) -> str:
    arn = value.strip()
    if not re.match(r"^arn:[a-z\d-]+:personalize:[^:]*:[^:]*:.+$", arn):
        raise ValueError(f"expected an Amazon Personalize ARN (arn:aws:personalize:...), "
                         f"got {arn[:60]!r}")
    return arn


def _boolean(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _weights(value: str) -> tuple[tuple[str, float], ...]:
    """``Product Viewed=1,Order Completed=5``: a weight for each event name."""
    weights = []
    for name, number in _pairs(value):
        try:
            weight = float(number)
        except ValueError:
            raise ValueError(f"the weight of {name!r} is not a number: {number!r}") from None
        if not weight >= 0 or weight == float("inf"):
            raise ValueError(f"the weight of {name!r} must be 0 or more")
        weights.append((name, weight))
    return tuple(weights)


def _non_negative_float(value: str) -> float:
    if value.strip() == "0":
        return 0.0
    return _positive_float(value)


def _http_url(value: str) -> str:
    url = value.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"expected an http(s):// URL, got {url[:60]!r}")
    return url


def _origins(value: str) -> tuple[str, ...]:
    origins = _csv(value)
    for origin in origins:
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
            raise ValueError(f"expected origins like https://shop.example (no path), "
                             f"got {origin!r}")
    return origins


def _secret_key(value: str) -> str:
    key = value.strip()
    if len(key) < 16:
        raise ValueError("must be at least 16 characters (use a long random value)")
    return key


def _optional_property(value: str) -> str:
    return value.strip()


def _synchronous(value: str) -> str:
    mode = value.strip().upper()
    if mode not in ("FULL", "NORMAL"):
        raise ValueError(f"expected FULL or NORMAL, got {value!r}")
    return mode


def _off_or_positive_float(value: str) -> float:
    """0 (off) or a finite number greater than 0."""
    if value.strip() in ("0", "0.0"):
        return 0.0
    return _positive_float(value)
def _role_arn(value: str) -> str:
    arn = value.strip()
    if not re.match(r"^arn:[a-z\d-]+:iam::\d{12}:role/?[A-Za-z_0-9+=,.@\-/]+$", arn):
        raise ValueError(f"expected an IAM role ARN (arn:aws:iam::123456789012:role/NAME), "
                         f"got {arn[:60]!r}")
    return arn


def _s3_uri(value: str) -> str:
    uri = value.strip()
    if not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", uri):
        raise ValueError(f"expected s3://bucket or s3://bucket/prefix/, got {uri[:60]!r}")
    return uri


VARIANT_KINDS = ("local", "popular", "personalize")


def _experiment(value: str) -> tuple[tuple[str, float], ...]:
    """``local:50,personalize:50``: recommenders and their shares of visitors. A variant is
    ``local``, ``popular`` (the control group: popular items), ``personalize`` (the
    configured campaign or recommender) or ``personalize:<campaign or recommender ARN>``;
    the share is the text after the last colon."""
    variants: list[tuple[str, float]] = []
    for part in _csv(value):
        name, sep, share = part.rpartition(":")
        if not sep or not name:
            raise ValueError(f"expected variant:share, e.g. local:50, got {part!r}")
        name = name.strip()
        kind = name.split(":", 1)[0]
        if kind not in VARIANT_KINDS:
            raise ValueError(f"unknown variant {name[:60]!r}: use local, popular, "
                             "personalize or personalize:<ARN>")
        if kind != name:
            if kind != "personalize":
                raise ValueError(f"only personalize takes an ARN, got {name[:60]!r}")
            _arn(name.split(":", 1)[1])
        try:
            weight = float(share)
        except ValueError:
            raise ValueError(f"the share of {name[:60]!r} is not a number: {share!r}") from None
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"the share of {name[:60]!r} must be greater than 0")
        if any(name == other for other, _ in variants):
            raise ValueError(f"{name[:60]!r} is listed twice")
        variants.append((name, weight))
    if len(variants) < 2:
        raise ValueError("name at least two variants, e.g. local:50,personalize:50")
    return tuple(variants)


# (field name, environment names in order of precedence, parser)
_SOURCES: tuple[tuple[str, tuple[str, ...], Callable[[str], Any]], ...] = (
    ("database_url", ("DATABASE_URL",), _database_url),
    ("segment_shared_secrets", ("SEGMENT_SHARED_SECRET",), _secrets),
    ("webhook_bearer_tokens", ("WEBHOOK_BEARER_TOKEN",), _secrets),
    ("max_body_bytes", ("MAX_BODY_BYTES",), _positive_int),
    ("interaction_events", ("INTERACTION_EVENTS",), _csv),
    ("item_id_properties", ("ITEM_ID_PROPERTIES",), _item_id_properties),
    ("retry_after_seconds", ("RETRY_AFTER_SECONDS",), _positive_int),
    ("log_level", ("LOG_LEVEL",), _log_level),
    ("log_format", ("LOG_FORMAT",), _log_format),
    # --- the inbox: durability and retention ---
    ("sqlite_synchronous", ("SQLITE_SYNCHRONOUS",), _synchronous),
    ("message_retention_hours", ("MESSAGE_RETENTION_HOURS",), _positive_float),
    ("max_message_age_hours", ("MAX_MESSAGE_AGE_HOURS",), _off_or_positive_float),
    ("interaction_retention_days", ("INTERACTION_RETENTION_DAYS",), _off_or_positive_float),
    ("retention_interval_seconds", ("RETENTION_INTERVAL_SECONDS",), _positive_float),
    # Amazon Personalize and Segment.
    ("personalize_tracking_id", ("PERSONALIZE_TRACKING_ID", "personalize_tracking_id"), _text),
    ("personalize_campaign_arn", ("PERSONALIZE_CAMPAIGN_ARN", "personalize_campaign_arn"), _arn),
    ("personalize_users_dataset_arn", ("PERSONALIZE_USERS_DATASET_ARN",), _arn),
    ("personalize_items_dataset_arn", ("PERSONALIZE_ITEMS_DATASET_ARN",), _arn),
    ("event_type_map", ("EVENT_TYPE_MAP",), _pairs),
    ("event_value_property", ("EVENT_VALUE_PROPERTY",), _optional_property),
    ("event_properties", ("EVENT_PROPERTIES",), _pairs),
    ("user_traits_map", ("USER_TRAITS_MAP",), _pairs),
    ("item_properties_map", ("ITEM_PROPERTIES_MAP",), _pairs),
    ("personalize_put_events_per_second", ("PERSONALIZE_PUT_EVENTS_PER_SECOND",),
     _positive_float),
    ("personalize_put_records_per_second", ("PERSONALIZE_PUT_RECORDS_PER_SECOND",),
     _positive_float),
    ("dead_letters_max", ("DEAD_LETTERS_MAX",), _positive_int),
    ("personalize_call_timeout_seconds", ("PERSONALIZE_CALL_TIMEOUT_SECONDS",), _positive_float),
    ("personalize_max_concurrency", ("PERSONALIZE_MAX_CONCURRENCY",), _positive_int),
    ("personalize_sender_nice", ("PERSONALIZE_SENDER_NICE",), _nice),
    ("applier_nice", ("APPLIER_NICE",), _nice_or_off),
    # --- local recommendation engine (embedded default) ---
    ("engine_event_weights", ("ENGINE_EVENT_WEIGHTS",), _weights),
    ("engine_train_after_interactions", ("ENGINE_TRAIN_AFTER_INTERACTIONS",), _positive_int),
    ("engine_train_interval_seconds", ("ENGINE_TRAIN_INTERVAL_SECONDS",), _positive_float),
    ("engine_background_training", ("ENGINE_BACKGROUND_TRAINING",), _boolean),
    ("engine_exclude_seen", ("ENGINE_EXCLUDE_SEEN",), _boolean),
    ("engine_model_refresh_seconds", ("ENGINE_MODEL_REFRESH_SECONDS",), _positive_float),
    # --- end of local recommendation engine ---
    ("aws_region", ("AWS_REGION", "AWS_DEFAULT_REGION", "region_name"), _text),
    ("segment_write_key", ("SEGMENT_WRITE_KEY", "connections_source_write_key"), _text),
    ("segment_profile_api_token", ("SEGMENT_PROFILE_API_TOKEN", "personas_api_key"), _text),
    ("segment_space_id", ("SEGMENT_SPACE_ID", "personas_workspace_id"), _text),
    # --- recommendations, trait checks, activation, browser access ---
    ("personalize_recommender_arn", ("PERSONALIZE_RECOMMENDER_ARN",), _arn),
    ("personalize_filter_arn", ("PERSONALIZE_FILTER_ARN",), _arn),
    ("filter_values_map", ("FILTER_VALUES_MAP",), _pairs),
    ("recommender_timeout_seconds", ("RECOMMENDER_TIMEOUT_SECONDS",), _positive_float),
    ("segment_profile_api_url", ("SEGMENT_PROFILE_API_URL",), _http_url),
    ("profile_api_timeout_seconds", ("PROFILE_API_TIMEOUT_SECONDS",), _positive_float),
    ("profile_cache_seconds", ("PROFILE_CACHE_SECONDS",), _non_negative_float),
    ("exclusion_traits", ("EXCLUSION_TRAITS",), _csv),
    ("opt_out_trait", ("OPT_OUT_TRAIT",), _text),
    ("purchase_events", ("PURCHASE_EVENTS",), _csv),
    ("activation_trait", ("ACTIVATION_TRAIT",), _text),
    ("activation_interval_seconds", ("ACTIVATION_INTERVAL_SECONDS",), _non_negative_float),
    ("segment_api_host", ("SEGMENT_API_HOST",), _http_url),
    ("cors_origins", ("CORS_ORIGINS",), _origins),
    ("secret_key", ("SECRET_KEY",), _secret_key),
    ("token_max_age_seconds", ("TOKEN_MAX_AGE_SECONDS",), _positive_int),
    # --- the Segment-compatible Tracking API, personalized ranking ---
    ("ingest_write_keys", ("INGEST_WRITE_KEYS",), _secrets),
    ("personalize_ranking_campaign_arn", ("PERSONALIZE_RANKING_CAMPAIGN_ARN",), _arn),
    # --- the Profile API budget, bounded activation, deletions in Personalize ---
    ("profile_api_max_rps", ("PROFILE_API_MAX_RPS",), _positive_int),
    ("activation_queue_max", ("ACTIVATION_QUEUE_MAX",), _positive_int),
    ("personalize_dataset_group_arn", ("PERSONALIZE_DATASET_GROUP_ARN",), _arn),
    ("personalize_deletion_role_arn", ("PERSONALIZE_DELETION_ROLE_ARN",), _role_arn),
    ("personalize_deletion_s3_uri", ("PERSONALIZE_DELETION_S3_URI",), _s3_uri),
    ("personalize_deletion_interval_seconds", ("PERSONALIZE_DELETION_INTERVAL_SECONDS",),
     _positive_float),
    # --- impressions, attribution, experiments ---
    ("experiment", ("EXPERIMENT",), _experiment),
    ("insights_retention_days", ("INSIGHTS_RETENTION_DAYS",), _off_or_positive_float),
    ("attribution_window_hours", ("ATTRIBUTION_WINDOW_HOURS",), _positive_float),
    ("attribution_hold_seconds", ("ATTRIBUTION_HOLD_SECONDS",), _non_negative_float),
    ("insights_token", ("INSIGHTS_TOKEN",), _secret_key),
    # --- the local engine at scale ---
    ("engine_history_max", ("ENGINE_HISTORY_MAX",), _positive_int),
    ("engine_train_max_interactions", ("ENGINE_TRAIN_MAX_INTERACTIONS",), _positive_int),
)

# Settings whose values are secrets: never logged, never shown by /healthz.
SECRET_FIELDS = frozenset(
    {"segment_shared_secrets", "webhook_bearer_tokens", "segment_write_key",
     "segment_profile_api_token", "database_url", "secret_key",
     "ingest_write_keys", "insights_token"}
)


@dataclass(frozen=True)
class Settings:
    database_url: str = ""  # empty: SQLite in the Flask instance folder
    segment_shared_secrets: tuple[str, ...] = ()
    webhook_bearer_tokens: tuple[str, ...] = ()
    max_body_bytes: int = 8 * 1024 * 1024
    interaction_events: tuple[str, ...] = DEFAULT_INTERACTION_EVENTS
    item_id_properties: tuple[str, ...] = ("product_id", "sku")
    retry_after_seconds: int = 30
    log_level: str = "INFO"
    # auto: short text lines when stderr is a terminal, JSON lines otherwise (Heroku).
    log_format: str = "auto"
    # --- the inbox: durability and retention ---
    # FULL: a delivery is acknowledged only once its commit is on disk (an fsync), so it
    # survives a power loss or an OS crash; NORMAL skips that fsync (README: the risk).
    sqlite_synchronous: str = "FULL"
    # Inbox rows (the messageId claims with them) are kept this long after they arrived:
    # well beyond Segment's retry window (about 4 hours), so a redelivery is a duplicate.
    message_retention_hours: float = 168.0
    # Live messages older than this are skipped ("too_old"); 0 = off (Segment's Replay
    # re-sends old messages on purpose).
    max_message_age_hours: float = 0.0
    # Interactions older than this (by their own time) are deleted; 0 = kept for ever.
    interaction_retention_days: float = 730.0
    retention_interval_seconds: float = 60.0  # how often each worker prunes what is due
    personalize_tracking_id: str = ""
    personalize_campaign_arn: str = ""
    personalize_users_dataset_arn: str = ""
    personalize_items_dataset_arn: str = ""
    event_type_map: tuple[tuple[str, str], ...] = ()
    event_value_property: str = ""
    event_properties: tuple[tuple[str, str], ...] = ()
    user_traits_map: tuple[tuple[str, str], ...] = ()
    item_properties_map: tuple[tuple[str, str], ...] = ()
    # The Personalize applier: one call at most this long; this many calls at once.
    personalize_call_timeout_seconds: float = 1.0
    personalize_max_concurrency: int = 8
    # The process that makes those calls runs below the workers (calls_child.py): "idle"
    # (Linux's SCHED_IDLE) or a nice value 0-19. When the machine is busy, answering
    # Segment comes first and the calls wait in the inbox.
    personalize_sender_nice: int | str = "idle"
    # The appliers run in a process of their own on each host (appliers/process.py), at
    # this CPU priority: "idle" (SCHED_IDLE) or a nice value 0-19; "off": as threads in
    # every worker instead.
    applier_nice: int | str = 10
    # PutEvents calls a second, all workers and hosts together (AWS allows about 1000 a
    # dataset group); PutUsers and PutItems calls a second each (AWS: about 10).
    personalize_put_events_per_second: float = 500.0
    personalize_put_records_per_second: float = 10.0
    # Records refused for good kept for a retry; beyond it the oldest are dropped.
    dead_letters_max: int = 10000
    # --- local recommendation engine (embedded default) ---
    engine_event_weights: tuple[tuple[str, float], ...] = ()  # () = the engine's defaults
    engine_train_after_interactions: int = 1000
    engine_train_interval_seconds: float = 600.0
    engine_background_training: bool = True
    engine_exclude_seen: bool = True  # leave items a person already had out of their list
    engine_model_refresh_seconds: float = 5.0  # how often a worker looks for a newer model
    # --- end of local recommendation engine ---
    aws_region: str = ""
    segment_write_key: str = ""
    segment_profile_api_token: str = ""
    segment_space_id: str = ""
    # --- recommendations, trait checks, activation, browser access ---
    personalize_recommender_arn: str = ""
    personalize_filter_arn: str = ""
    filter_values_map: tuple[tuple[str, str], ...] = ()  # (filter placeholder, trait)
    recommender_timeout_seconds: float = 1.0
    segment_profile_api_url: str = "https://profiles.segment.com"
    profile_api_timeout_seconds: float = 0.25
    profile_cache_seconds: float = 60.0
    exclusion_traits: tuple[str, ...] = ("purchased_products",)
    opt_out_trait: str = "recommendations_opt_out"
    purchase_events: tuple[str, ...] = ("Order Completed", "Completed Order")
    activation_trait: str = "recommended_products"
    activation_interval_seconds: float = 3600.0
    segment_api_host: str = "https://api.segment.io"
    cors_origins: tuple[str, ...] = ()
    secret_key: str = ""
    token_max_age_seconds: int = 3600
    # --- the Segment-compatible Tracking API, personalized ranking ---
    # Write keys for the Segment-compatible Tracking API (POST /v1/*); none: it is off.
    ingest_write_keys: tuple[str, ...] = ()
    # A personalized-ranking campaign for POST /recommendations/rank; none: local engine.
    personalize_ranking_campaign_arn: str = ""
    # --- the Profile API budget, bounded activation, deletions in Personalize ---
    # Profile API calls per second for the whole fleet (Segment: ~100/s per space, 429
    # above); each host takes its share.
    profile_api_max_rps: int = 100
    activation_queue_max: int = 1000  # write-backs waiting per worker; more are dropped
    # Deletion requests reach Personalize through data deletion jobs (all three needed).
    personalize_dataset_group_arn: str = ""
    personalize_deletion_role_arn: str = ""
    personalize_deletion_s3_uri: str = ""
    personalize_deletion_interval_seconds: float = 3600.0
    # --- impressions, attribution, experiments ---
    # Visitors split between recommenders by a stable hash: ((variant, share), ...);
    # () = no experiment, every visitor gets the configured recommender.
    experiment: tuple[tuple[str, float], ...] = ()
    # Impressions (every answer shown) and attributions are kept this long; 0 = none
    # recorded (no insights).
    insights_retention_days: float = 90.0
    # An add-to-cart or order counts for a recommendation shown to the same person at
    # most this long before it.
    attribution_window_hours: float = 24.0
    # An event that could be attributed but finds no recorded answer waits this long for
    # one (workers record their answers within 0.2 s); then it is taken as not
    # attributable. 0: never waits (one worker: its own answers are written first).
    attribution_hold_seconds: float = 1.0
    insights_token: str = ""  # required by GET /insights when set
    # --- the local engine at scale ---
    # An answer reads at most this many of the visitor's latest interactions (what it
    # scores and what counts as already seen), so its cost does not grow with the history.
    engine_history_max: int = 500
    # Training reads at most this many interactions, the most recent (bounds its memory).
    engine_train_max_interactions: int = 10_000_000
    # Filled from the environment name that supplied each value; for error messages.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def authentication_enforced(self) -> bool:
        return bool(self.segment_shared_secrets or self.webhook_bearer_tokens)

    @property
    def mode(self) -> str:
        return "personalize" if self.personalize_tracking_id else "embedded"

    @property
    def recommender_mode(self) -> str:
        if self.personalize_campaign_arn or self.personalize_recommender_arn:
            return "personalize"
        return "local"

    @property
    def profile_api_enabled(self) -> bool:
        return bool(self.segment_profile_api_token and self.segment_space_id)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, env_names, parse in _SOURCES:
            for env_name in env_names:
                raw = environ.get(env_name)
                if raw is None or raw.strip() == "":
                    continue
                try:
                    values[name] = parse(raw)
                except ValueError as exc:
                    raise ConfigError(f"{env_name}: {exc}") from None
                sources[name] = env_name
                break
        if "interaction_events" in values and not values["interaction_events"]:
            raise ConfigError("INTERACTION_EVENTS: name at least one event")
        if values.get("personalize_campaign_arn") and values.get("personalize_recommender_arn"):
            raise ConfigError("PERSONALIZE_RECOMMENDER_ARN: set either it or "
                              "PERSONALIZE_CAMPAIGN_ARN, not both")
        if bool(values.get("segment_profile_api_token")) != bool(values.get("segment_space_id")):
            raise ConfigError("SEGMENT_SPACE_ID: the Profile API needs both SEGMENT_SPACE_ID "
                              "and SEGMENT_PROFILE_API_TOKEN")
        if any(name == "personalize" for name, _ in values.get("experiment", ())) and not (
                values.get("personalize_campaign_arn")
                or values.get("personalize_recommender_arn")):
            raise ConfigError("EXPERIMENT: the personalize variant needs "
                              "PERSONALIZE_CAMPAIGN_ARN or PERSONALIZE_RECOMMENDER_ARN "
                              "(or name one: personalize:<ARN>)")
        return cls(**values, sources=sources)

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any]) -> "Settings":
        """Settings for tests and embedding: field names, already typed."""
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**overrides)

    def public_summary(self) -> dict[str, Any]:
        """What is configured, without any secret value (for /healthz and start-up)."""
        return {
            "mode": self.mode,
            "database": "postgresql" if self.database_url.startswith("postgresql") else "sqlite",
            "signature_secrets": len(self.segment_shared_secrets),
            "bearer_tokens": len(self.webhook_bearer_tokens),
            "interaction_events": list(self.interaction_events),
            "item_id_properties": list(self.item_id_properties),
            "max_body_bytes": self.max_body_bytes,
            "sqlite_synchronous": self.sqlite_synchronous,
            "message_retention_hours": self.message_retention_hours,
            "max_message_age_hours": self.max_message_age_hours or None,
            "interaction_retention_days": self.interaction_retention_days or None,
            "personalize_tracking_id": bool(self.personalize_tracking_id),
            "personalize_campaign_arn": bool(self.personalize_campaign_arn),
            "personalize_users_dataset": bool(self.personalize_users_dataset_arn),
            "personalize_items_dataset": bool(self.personalize_items_dataset_arn),
            "event_type_map": dict(self.event_type_map),
            "event_value_property": self.event_value_property or None,
            "event_properties": dict(self.event_properties),
            "user_traits_map": dict(self.user_traits_map),
            "item_properties_map": dict(self.item_properties_map),
            "personalize_recommender_arn": bool(self.personalize_recommender_arn),
            "personalize_filter_arn": bool(self.personalize_filter_arn),
            "recommender": self.recommender_mode,
            "exclusion_traits": list(self.exclusion_traits),
            "opt_out_trait": self.opt_out_trait or None,
            "activation": "segment" if self.segment_write_key else "local",
            "activation_trait": self.activation_trait,
            "cors_origins": list(self.cors_origins),
            "tokens_required": bool(self.secret_key),
            "segment_write_key": bool(self.segment_write_key),
            "tracking_api": bool(self.ingest_write_keys),
            "personalize_ranking_campaign_arn": bool(self.personalize_ranking_campaign_arn),
            "segment_profile_api": bool(self.segment_profile_api_token and self.segment_space_id),
            "profile_api_max_rps": self.profile_api_max_rps,
            "activation_queue_max": self.activation_queue_max,
            "personalize_deletions": bool(self.personalize_dataset_group_arn and
                                          self.personalize_deletion_role_arn and
                                          self.personalize_deletion_s3_uri),
            "personalize_deletion_interval_seconds": self.personalize_deletion_interval_seconds,
            "experiment": {name: share for name, share in self.experiment} or None,
            "insights_retention_days": self.insights_retention_days or None,
            "attribution_window_hours": self.attribution_window_hours,
            "insights_token": bool(self.insights_token),
            "engine_history_max": self.engine_history_max,
            "engine_train_max_interactions": self.engine_train_max_interactions,
        }
