"""JSON logs with a request id; secrets and email addresses never reach them.

Every record goes through ``RedactingFilter`` on the handler: it masks email addresses and
the values of every secret setting, whatever code wrote the record. The service's own log
lines carry counts and reasons, never Segment ids or traits (a userId may be an email).
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Iterable

from flask import g, has_request_context
from pythonjsonlogger.json import JsonFormatter

EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_HANDLER_NAME = "segment-personalize-json"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = g.get("request_id") if has_request_context() else None
        return True


class RedactingFilter(logging.Filter):
    """Masks email addresses and known secret values in the message and its fields."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets: list[str] = []
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        for secret in secrets:
            if secret and len(secret) >= 4 and secret not in self.secrets:
                self.secrets.append(secret)
        self.secrets.sort(key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[secret]")
        return EMAIL.sub("[email]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = str(record.msg)
        record.msg, record.args = self.scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        for key, value in list(vars(record).items()):
            if isinstance(value, str) and key not in ("msg", "exc_text", "name", "levelname",
                                                      "pathname", "filename", "module",
                                                      "funcName", "processName", "threadName"):
                setattr(record, key, self.scrub(value))
        return True


def configure_logging(level: str, secrets: Iterable[str]) -> RedactingFilter:
    """Install one JSON handler on the root logger (once per process)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if handler.get_name() == _HANDLER_NAME:
            redactor = next(f for f in handler.filters if isinstance(f, RedactingFilter))
            redactor.add_secrets(secrets)
            root.setLevel(level)
            return redactor
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
    ))
    handler.addFilter(RequestIdFilter())
    redactor = RedactingFilter(secrets)
    handler.addFilter(redactor)
    root.addHandler(handler)
    root.setLevel(level)
    return redactor
