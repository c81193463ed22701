"""Settings: read once from the environment at start-up, validated, typed (pydantic-settings).

Each setting is a field of ``Settings`` with its environment name (and, for a few, the
lower-case name the AWS workshop's Lambda functions used), its type, bounds and default,
declared once. Secrets are ``SecretStr`` (their values never print). A bad value stops the
start with a ``ConfigError`` naming the variable. ``public_summary`` (start-up log,
``/healthz``) is derived from the fields: a secret shows only whether it is set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
VARIANT_KINDS = ("local", "popular", "personalize")


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


# -- how text becomes values (each a BeforeValidator: typed values pass through) ----------


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def camel_case(name: str) -> str:
    """``image_url`` → ``imageUrl``, ``Product Category`` → ``productCategory``."""
    words = [w for w in re.split(r"[^0-9A-Za-z]+", name) if w]
    if not words:
        return name
    return words[0][:1].lower() + words[0][1:] + "".join(w[:1].upper() + w[1:] for w in words[1:])


def _pairs(value: Any) -> Any:
    """``a=b,c=d`` (or a JSON object) as ordered pairs; ``a`` alone means ``a=camelCase(a)``."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a JSON object: {exc}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in data.items()
        ):
            raise ValueError("expected a JSON object of non-empty strings")
        return tuple(data.items())
    pairs = []
    for part in _csv(text):
        source, sep, target = (p.strip() for p in part.partition("="))
        if not source or (sep and not target):
            raise ValueError(f"expected name=value pairs, got {part!r}")
        pairs.append((source, target or camel_case(source)))
    return tuple(pairs)


def _weights(value: Any) -> Any:
    """``Product Viewed=1,Order Completed=5``: a weight for each event name."""
    if not isinstance(value, str):
        return value
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


def _database_url(value: Any) -> Any:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    url = str(value).strip()
    if not url:
        return ""
    # Heroku still hands out postgres:// URLs, which SQLAlchemy no longer accepts.
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
    if not (url.startswith("postgresql+") or url.startswith("sqlite:")):
        raise ValueError("expected a postgres://, postgresql:// or sqlite:/// URL")
    return url


def _pattern(regex: str, what: str):
    def check(value: Any) -> Any:
        text = str(value).strip()
        if text and not re.match(regex, text):
            raise ValueError(f"expected {what}, got {text[:60]!r}")
        return text

    return check


def _http_url(value: Any) -> Any:
    return _pattern(r"^https?://[^/\s]+", "an http(s):// URL")(str(value).rstrip("/"))


def _origins(value: Any) -> Any:
    origins = _csv(value)
    for origin in origins:
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
            raise ValueError(
                f"expected origins like https://shop.example (no path), got {origin!r}"
            )
    return origins


def _long_secret(value: Any) -> Any:
    text = (value.get_secret_value() if isinstance(value, SecretStr) else str(value)).strip()
    if text and len(text) < 16:
        raise ValueError("must be at least 16 characters (use a long random value)")
    return text


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _experiment(value: Any) -> Any:
    """``local:50,personalize:50``: recommenders and their shares of visitors. A variant is
    ``local``, ``popular`` (the control group: popular items), ``personalize`` (the
    configured campaign or recommender) or ``personalize:<campaign or recommender ARN>``;
    the share is the text after the last colon."""
    if not isinstance(value, str):
        return value
    variants: list[tuple[str, float]] = []
    for part in _csv(value):
        name, sep, share = part.rpartition(":")
        if not sep or not name:
            raise ValueError(f"expected variant:share, e.g. local:50, got {part!r}")
        name = name.strip()
        kind = name.split(":", 1)[0]
        if kind not in VARIANT_KINDS:
            raise ValueError(
                f"unknown variant {name[:60]!r}: use local, popular, "
                "personalize or personalize:<ARN>"
            )
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


