"""Log lines for machines (JSON, with a request id) and for people (short text lines);
secrets and email addresses never reach either.

``LOG_FORMAT``: ``json``, ``text``, or ``auto`` (the default): text when stderr is a
terminal, JSON otherwise (a platform's log collector, as on Heroku). Every record goes
through ``RedactingFilter`` on the one handler, before either formatter: it masks email
addresses and the values of every secret setting, whatever code wrote the record. The
service's own log lines carry counts and reasons, never Segment ids or traits (a userId may
be an email).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable

from flask import has_request_context, request

EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_HANDLER_NAME = "segment-personalize"


REQUEST_ID = "webhook.request_id"  # the WSGI environ key (views/edge.RequestLog sets it)


def request_id() -> str | None:
    """The id of the request being answered (None outside a request)."""
    return request.environ.get(REQUEST_ID) if has_request_context() else None


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id()
        return True


# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
}


_PLAIN = frozenset({int, float, bool})


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
        return EMAIL.sub("[email]", text) if "@" in text else text

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
        request_id = getattr(record, "request_id", None)
        if isinstance(request_id, str):  # the caller chooses it: it could be anything
            record.request_id = self.scrub(request_id)
        fields = vars(record)
        for key in fields.keys() - _STANDARD:  # the ``extra`` fields
            value = fields[key]
            scrubbed = self._scrub_value(value)
            if scrubbed is not value:
                fields[key] = scrubbed
        return True

    def _scrub_value(self, value):
        if value is None or type(value) in _PLAIN:  # numbers cannot hold a secret
            return value
        if isinstance(value, str):
            scrubbed = self.scrub(value)
            return value if scrubbed == value else scrubbed
        if isinstance(value, (dict, list, tuple)):
            text = repr(value)
            if self.scrub(text) != text:
                return self.scrub(text)  # a structure holding a secret: logged as masked text
        return value


class JsonLineFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id, then the
    record's ``extra`` fields: the service's one log format, a few lines."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        fields = vars(record)
        for key in fields:
            if key not in _STANDARD:
                entry[key] = fields[key]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextLineFormatter(logging.Formatter):
    """One short line a record, for a person at a terminal: local time, level, message,
    then the record's ``extra`` fields as ``name=value``. A structured field too long for
    a line (the start-up configuration) is left to the JSON format, as is the request id.
    Control characters are escaped, so a request path cannot forge a line."""

    LONGEST_FIELD = 100

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            time.strftime("%H:%M:%S", time.localtime(record.created)),
            f"{record.levelname:<7}",
        ]
        if record.name != "webhook" and not record.name.startswith("webhook."):
            parts.append(f"[{record.name}]")
        parts.append(_printable(record.getMessage()))
        fields = vars(record)
        for key in fields:
            if key in _STANDARD:
                continue
            value = _text_value(fields[key])
            if value is not None and len(value) <= self.LONGEST_FIELD:
                parts.append(f"{key}={value}")
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "".join("\n    " + _printable(part) for part in record.exc_text.splitlines())
        return line


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def _text_value(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bool, int, float)):
        return str(value)
    if (
        isinstance(value, str)
        and value.isprintable()
        and value
        and not any(ch in value for ch in ' ="\\')
    ):
        return value
    # Quoted (strings with spaces) or compact (lists, objects) JSON.
    return _printable(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))


def uses_json(log_format: str, stream=None) -> bool:
    """Whether ``log_format`` (auto, text, json) means JSON lines on ``stream``."""
    if log_format == "json":
        return True
    if log_format == "text":
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return True


class PoolResetFilter(logging.Filter):
    """SQLAlchemy's pool logs a traceback at ERROR when it cannot roll back a connection
    given back to it, and then discards that connection. When PostgreSQL has gone away
    (an outage, a restart, a failover) that is expected and handled: the service already
    answers 503 and retries, and one traceback per pooled connection would page someone.
    Such a record becomes one WARNING line; any other failure to reset keeps its ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno >= logging.ERROR
            and record.name.startswith("sqlalchemy.pool")
            and record.exc_info
            and _database_gone(record.exc_info[1])
        ):
            reason = str(record.exc_info[1]).strip().splitlines()[0][:200]
            record.msg = "a pooled database connection could not be reset and was dropped: %s"
            record.args = (reason,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def _database_gone(exc: BaseException | None) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - a dependency
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def configure_logging(
    level: str, secrets: Iterable[str], log_format: str = "auto"
) -> RedactingFilter:
    """Install one handler on the root logger (once per process; a later call updates its
    level, secrets and format)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if handler.get_name() == _HANDLER_NAME:
            redactor = next(f for f in handler.filters if isinstance(f, RedactingFilter))
            redactor.add_secrets(secrets)
            handler.setFormatter(_formatter(log_format, handler))
            root.setLevel(level)
            _quiet_wire_loggers(level)
            return redactor
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_formatter(log_format, handler))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(PoolResetFilter())
    redactor = RedactingFilter(secrets)
    handler.addFilter(redactor)
    root.addHandler(handler)
    root.setLevel(level)
    _quiet_wire_loggers(level)
    return redactor


def _formatter(log_format: str, handler: logging.Handler) -> logging.Formatter:
    stream = getattr(handler, "stream", None)
    return JsonLineFormatter() if uses_json(log_format, stream) else TextLineFormatter()


# Client libraries that log whole requests at DEBUG (headers with credentials, bodies with
# personal data): never below INFO, whatever LOG_LEVEL says.
_WIRE_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "segment")


def _quiet_wire_loggers(level: str) -> None:
    floor = max(logging.getLevelName(level), logging.INFO)
    for name in _WIRE_LOGGERS:
        logging.getLogger(name).setLevel(floor)
    # Alembic tells of every plugin it loads at INFO; what a migration does is logged by
    # the revisions' own lines when they matter.
    logging.getLogger("alembic").setLevel(max(logging.getLevelName(level), logging.WARNING))
