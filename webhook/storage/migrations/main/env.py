"""Alembic's environment: the one in ``storage/migrate.py`` (both histories share it)."""

from webhook.storage.migrate import run_environment

run_environment()