_arn = _pattern(
    r"^arn:[a-z\d-]+:personalize:[^:]*:[^:]*:.+$",
    "an Amazon Personalize ARN (arn:aws:personalize:...)",
)

# The types the fields are made of.
Csv = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_csv)]
Pairs = Annotated[tuple[tuple[str, str], ...], NoDecode, BeforeValidator(_pairs)]
Weights = Annotated[tuple[tuple[str, float], ...], NoDecode, BeforeValidator(_weights)]
Arn = Annotated[str, BeforeValidator(_arn)]
RoleArn = Annotated[
    str,
    BeforeValidator(
        _pattern(
            r"^arn:[a-z\d-]+:iam::\d{12}:role/?[A-Za-z_0-9+=,.@\-/]+$",
            "an IAM role ARN (arn:aws:iam::123456789012:role/NAME)",
        )
    ),
]
S3Uri = Annotated[
    str,
    BeforeValidator(
        _pattern(
            r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", "s3://bucket or s3://bucket/prefix/"
        )
    ),
]
HttpUrl = Annotated[str, BeforeValidator(_http_url)]
Secret = Annotated[SecretStr, BeforeValidator(lambda v: v.strip() if isinstance(v, str) else v)]
LongSecret = Annotated[SecretStr, BeforeValidator(_long_secret)]
Secrets = Annotated[tuple[SecretStr, ...], NoDecode, BeforeValidator(_csv)]
Text = Annotated[str, BeforeValidator(lambda v: v.strip() if isinstance(v, str) else v)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
OffOrPositive = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # 0: off


def reveal(value: SecretStr | tuple[SecretStr, ...]) -> Any:
    """A secret's value (or a tuple of secrets' values), where it is used."""
    if isinstance(value, tuple):
        return tuple(one.get_secret_value() for one in value)
    return value.get_secret_value()


def env(*names: str) -> Any:
    """The environment name(s) a field is read from, in order of precedence."""
    return AliasChoices(*names)


def _choices(alias: object) -> list:
    """A field's environment names: every field is declared with ``env(...)``."""
    assert isinstance(alias, AliasChoices)
    return list(alias.choices)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True,
        env_ignore_empty=True,
        extra="ignore",
        populate_by_name=True,
        case_sensitive=True,
        hide_input_in_errors=True,
    )

    # --- the webhook, storage and logs ---
    # Empty: SQLite in the Flask instance folder (instance/segment.db).
    database_url: Annotated[SecretStr, BeforeValidator(_database_url)] = Field(
        SecretStr(""), validation_alias=env("DATABASE_URL")
    )
    segment_shared_secrets: Secrets = Field((), validation_alias=env("SEGMENT_SHARED_SECRET"))
    webhook_bearer_tokens: Secrets = Field((), validation_alias=env("WEBHOOK_BEARER_TOKEN"))
    max_body_bytes: PositiveInt = Field(8 * 1024 * 1024, validation_alias=env("MAX_BODY_BYTES"))
    interaction_events: Annotated[Csv, Field(min_length=1)] = Field(
        DEFAULT_INTERACTION_EVENTS, validation_alias=env("INTERACTION_EVENTS")
    )
    item_id_properties: Annotated[Csv, Field(min_length=1)] = Field(
        ("product_id", "sku"), validation_alias=env("ITEM_ID_PROPERTIES")
    )
    retry_after_seconds: PositiveInt = Field(30, validation_alias=env("RETRY_AFTER_SECONDS"))
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)
    ] = Field("INFO", validation_alias=env("LOG_LEVEL"))
    # auto: short text lines when stderr is a terminal, JSON lines otherwise (Heroku).
    log_format: Annotated[Literal["auto", "text", "json"], BeforeValidator(_lower)] = Field(
        "auto", validation_alias=env("LOG_FORMAT")
    )
    # --- the inbox: durability and retention ---
    # FULL: a delivery is acknowledged only once its commit is on disk (an fsync); NORMAL
    # skips that fsync (README: the risk).
    sqlite_synchronous: Annotated[Literal["FULL", "NORMAL"], BeforeValidator(_upper)] = Field(
        "FULL", validation_alias=env("SQLITE_SYNCHRONOUS")
    )
    # Inbox rows (and their messageId claims) are kept this long after they arrived.
    message_retention_hours: PositiveFloat = Field(
        168.0, validation_alias=env("MESSAGE_RETENTION_HOURS")
    )
    # Live messages older than this are skipped ("too_old"); unset: MESSAGE_RETENTION_HOURS
    # (a replay is a duplicate or too old); 0: off.
    max_message_age_hours: OffOrPositive | None = Field(
        None, validation_alias=env("MAX_MESSAGE_AGE_HOURS")
    )
    # Interactions older than this are skipped on arrival and deleted; 0: kept for ever.
    interaction_retention_days: OffOrPositive = Field(
        730.0, validation_alias=env("INTERACTION_RETENTION_DAYS")
    )
    retention_interval_seconds: PositiveFloat = Field(
        60.0, validation_alias=env("RETENTION_INTERVAL_SECONDS")
    )
    # --- the worker process ---
    # The worker's CPU priority (nice 0-19): on a host it shares with the web process,
    # answering Segment comes first and what is not applied yet waits in the inbox.
    worker_nice: Annotated[int, Field(ge=0, le=19)] = Field(10, validation_alias=env("WORKER_NICE"))
    # Run the worker's loops as threads of each web process too (one-process hosts, tests):
    # the same code, under the same leases.
    worker_in_web: bool = Field(False, validation_alias=env("WORKER_IN_WEB"))
    # --- Amazon Personalize ---
    personalize_tracking_id: Text = Field(
        "", validation_alias=env("PERSONALIZE_TRACKING_ID", "personalize_tracking_id")
    )
    personalize_campaign_arn: Arn = Field(
        "", validation_alias=env("PERSONALIZE_CAMPAIGN_ARN", "personalize_campaign_arn")
    )
    personalize_recommender_arn: Arn = Field(
        "", validation_alias=env("PERSONALIZE_RECOMMENDER_ARN")
    )
    personalize_users_dataset_arn: Arn = Field(
        "", validation_alias=env("PERSONALIZE_USERS_DATASET_ARN")
    )
    personalize_items_dataset_arn: Arn = Field(
        "", validation_alias=env("PERSONALIZE_ITEMS_DATASET_ARN")
    )
    event_type_map: Pairs = Field((), validation_alias=env("EVENT_TYPE_MAP"))
    event_value_property: Text = Field("", validation_alias=env("EVENT_VALUE_PROPERTY"))
    event_properties: Pairs = Field((), validation_alias=env("EVENT_PROPERTIES"))
    user_traits_map: Pairs = Field((), validation_alias=env("USER_TRAITS_MAP"))
    item_properties_map: Pairs = Field((), validation_alias=env("ITEM_PROPERTIES_MAP"))
    # PutEvents calls a second, all workers and hosts together (AWS: about 1000 a dataset
    # group); PutUsers and PutItems calls a second each (AWS: about 10).
    personalize_put_events_per_second: PositiveFloat = Field(
        500.0, validation_alias=env("PERSONALIZE_PUT_EVENTS_PER_SECOND")
    )
    personalize_put_records_per_second: PositiveFloat = Field(
        10.0, validation_alias=env("PERSONALIZE_PUT_RECORDS_PER_SECOND")
    )
    dead_letters_max: PositiveInt = Field(10000, validation_alias=env("DEAD_LETTERS_MAX"))
    personalize_call_timeout_seconds: PositiveFloat = Field(
        1.0, validation_alias=env("PERSONALIZE_CALL_TIMEOUT_SECONDS")
    )
    personalize_max_concurrency: PositiveInt = Field(
        8, validation_alias=env("PERSONALIZE_MAX_CONCURRENCY")
    )
    aws_region: Text = Field(
        "", validation_alias=env("AWS_REGION", "AWS_DEFAULT_REGION", "region_name")
    )
    personalize_filter_arn: Arn = Field("", validation_alias=env("PERSONALIZE_FILTER_ARN"))
    filter_values_map: Pairs = Field((), validation_alias=env("FILTER_VALUES_MAP"))
    recommender_timeout_seconds: PositiveFloat = Field(
        1.0, validation_alias=env("RECOMMENDER_TIMEOUT_SECONDS")
    )
    personalize_ranking_campaign_arn: Arn = Field(
        "", validation_alias=env("PERSONALIZE_RANKING_CAMPAIGN_ARN")
    )
    # Deletion requests reach Personalize through data deletion jobs (all three needed).
    personalize_dataset_group_arn: Arn = Field(
        "", validation_alias=env("PERSONALIZE_DATASET_GROUP_ARN")
    )
    personalize_deletion_role_arn: RoleArn = Field(
        "", validation_alias=env("PERSONALIZE_DELETION_ROLE_ARN")
    )
    personalize_deletion_s3_uri: S3Uri = Field(
        "", validation_alias=env("PERSONALIZE_DELETION_S3_URI")
    )
    personalize_deletion_interval_seconds: PositiveFloat = Field(
        3600.0, validation_alias=env("PERSONALIZE_DELETION_INTERVAL_SECONDS")
    )
    # --- the local recommendation engine (embedded default) ---
    engine_event_weights: Weights = Field((), validation_alias=env("ENGINE_EVENT_WEIGHTS"))
    engine_train_after_interactions: PositiveInt = Field(
        1000, validation_alias=env("ENGINE_TRAIN_AFTER_INTERACTIONS")
    )
    engine_train_interval_seconds: PositiveFloat = Field(
        600.0, validation_alias=env("ENGINE_TRAIN_INTERVAL_SECONDS")
    )
    engine_background_training: bool = Field(
        True, validation_alias=env("ENGINE_BACKGROUND_TRAINING")
    )
    engine_exclude_seen: bool = Field(True, validation_alias=env("ENGINE_EXCLUDE_SEEN"))
    engine_model_refresh_seconds: PositiveFloat = Field(
        5.0, validation_alias=env("ENGINE_MODEL_REFRESH_SECONDS")
    )
    # An answer reads at most this many of the visitor's latest interactions (what it
    # scores, what counts as already seen): its cost does not grow with the history.
    engine_history_max: PositiveInt = Field(500, validation_alias=env("ENGINE_HISTORY_MAX"))
    # Training reads at most this many interactions, the most recent (bounds its memory).
    engine_train_max_interactions: PositiveInt = Field(
        10_000_000, validation_alias=env("ENGINE_TRAIN_MAX_INTERACTIONS")
    )
    # --- Segment: the Profile API, write-back ---
    segment_write_key: Secret = Field(
        SecretStr(""), validation_alias=env("SEGMENT_WRITE_KEY", "connections_source_write_key")
    )
    segment_profile_api_token: Secret = Field(
        SecretStr(""), validation_alias=env("SEGMENT_PROFILE_API_TOKEN", "personas_api_key")
    )
    segment_space_id: Text = Field(
        "", validation_alias=env("SEGMENT_SPACE_ID", "personas_workspace_id")
    )
    segment_profile_api_url: HttpUrl = Field(
        "https://profiles.segment.com", validation_alias=env("SEGMENT_PROFILE_API_URL")
    )
    profile_api_timeout_seconds: PositiveFloat = Field(
        0.25, validation_alias=env("PROFILE_API_TIMEOUT_SECONDS")
    )
    profile_cache_seconds: OffOrPositive = Field(
        60.0, validation_alias=env("PROFILE_CACHE_SECONDS")
    )
    # Profile API calls per second for the whole fleet (Segment: ~100/s per space).
    profile_api_max_rps: PositiveInt = Field(100, validation_alias=env("PROFILE_API_MAX_RPS"))
    segment_api_host: HttpUrl = Field(
        "https://api.segment.io", validation_alias=env("SEGMENT_API_HOST")
    )
    # --- recommendations: trait checks, consent, activation ---
    exclusion_traits: Csv = Field(("purchased_products",), validation_alias=env("EXCLUSION_TRAITS"))
    opt_out_trait: Text = Field("recommendations_opt_out", validation_alias=env("OPT_OUT_TRAIT"))
    # More values of the opt-out trait that count as opted out (consent.py).
    opt_out_values: Csv = Field((), validation_alias=env("OPT_OUT_VALUES"))
    # Segment Consent Management categories a message must not deny to be used.
    consent_categories: Csv = Field((), validation_alias=env("CONSENT_CATEGORIES"))
    purchase_events: Csv = Field(
        ("Order Completed", "Completed Order"), validation_alias=env("PURCHASE_EVENTS")
    )
    activation_trait: Text = Field("recommended_products", validation_alias=env("ACTIVATION_TRAIT"))
    activation_interval_seconds: OffOrPositive = Field(
        3600.0, validation_alias=env("ACTIVATION_INTERVAL_SECONDS")
    )
    activation_queue_max: PositiveInt = Field(1000, validation_alias=env("ACTIVATION_QUEUE_MAX"))
    # --- browsers, the Tracking API, the operator ---
    cors_origins: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_origins)] = Field(
        (), validation_alias=env("CORS_ORIGINS")
    )
    secret_key: LongSecret = Field(SecretStr(""), validation_alias=env("SECRET_KEY"))
    token_max_age_seconds: PositiveInt = Field(3600, validation_alias=env("TOKEN_MAX_AGE_SECONDS"))
    # Write keys for the Segment-compatible Tracking API (POST /v1/*); none: it is off.
    ingest_write_keys: Secrets = Field((), validation_alias=env("INGEST_WRITE_KEYS"))
    insights_token: LongSecret = Field(SecretStr(""), validation_alias=env("INSIGHTS_TOKEN"))
    # Required (as a bearer token) by GET /metrics and by /healthz's details.
    metrics_token: LongSecret = Field(SecretStr(""), validation_alias=env("METRICS_TOKEN"))
    # --- impressions, attribution, experiments ---
    # ((variant, share), ...); (): no experiment, every visitor the configured recommender.
    experiment: Annotated[tuple[tuple[str, float], ...], NoDecode, BeforeValidator(_experiment)] = (
        Field((), validation_alias=env("EXPERIMENT"))
    )
    # Impressions (every answer shown) and attributions are kept this long; 0: none.
    insights_retention_days: OffOrPositive = Field(
        90.0, validation_alias=env("INSIGHTS_RETENTION_DAYS")
    )
    attribution_window_hours: PositiveFloat = Field(
        24.0, validation_alias=env("ATTRIBUTION_WINDOW_HOURS")
    )
    # An attributable event that finds no recorded answer waits this long for one.
    attribution_hold_seconds: OffOrPositive = Field(
        1.0, validation_alias=env("ATTRIBUTION_HOLD_SECONDS")
    )
    # The always-valid results' tuning parameter: the visitors (all variants together) at
    # which the experiment is expected to be decided.
    experiment_expected_visitors: PositiveInt = Field(
        5000, validation_alias=env("EXPERIMENT_EXPECTED_VISITORS")
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.personalize_campaign_arn and self.personalize_recommender_arn:
            raise ValueError(
                "PERSONALIZE_RECOMMENDER_ARN: set either it or PERSONALIZE_CAMPAIGN_ARN, not both"
            )
        if bool(self.segment_profile_api_token.get_secret_value()) != bool(self.segment_space_id):
            raise ValueError(
                "SEGMENT_SPACE_ID: the Profile API needs both SEGMENT_SPACE_ID "
                "and SEGMENT_PROFILE_API_TOKEN"
            )
        if any(name == "personalize" for name, _ in self.experiment) and not (
            self.personalize_campaign_arn or self.personalize_recommender_arn
        ):
            raise ValueError(
                "EXPERIMENT: the personalize variant needs "
                "PERSONALIZE_CAMPAIGN_ARN or PERSONALIZE_RECOMMENDER_ARN "
                "(or name one: personalize:<ARN>)"
            )
        return self

    # -- reading ---------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """From the environment (or ``environ``); ConfigError names a bad variable."""
        try:
            if environ is None:
                return cls()
            return cls.model_validate(
                {k: v for k, v in environ.items() if isinstance(v, str) and v.strip()}
            )
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any]) -> Settings:
        """Settings for tests and embedding: field names, already typed (the environment
        is not read)."""
        unknown = set(overrides) - set(cls.model_fields)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        try:
            return _Detached.model_validate(dict(overrides))
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    # -- derived -------------------------------------------------------------------------

    @classmethod
    def env_names(cls) -> dict[str, tuple[str, ...]]:
        """Each field's environment names, canonical first."""
        return {
            name: tuple(str(choice) for choice in _choices(field.validation_alias))
            for name, field in cls.model_fields.items()
        }

    @property
    def max_message_age_seconds(self) -> float:
        """MAX_MESSAGE_AGE_HOURS in seconds (0: off), MESSAGE_RETENTION_HOURS's if unset."""
        hours = (
            self.message_retention_hours
            if self.max_message_age_hours is None
            else self.max_message_age_hours
        )
        return hours * 3600.0

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
        return bool(self.segment_profile_api_token.get_secret_value() and self.segment_space_id)

    @property
    def database(self) -> str:
        """The database URL (a secret: its password)."""
        return self.database_url.get_secret_value()

    def secret_values(self) -> list[str]:
        """Every secret's value (for the log filter that masks them)."""
        values: list[str] = []
        for name in type(self).model_fields:
            if name == "database_url":
                continue  # its password, below: the rest of it is no secret
            value = getattr(self, name)
            for one in value if isinstance(value, tuple) else (value,):
                if isinstance(one, SecretStr) and one.get_secret_value():
                    values.append(one.get_secret_value())
        match = re.match(r"^[^:]+://[^:/@]*:([^@]+)@", self.database)
        if match:  # of the database URL, the password is the secret part
            values.append(match.group(1))
        return values

    def public_summary(self) -> dict[str, Any]:
        """What is configured, without any secret value (start-up log, /healthz): each
        setting by field name (a secret: whether it is set; a list of secrets: how many),
        and what they make (mode, database, recommender)."""
        summary: dict[str, Any] = {
            "mode": self.mode,
            "database": "postgresql" if self.database.startswith("postgresql") else "sqlite",
            "recommender": self.recommender_mode,
            "tokens_required": bool(self.secret_key.get_secret_value()),
        }
        for name in type(self).model_fields:
            if name == "database_url":
                continue
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                summary[name] = bool(value.get_secret_value())
            elif isinstance(value, tuple) and value and isinstance(value[0], SecretStr):
                summary[name] = len(value)
            elif isinstance(value, tuple):
                summary[name] = [list(v) if isinstance(v, tuple) else v for v in value]
            else:
                summary[name] = value
        return summary


class _Detached(Settings):
    """``Settings`` from a mapping alone: no environment, no .env file."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, *args, **kwargs):
        return (init_settings,)


def _describe(exc: ValidationError) -> str:
    """The first error, naming its environment variable."""
    error = exc.errors()[0]
    names = Settings.env_names()
    where = error["loc"][0] if error["loc"] else ""
    variable = names.get(str(where), (str(where),))[0] if where else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not variable:  # a check across settings names its variable itself
        return message
    return f"{variable}: {message}"
