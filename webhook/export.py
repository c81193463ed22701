"""Bulk history: Segment archives → Amazon Personalize bulk-import CSV files.

``export_archives(paths, out_dir, settings)`` reads Segment's archives (JSON lines as
Segment writes them to S3, one message a line, optionally gzip; a line may also hold an
array of messages or a ``{"batch": [...]}``) and writes, into ``out_dir``:

* ``interactions.csv`` — ``USER_ID, ITEM_ID, EVENT_TYPE, TIMESTAMP`` (epoch seconds), then
  ``EVENT_VALUE`` when ``EVENT_VALUE_PROPERTY`` is set, then one column per
  ``EVENT_PROPERTIES`` field;
* ``users.csv`` — ``USER_ID`` and one column per ``USER_TRAITS_MAP`` field (only profiles
  with at least one mapped trait, as PutUsers);
* ``items.csv`` — ``ITEM_ID`` and one column per ``ITEM_PROPERTIES_MAP`` field.

The mapping is the real-time path's, by construction: every message goes through
``parse_message`` (the Spec checks), the ``Router`` (the same interaction events, item id
properties, products fan-out and event ids) and ``personalize_mapping`` (``map_event``,
``map_users``, ``map_items``: event type map, event value, properties, limits). A column
is named after the mapping's schema field in Personalize's CSV form: the camelCase name
the real-time properties use (``numberOfRatings``) becomes ``NUMBER_OF_RATINGS``.

Like the webhook, a ``messageId`` seen before makes the whole message a duplicate (the first
copy wins), and an interaction's event id is stored once. ``USER_ID`` is the ``userId``, or
for an anonymous visitor the ``anonymousId`` (the id ``GET /recommendations`` asks
Personalize with). A ``delete`` removes what came before it in the archive about that user
and the anonymous ids linked to them (interactions whose ``USER_ID`` is one of those ids,
and their traits), as the local store does; what comes after it is kept.

Memory does not grow with the archives: interactions are written as the messages stream
(one pass); the bookkeeping that needs to remember things — messageIds and event ids
seen, identity links, user traits and item properties to merge, deletions — lives in a
SQLite file in a temporary folder inside ``out_dir`` (removed at the end), with a bounded
page cache. users.csv and items.csv are written from it at the end, ordered by id, each
id's records merged in time order (newer wins, as the real-time path merges). Output is
deterministic: the same archives in the same order give the same bytes.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
import shutil
import sqlite3
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, cast

from .personalize_mapping import MappingConfig, Problem, map_event, map_items, map_users
from .routing import ItemDetails, Router, UserTraits
from .segment import MessageError, parse_message
from .settings import Settings

FILES = ("interactions.csv", "users.csv", "items.csv")
CACHE_KIB = 16 * 1024  # SQLite page cache (and sorter) bound: the bookkeeping's memory
_LINK_CACHE = 65536  # recent anonymousId → userId links, to skip rewriting the same one


def column_name(schema_field: str) -> str:
    """``numberOfRatings`` → ``NUMBER_OF_RATINGS`` (Personalize's CSV column for the field
    PutEvents/PutUsers/PutItems properties call ``numberOfRatings``)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", schema_field)
    return re.sub(r"[^0-9A-Za-z]+", "_", spaced).strip("_").upper() or schema_field


def _columns(mapping: Iterable[tuple[str, str]]) -> list[str]:
    """Schema field names of a mapping, in order, once each."""
    return list(dict.fromkeys(schema for _, schema in mapping))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass
class ExportReport:
    files: int = 0
    lines: int = 0  # archive lines read (not blank)
    messages: int = 0  # Segment messages found in them
    accepted: int = 0
    duplicates: int = 0  # a messageId seen before
    rejected: int = 0  # not JSON, or breaks the Segment Spec
    skipped: int = 0  # a product event without an item id
    interactions: int = 0  # rows in interactions.csv
    users: int = 0  # rows in users.csv
    items: int = 0  # rows in items.csv
    deletions: int = 0  # delete messages honoured
    forgotten: int = 0  # messages about people deleted through the service since
    deleted_interactions: int = 0
    duplicate_events: int = 0  # an event id written before (another messageId made it)
    problems: Counter = field(default_factory=Counter)  # "kind action" -> count
    examples: list[str] = field(default_factory=list)

    def example(self, reason: str) -> None:
        if len(self.examples) < 10 and reason not in self.examples:
            self.examples.append(reason)

    def as_json(self) -> dict[str, Any]:
        body = {k: v for k, v in self.__dict__.items() if k not in ("problems", "examples")}
        body["problems"] = dict(sorted(self.problems.items()))
        body["examples"] = list(self.examples)
        return body


