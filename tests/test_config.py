"""Settings come from the environment once; a bad value names its variable."""

import subprocess
import sys

import pytest

from webhook.settings import DEFAULT_INTERACTION_EVENTS, ConfigError, Settings, reveal


def test_defaults_run_the_embedded_default_unsigned():
    settings = Settings.from_env({})
    assert settings.mode == "embedded"
    assert settings.authentication_enforced is False
    assert settings.max_body_bytes == 8 * 1024 * 1024
    assert settings.interaction_events == DEFAULT_INTERACTION_EVENTS
    assert settings.item_id_properties == ("product_id", "sku")


def test_lists_and_rotation_secrets_are_comma_separated():
    settings = Settings.from_env(
        {
            "SEGMENT_SHARED_SECRET": "old-secret, new-secret",
            "INTERACTION_EVENTS": "Product Viewed,Order Completed",
            "ITEM_ID_PROPERTIES": "sku,product_id",
        }
    )
    assert reveal(settings.segment_shared_secrets) == ("old-secret", "new-secret")
    assert settings.interaction_events == ("Product Viewed", "Order Completed")
    assert settings.item_id_properties == ("sku", "product_id")
    assert settings.authentication_enforced


@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgres://u:p@db.example:5432/shop", "postgresql+psycopg://u:p@db.example:5432/shop"),
        ("postgresql://u@db/shop", "postgresql+psycopg://u@db/shop"),
        ("sqlite:///data/segment.db", "sqlite:///data/segment.db"),
    ],
)
def test_heroku_and_plain_database_urls(url, expected):
    assert Settings.from_env({"DATABASE_URL": url}).database == expected


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"MAX_BODY_BYTES": "lots"}, "MAX_BODY_BYTES"),
        ({"MAX_BODY_BYTES": "-1"}, "MAX_BODY_BYTES"),
        ({"RETRY_AFTER_SECONDS": "0"}, "RETRY_AFTER_SECONDS"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"INTERACTION_EVENTS": " , "}, "INTERACTION_EVENTS"),
        ({"ITEM_ID_PROPERTIES": ","}, "ITEM_ID_PROPERTIES"),
        ({"WORKER_NICE": "20"}, "WORKER_NICE"),
        ({"WORKER_NICE": "-5"}, "WORKER_NICE"),
        ({"WORKER_NICE": "low"}, "WORKER_NICE"),
        ({"WORKER_IN_WEB": "maybe"}, "WORKER_IN_WEB"),
        ({"SECRET_KEY": "short"}, "SECRET_KEY"),
        ({"PERSONALIZE_CAMPAIGN_ARN": "arn:aws:s3:::bucket"}, "PERSONALIZE_CAMPAIGN_ARN"),
        ({"SEGMENT_SPACE_ID": "spa_1"}, "SEGMENT_SPACE_ID"),
        ({"EXPERIMENT": "local:50"}, "EXPERIMENT"),
    ],
)
def test_bad_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


@pytest.mark.parametrize("value, expected", [(None, 10), ("0", 0), (" 19 ", 19)])
def test_the_worker_runs_below_the_web_process_unless_told_otherwise(value, expected):
    env = {} if value is None else {"WORKER_NICE": value}
    assert Settings.from_env(env).worker_nice == expected


def test_secrets_never_print():
    settings = Settings.from_env(
        {"SECRET_KEY": "a-long-secret-key-value", "SEGMENT_SHARED_SECRET": "shared-one,shared-two"}
    )
    text = repr(settings) + str(settings) + str(settings.model_dump())
    for secret in ("a-long-secret-key-value", "shared-one", "shared-two"):
        assert secret not in text
    assert reveal(settings.secret_key) == "a-long-secret-key-value"


def test_workshop_lower_case_names_are_aliases():
    settings = Settings.from_env(
        {
            "personalize_tracking_id": "tracking-1",
            "personalize_campaign_arn": "arn:aws:personalize:us-east-1:1:campaign/c",
            "region_name": "eu-west-1",
            "connections_source_write_key": "wk",
            "personas_api_key": "token",
            "personas_workspace_id": "space",
        }
    )
    assert settings.personalize_tracking_id == "tracking-1"
    assert settings.personalize_campaign_arn.endswith("campaign/c")
    assert settings.aws_region == "eu-west-1"
    assert reveal(settings.segment_write_key) == "wk"
    assert reveal(settings.segment_profile_api_token) == "token"
    assert settings.segment_space_id == "space"
    assert settings.mode == "personalize"


def test_canonical_name_wins_over_alias():
    settings = Settings.from_env(
        {"PERSONALIZE_TRACKING_ID": "canonical", "personalize_tracking_id": "alias"}
    )
    assert settings.personalize_tracking_id == "canonical"


def test_public_summary_holds_no_secret_values():
    settings = Settings.from_env(
        {
            "SEGMENT_SHARED_SECRET": "s3cr3t-value",
            "WEBHOOK_BEARER_TOKEN": "b3arer-value",
            "SEGMENT_WRITE_KEY": "wr1te-key",
            "DATABASE_URL": "postgres://u:pa55word@h/db",
        }
    )
    text = repr(settings.public_summary())
    for secret in ("s3cr3t-value", "b3arer-value", "wr1te-key", "pa55word"):
        assert secret not in text


def test_a_bad_value_stops_the_wsgi_start_with_a_message_naming_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"],
        env={"MAX_BODY_BYTES": "lots", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "MAX_BODY_BYTES" in result.stderr
    assert "Traceback" not in result.stderr
