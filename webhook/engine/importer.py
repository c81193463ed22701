"""Importers: history files replayed through the webhook's own ingestion code.

* an Amazon Personalize interactions CSV (``USER_ID,ITEM_ID,EVENT_TYPE,TIMESTAMP``, epoch
  seconds; other columns become event properties) — each row a Segment ``track`` message;
* Segment JSON: one message, an array of messages, ``{"batch": [...]}``, or JSON lines of any
  of these; optionally gzip-compressed.

Everything goes through ``Ingestor.ingest`` in chunks, exactly as a webhook delivery would:
same validation, de-duplication by messageId, the same inbox and appliers (only the
MAX_MESSAGE_AGE_HOURS check of live deliveries is left out: history is old by nature).
CSV rows get a messageId derived from their content, so importing a file twice stores
its interactions once.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Protocol

from ..ingest import Ingestor, NoMessages

CHUNK = 1000  # messages per ingest call (a webhook delivery holds at most 4000)


@dataclass
class ImportReport:
    files: int = 0
    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    skipped: int = 0
    interactions: int = 0
    examples: list[str] = field(default_factory=list)  # a few reasons, for the operator
    skipped_by_reason: Counter = field(default_factory=Counter)

    def add(self, summary) -> None:
        self.received += summary.received
        self.accepted += summary.accepted
        self.duplicates += summary.duplicates
        self.rejected += len(summary.rejected)
        self.skipped += len(summary.skipped)
        self.skipped_by_reason.update(entry.get("reason", "") for entry in summary.skipped)
        self.interactions += summary.interactions
        for entry in (summary.rejected + summary.skipped)[:3]:
            if len(self.examples) < 5:
                self.examples.append(entry.get("reason", ""))


def _open_text(path: str) -> IO[str]:
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig", newline="")


def _looks_like_csv(first_line: str) -> bool:
    head = first_line.strip().upper()
    return not head.startswith(("{", "[")) and "USER_ID" in head and "ITEM_ID" in head


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat().replace("+00:00", "Z")


def csv_messages(lines: Iterable[str], item_property: str) -> Iterator[dict[str, Any]]:
    """Personalize interactions CSV rows as Segment track messages."""
    reader = csv.reader(lines)
    header = [name.strip().upper() for name in next(reader)]
    try:
        user_col, item_col = header.index("USER_ID"), header.index("ITEM_ID")
        time_col = header.index("TIMESTAMP")
    except ValueError:
        raise ValueError(
            "a Personalize interactions CSV needs USER_ID, ITEM_ID and TIMESTAMP columns"
        ) from None
    event_col = header.index("EVENT_TYPE") if "EVENT_TYPE" in header else None
    extra = [
        (i, name)
        for i, name in enumerate(header)
        if i not in (user_col, item_col, time_col, event_col)
    ]
    for row in reader:
        if not row or not any(cell.strip() for cell in row):
            continue
        digest = hashlib.sha1("\x1f".join(row).encode("utf-8")).hexdigest()
        message: dict[str, Any] = {"type": "track", "messageId": "import-csv-" + digest}
        try:
            message["timestamp"] = _iso(float(row[time_col]))
        except (ValueError, IndexError, OverflowError, OSError):
            message["timestamp"] = row[time_col] if len(row) > time_col else None
        properties: dict[str, Any] = {item_property: row[item_col] if len(row) > item_col else None}
        for i, name in extra:
            if i < len(row) and row[i] != "":
                properties[name.lower()] = row[i]
        message["userId"] = row[user_col] if len(row) > user_col else None
        message["event"] = (
            row[event_col] if event_col is not None and len(row) > event_col else "Product Viewed"
        )
        message["properties"] = properties
        yield message


class Readable(Protocol):
    def read(self) -> str: ...


def json_messages(text: Readable) -> Iterator[Any]:
    """Messages from a JSON document or JSON lines; each unit may be a message, an array
    of messages or a ``{"batch": [...]}`` object."""
    content = text.read()
    stripped = content.lstrip()
    units: Iterable[Any]
    try:
        units = [json.loads(stripped)] if stripped else []
    except json.JSONDecodeError:
        units = (json.loads(line) for line in content.splitlines() if line.strip())
    for unit in units:
        if isinstance(unit, list):
            yield from unit
        elif isinstance(unit, dict) and isinstance(unit.get("batch"), list) and "type" not in unit:
            yield from unit["batch"]
        else:
            yield unit


def _chunks(messages: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for message in messages:
        chunk.append(message)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def messages_of(path: str, item_property: str) -> Iterator[Any]:
    handle = _open_text(path)
    with handle:
        first = handle.readline()
        rest = handle
        if _looks_like_csv(first):
            yield from csv_messages(_prepend(first, rest), item_property)
        else:
            yield from json_messages(_Joined(first, rest))


def _prepend(first: str, rest: IO[str]) -> Iterator[str]:
    yield first
    yield from rest


class _Joined:
    def __init__(self, first: str, rest: IO[str]):
        self.first, self.rest = first, rest

    def read(self) -> str:
        return self.first + self.rest.read()


def import_messages(
    ingestor: Ingestor,
    messages: Iterable[Any],
    report: ImportReport,
    progress: Callable[[ImportReport], None] | None = None,
    chunk: int = CHUNK,
) -> ImportReport:
    for part in _chunks(messages, chunk):
        try:
            summary = ingestor.ingest(part, live=False)
        except NoMessages as exc:
            summary = exc.summary
        report.add(summary)
        if progress:
            progress(report)
    return report


def import_files(
    ingestor: Ingestor,
    paths: Iterable[str],
    item_property: str,
    progress: Callable[[ImportReport], None] | None = None,
) -> ImportReport:
    report = ImportReport()
    for path in paths:
        report.files += 1
        import_messages(ingestor, messages_of(path, item_property), report, progress)
    return report