# -- reading archives -------------------------------------------------------------------


class _Archive:
    """One archive file as lines of bytes; ``position`` is how far the file (compressed
    bytes for gzip) has been read, for the progress bar."""

    def __init__(self, path: str):
        self.path = path
        self.raw = open(path, "rb")
        magic = self.raw.read(2)
        self.raw.seek(0)
        self.stream: IO[bytes] = (
            cast(IO[bytes], gzip.GzipFile(fileobj=self.raw, mode="rb"))
            if magic == b"\x1f\x8b"
            else self.raw
        )

    @property
    def position(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def _units(unit: Any) -> Iterator[Any]:
    if isinstance(unit, list):
        yield from unit
    elif isinstance(unit, dict) and "type" not in unit and isinstance(unit.get("batch"), list):
        yield from unit["batch"]
    else:
        yield unit


class _NotJSON:
    """A line that is not JSON: rejected, with its reason."""

    def __init__(self, reason: str):
        self.reason = reason


def archive_messages(archive: _Archive, report: ExportReport) -> Iterator[Any]:
    """Messages of one archive, streamed line by line. A document that is not JSON lines
    (a pretty-printed array, say) is read whole by the importer's reader instead."""
    first = True
    for number, line in enumerate(archive.stream, 1):
        if not line.strip():
            continue
        report.lines += 1
        try:
            unit = json.loads(line)
        except (ValueError, RecursionError) as exc:
            if first and line.lstrip()[:1] in (b"[", b"{", b"\xef"):
                yield from _whole_document(archive.path, report)
                return
            if first and b"USER_ID" in line.upper() and b"ITEM_ID" in line.upper():
                raise ValueError(
                    f"{archive.path}: this is a Personalize CSV, not a Segment "
                    f"archive (it is already in the bulk-import form)"
                ) from None
            yield _NotJSON(f"line {number}: not JSON ({str(exc)[:80]})")
            first = False
            continue
        first = False
        yield from _units(unit)


def _whole_document(path: str, report: ExportReport) -> Iterator[Any]:
    from .engine.importer import _open_text, json_messages

    with _open_text(path) as handle:
        try:
            yield from json_messages(handle)
        except (ValueError, RecursionError) as exc:
            raise ValueError(
                f"{path}: neither JSON lines nor a JSON document: {str(exc)[:120]}"
            ) from None


# -- bookkeeping ----------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE seen_messages (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE seen_events (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE links (anonymous_id TEXT PRIMARY KEY, user_id TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX links_user ON links (user_id);
CREATE TABLE purge (id TEXT PRIMARY KEY, message_seq INTEGER, row_mark INTEGER) WITHOUT ROWID;
CREATE TABLE users (user_id TEXT, ts REAL, seq INTEGER, traits TEXT);
CREATE TABLE items (item_id TEXT, ts REAL, seq INTEGER, properties TEXT);
"""


class _Book:
    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in (
            "journal_mode=OFF",
            "synchronous=OFF",
            "temp_store=FILE",
            f"cache_size=-{CACHE_KIB}",
            "locking_mode=EXCLUSIVE",
        ):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(_SCHEMA)
        self.db.execute("BEGIN")
        self.cur = self.db.cursor()
        self._links: dict[str, str] = {}

    def claim(self, table: str, key: str) -> bool:
        self.cur.execute(f"INSERT OR IGNORE INTO {table} (id) VALUES (?)", (key,))
        return self.cur.rowcount == 1

    def link(self, anonymous_id: str, user_id: str) -> None:
        if self._links.get(anonymous_id) == user_id:
            return
        if len(self._links) >= _LINK_CACHE:
            self._links.clear()
        self._links[anonymous_id] = user_id
        self.cur.execute("INSERT OR REPLACE INTO links VALUES (?, ?)", (anonymous_id, user_id))

    def delete_user(self, deletion, message_seq: int, row_mark: int) -> None:
        """Mark what came before about the deleted person (a userId and its linked
        anonymous ids, or an anonymousId alone) as deleted; their links go, as in the
        store."""
        if deletion.user_id:
            ids = [deletion.user_id] + [
                row[0]
                for row in self.db.execute(
                    "SELECT anonymous_id FROM links WHERE user_id = ?", (deletion.user_id,)
                )
            ]
        else:
            ids = [deletion.anonymous_id]
        self.db.executemany(
            "INSERT OR REPLACE INTO purge VALUES (?, ?, ?)",
            [(i, message_seq, row_mark) for i in ids],
        )
        self.db.executemany(
            "DELETE FROM links WHERE user_id = ? OR anonymous_id = ?", [(i, i) for i in ids]
        )
        self._links.clear()

    def close(self) -> None:
        self.db.close()


# -- writing ------------------------------------------------------------------------------


def _open_csv(path: str) -> tuple[IO[str], Any]:
    # errors="replace": a lone surrogate (possible from JSON escapes) cannot be UTF-8.
    handle = open(path, "w", encoding="utf-8", errors="replace", newline="")
    return handle, csv.writer(handle, lineterminator="\n")


class Exporter:
    def __init__(
        self, settings: Settings, out_dir: str, forgotten: Callable[[Any], bool] | None = None
    ):
        self.settings = settings
        # Whether a message is about a person deleted (through the service) after it was
        # sent: such messages are left out of the files (tombstones.py).
        self.forgotten = forgotten
        self.out_dir = out_dir
        self.router = Router(settings.interaction_events, settings.item_id_properties)
        self.config = MappingConfig.from_settings(settings)
        self.event_fields = _columns(self.config.event_properties)
        self.user_fields = _columns(self.config.user_traits_map)
        self.item_fields = _columns(self.config.item_properties_map)
        self.user_sources = frozenset(s for s, _ in self.config.user_traits_map)
        self.item_sources = frozenset(s for s, _ in self.config.item_properties_map)
        self.report = ExportReport()

    # The header of each file.
    def interaction_header(self) -> list[str]:
        header = ["USER_ID", "ITEM_ID", "EVENT_TYPE", "TIMESTAMP"]
        if self.config.event_value_property:
            header.append("EVENT_VALUE")
        return header + [column_name(f) for f in self.event_fields]

    def run(
        self, paths: Iterable[str], progress: Callable[[int], None] | None = None
    ) -> ExportReport:
        paths = list(paths)
        os.makedirs(self.out_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix=".export-", dir=self.out_dir)
        try:
            book = _Book(os.path.join(work, "book.sqlite"))
            try:
                handle, writer = _open_csv(os.path.join(work, FILES[0]))
                with handle:
                    writer.writerow(self.interaction_header())
                    self._stream(paths, book, writer, progress)
                if self.report.deletions:
                    self._apply_deletions(book, work)
                self._write_users(book, os.path.join(work, FILES[1]))
                self._write_items(book, os.path.join(work, FILES[2]))
            finally:
                book.close()
            for name in FILES:
                os.replace(os.path.join(work, name), os.path.join(self.out_dir, name))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self.report

    def _stream(
        self, paths: list[str], book: _Book, writer, progress: Callable[[int], None] | None
    ) -> None:
        report = self.report
        problems: list[Problem] = []
        route = self.router.route
        config = self.config
        value_column = bool(config.event_value_property)
        fields = self.event_fields
        user_sources, item_sources = self.user_sources, self.item_sources
        cur = book.cur
        seq = 0
        done_bytes = 0
        for path in paths:
            report.files += 1
            archive = _Archive(path)
            try:
                for count, raw in enumerate(archive_messages(archive, report)):
                    if progress is not None and count % 4096 == 0:
                        progress(done_bytes + archive.position)
                    if isinstance(raw, _NotJSON):
                        report.rejected += 1
                        report.example(raw.reason)
                        continue
                    report.messages += 1
                    seq += 1
                    try:
                        message = parse_message(raw)
                    except MessageError as exc:
                        report.rejected += 1
                        report.example(str(exc))
                        continue
                    if (
                        self.forgotten is not None
                        and message.type != "delete"
                        and self.forgotten(message)
                    ):
                        report.forgotten += 1
                        continue
                    if message.message_id is not None and not book.claim(
                        "seen_messages", message.message_id
                    ):
                        report.duplicates += 1
                        continue
                    routed = route(message)
                    if routed.skipped:
                        report.skipped += 1
                        report.example(routed.skipped)
                    else:
                        report.accepted += 1
                    for link in routed.links:
                        book.link(link.anonymous_id, link.user_id)
                    if routed.deletion is not None:
                        report.deletions += 1
                        book.delete_user(routed.deletion, seq, report.interactions)
                    if user_sources:
                        for user in routed.users:
                            traits = {k: v for k, v in user.traits.items() if k in user_sources}
                            if traits:
                                cur.execute(
                                    "INSERT INTO users VALUES (?, ?, ?, ?)",
                                    (user.user_id, user.timestamp, seq, json.dumps(traits)),
                                )
                    for item in routed.items:
                        props = {k: v for k, v in item.properties.items() if k in item_sources}
                        cur.execute(
                            "INSERT INTO items VALUES (?, ?, ?, ?)",
                            (
                                item.item_id,
                                item.timestamp,
                                seq,
                                json.dumps(props) if props else None,
                            ),
                        )
                    for record in routed.interactions:
                        if not book.claim("seen_events", record.event_id):
                            report.duplicate_events += 1
                            continue
                        mapped = map_event(record, config, problems)
                        if problems:
                            self._problems(problems)
                        if mapped is None:
                            continue
                        _, _, event = mapped
                        row = [
                            record.user_id or record.anonymous_id,
                            event["itemId"],
                            event["eventType"],
                            int(math.floor(event["sentAt"])),
                        ]
                        if value_column:
                            row.append(_cell(event.get("eventValue")))
                        if fields:
                            values = (
                                json.loads(event["properties"]) if "properties" in event else {}
                            )
                            row.extend(_cell(values.get(f)) for f in fields)
                        writer.writerow(row)
                        report.interactions += 1
                done_bytes += os.path.getsize(path)
                if progress is not None:
                    progress(done_bytes)
            finally:
                archive.close()

    def _problems(self, problems: list[Problem]) -> None:
        for problem in problems:
            self.report.problems[f"{problem.kind} {problem.action}"] += 1
            self.report.example(problem.reason)
        problems.clear()

    def _apply_deletions(self, book: _Book, work: str) -> None:
        """Second pass over interactions.csv, only when the archives held deletions:
        rows written before a delete whose USER_ID it covers are left out."""
        source = os.path.join(work, FILES[0])
        target = os.path.join(work, FILES[0] + ".filtered")
        lookup = book.db.cursor()
        kept = 0
        with open(source, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            out, writer = _open_csv(target)
            with out:
                writer.writerow(next(reader))
                for number, row in enumerate(reader):
                    mark = lookup.execute(
                        "SELECT row_mark FROM purge WHERE id = ?", (row[0],)
                    ).fetchone()
                    if mark is not None and number < mark[0]:
                        self.report.deleted_interactions += 1
                        continue
                    writer.writerow(row)
                    kept += 1
        os.replace(target, source)
        self.report.interactions = kept

    def _write_users(self, book: _Book, path: str) -> None:
        handle, writer = _open_csv(path)
        problems: list[Problem] = []
        with handle:
            writer.writerow(["USER_ID"] + [column_name(f) for f in self.user_fields])
            rows = book.db.execute(
                "SELECT u.user_id, u.traits FROM users u LEFT JOIN purge p ON p.id = u.user_id "
                "WHERE p.message_seq IS NULL OR u.seq > p.message_seq "
                "ORDER BY u.user_id, u.ts, u.seq"
            )
            for user_id, merged in _merged(rows):
                for record in map_users([UserTraits(user_id, merged, 0.0)], self.config, problems):
                    values = json.loads(record["properties"])
                    writer.writerow(
                        [record["userId"]] + [_cell(values.get(f)) for f in self.user_fields]
                    )
                    self.report.users += 1
                self._problems(problems)

    def _write_items(self, book: _Book, path: str) -> None:
        handle, writer = _open_csv(path)
        problems: list[Problem] = []
        with handle:
            writer.writerow(["ITEM_ID"] + [column_name(f) for f in self.item_fields])
            rows = book.db.execute(
                "SELECT item_id, properties FROM items ORDER BY item_id, ts, seq"
            )
            for item_id, merged in _merged(rows):
                for record in map_items(
                    [ItemDetails(item_id, {}, merged, 0.0)], self.config, problems
                ):
                    values = json.loads(record["properties"]) if "properties" in record else {}
                    writer.writerow(
                        [record["itemId"]] + [_cell(values.get(f)) for f in self.item_fields]
                    )
                    self.report.items += 1
                self._problems(problems)


def _merged(rows: Iterable[tuple[str, str | None]]) -> Iterator[tuple[str, dict]]:
    """(id, fields) rows ordered by id then time → (id, fields merged, newer winning)."""
    current: str | None = None
    merged: dict = {}
    for key, text in rows:
        if key != current:
            if current is not None:
                yield current, merged
            current, merged = key, {}
        if text:
            merged.update(json.loads(text))
    if current is not None:
        yield current, merged


def export_archives(
    paths: Iterable[str],
    out_dir: str,
    settings: Settings,
    progress: Callable[[int], None] | None = None,
    forgotten: Callable[[Any], bool] | None = None,
) -> ExportReport:
    return Exporter(settings, out_dir, forgotten).run(paths, progress)


def terminal_progress(total_bytes: int):
    """A tqdm bar over the archives' bytes when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="export",
        file=sys.stderr,
    )

    def update(done: int) -> None:
        bar.update(max(0, done - bar.n))

    return update, bar
