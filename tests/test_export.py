"""``flask --app webhook export``: Segment archives → Personalize bulk-import CSV.

The main check runs the same genuine messages (serialized by segment-analytics-python) down
both paths — the real-time one into a stand-in of Personalize's PutEvents/PutUsers/PutItems
(real boto3) and the export — and compares what each produced, field by field.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

import pytest

from tests import deliveries
from tests.conftest import aws_stand_ins
from tests.fake_personalize import FakePersonalizeEvents
from tests.segment_wire import USER_ID
from webhook.export import column_name, export_archives
from webhook.settings import Settings

TRACKING_ID = "tracking-0123"
USERS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/USERS"
ITEMS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/ITEMS"
ENV = {
    "EVENT_TYPE_MAP": "Product Viewed=View,Order Completed=Purchase",
    "EVENT_VALUE_PROPERTY": "price",
    "EVENT_PROPERTIES": "currency,image_url,quantity",
    "USER_TRAITS_MAP": "plan,purchased_products,city",
    "ITEM_PROPERTIES_MAP": "category,price,brand,name",
}
SETTINGS = Settings.from_env(ENV)


def write_archive(path: Path, lines: list, compress: bool = True) -> Path:
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as out:
            out.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_column_names_follow_personalize_csv_form():
    assert column_name("imageUrl") == "IMAGE_URL"
    assert column_name("numberOfRatings") == "NUMBER_OF_RATINGS"
    assert column_name("DISCOUNT") == "DISCOUNT"
    assert column_name("plan") == "PLAN"


# --- the same mapping as the real-time path ---------------------------------------------


@pytest.fixture
def realtime(make_app, monkeypatch):
    """The corpus through POST /segment in Personalize mode; returns the stand-in."""
    with FakePersonalizeEvents(tracking_ids=[TRACKING_ID]) as fake:
        aws_stand_ins(monkeypatch, personalize_events=fake.url)

        def run(messages):
            app = make_app(
                personalize_tracking_id=TRACKING_ID,
                personalize_users_dataset_arn=USERS_ARN,
                personalize_items_dataset_arn=ITEMS_ARN,
                event_type_map=SETTINGS.event_type_map,
                event_value_property=SETTINGS.event_value_property,
                event_properties=SETTINGS.event_properties,
                user_traits_map=SETTINGS.user_traits_map,
                item_properties_map=SETTINGS.item_properties_map,
            )
            response = app.test_client().post("/segment", json=messages)
            assert response.status_code == 200, response.get_json()
            return fake

        yield run


def test_export_matches_the_real_time_path(corpus, realtime, tmp_path):
    fake = realtime(corpus)
    archive = write_archive(tmp_path / "archive.json.gz", corpus)
    report = export_archives([str(archive)], str(tmp_path / "out"), SETTINGS)

    rows = read_csv(tmp_path / "out" / "interactions.csv")
    with open(tmp_path / "out" / "interactions.csv", encoding="utf-8") as handle:
        header = handle.readline().strip().split(",")
    assert header == [
        "USER_ID",
        "ITEM_ID",
        "EVENT_TYPE",
        "TIMESTAMP",
        "EVENT_VALUE",
        "CURRENCY",
        "IMAGE_URL",
        "QUANTITY",
    ]
    expected = []
    for event in fake.events():
        props = json.loads(event["properties"]) if "properties" in event else {}
        expected.append(
            (
                event.get("userId") or event["sessionId"],
                event["itemId"],
                event["eventType"],
                str(int(event["sentAt"])),
                "" if "eventValue" not in event else repr(float(event["eventValue"])),
                *(
                    str(props[f]) if f in props else ""
                    for f in ("currency", "imageUrl", "quantity")
                ),
            )
        )
    got = [tuple(row.values()) for row in rows]
    assert sorted(got) == sorted(expected)
    assert len(got) == report.interactions == len(fake.events()) > 5
    assert {r["EVENT_TYPE"] for r in rows} >= {"View", "Purchase"}  # EVENT_TYPE_MAP applied

    users = read_csv(tmp_path / "out" / "users.csv")
    expected_users = {}
    for user in fake.users():
        props = json.loads(user["properties"])
        expected_users[user["userId"]] = {column_name(k): str(v) for k, v in props.items()}
    assert {
        u["USER_ID"]: {k: v for k, v in u.items() if k != "USER_ID" and v} for u in users
    } == expected_users
    assert expected_users[USER_ID]["PURCHASED_PRODUCTS"] == "sku-9"

    items = read_csv(tmp_path / "out" / "items.csv")
    expected_items = {}
    for item in fake.items():
        props = json.loads(item.get("properties") or "{}")
        expected_items[item["itemId"]] = {column_name(k): str(v) for k, v in props.items()}
    assert {
        i["ITEM_ID"]: {k: v for k, v in i.items() if k != "ITEM_ID" and v} for i in items
    } == expected_items
    assert [i["ITEM_ID"] for i in items] == sorted(i["ITEM_ID"] for i in items)


# --- determinism, shapes, duplicates ------------------------------------------------------


def _message(n: int, **extra) -> dict:
    base = deliveries.track(
        product_id=f"sku-{n % 4}",
        message_id=f"m-{n}",
        user_id=f"u-{n % 3}",
        timestamp=f"2024-05-01T10:00:{n:02d}Z",
        properties={"price": 10 + n, "currency": "EUR"},
    )
    base.update(extra)
    return base


def test_same_bytes_on_a_rerun_gzip_or_not(tmp_path):
    lines = [_message(n) for n in range(30)]
    gz = write_archive(tmp_path / "a.jsonl.gz", lines)
    plain = write_archive(tmp_path / "a.jsonl", lines, compress=False)
    export_archives([str(gz)], str(tmp_path / "one"), SETTINGS)
    export_archives([str(plain)], str(tmp_path / "two"), SETTINGS)
    export_archives([str(gz)], str(tmp_path / "one"), SETTINGS)  # over the first output
    for name in ("interactions.csv", "users.csv", "items.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert sorted(os.listdir(tmp_path / "one")) == [
        "interactions.csv",
        "items.csv",
        "users.csv",
    ]  # no temporary left


def test_duplicates_bad_lines_and_line_shapes(tmp_path):
    archive = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(_message(1)),
        json.dumps(_message(1)),  # a redelivery
        json.dumps([_message(2), _message(3)]),  # an array on one line
        json.dumps({"batch": [_message(4), _message(2)]}),  # a batch; m-2 again
        "{not json",
        json.dumps({"type": "track", "event": "Product Viewed", "messageId": "m-x"}),
        json.dumps(
            _message(
                5,
                event="Order Completed",
                properties={
                    "products": [{"product_id": "a"}, {"product_id": "b"}, {"name": "no id"}]
                },
            )
        ),
        json.dumps(_message(6, properties={"name": "no id"})),  # skipped
        "",
    ]
    archive.write_text("\n".join(lines), encoding="utf-8")
    report = export_archives([str(archive)], str(tmp_path / "out"), SETTINGS)
    rows = read_csv(tmp_path / "out" / "interactions.csv")
    assert [(r["USER_ID"], r["ITEM_ID"], r["EVENT_TYPE"]) for r in rows] == [
        ("u-1", "sku-1", "View"),
        ("u-2", "sku-2", "View"),
        ("u-0", "sku-3", "View"),
        ("u-1", "sku-0", "View"),
        ("u-2", "a", "Purchase"),
        ("u-2", "b", "Purchase"),
    ]
    assert report.duplicates == 2
    assert report.rejected == 2  # the line that is not JSON, the message without a user
    assert report.skipped == 1
    assert report.interactions == 6
    assert any("not JSON" in e for e in report.examples)


def test_latest_traits_win_by_message_time_not_file_order(tmp_path):
    later = deliveries.message(
        "identify",
        message_id="i-2",
        user_id="u1",
        timestamp="2024-05-02T00:00:00Z",
        traits={"plan": "pro"},
    )
    earlier = {
        "type": "identify",
        "messageId": "i-1",
        "userId": "u1",
        "timestamp": "2024-05-01T00:00:00Z",
        "traits": {"plan": "free", "city": "Lyon", "email": "not@mapped"},
    }
    archive = write_archive(tmp_path / "a.jsonl", [later, earlier], compress=False)
    export_archives([str(archive)], str(tmp_path / "out"), SETTINGS)
    assert read_csv(tmp_path / "out" / "users.csv") == [
        {"USER_ID": "u1", "PLAN": "pro", "PURCHASED_PRODUCTS": "", "CITY": "Lyon"}
    ]


def test_a_delete_removes_what_came_before_it(tmp_path):
    lines = [
        _message(1, userId="gone", anonymousId="anon-gone"),
        _message(2, userId=None, anonymousId="anon-gone"),
        _message(3, userId="kept"),
        {
            "type": "identify",
            "messageId": "i-1",
            "userId": "gone",
            "timestamp": "2024-05-01T00:00:00Z",
            "traits": {"plan": "pro"},
        },
        {"type": "delete", "messageId": "d-1", "userId": "gone"},
        _message(4, userId="gone"),
    ]
    lines[1].pop("userId")
    archive = write_archive(tmp_path / "a.jsonl", lines, compress=False)
    report = export_archives([str(archive)], str(tmp_path / "out"), SETTINGS)
    rows = read_csv(tmp_path / "out" / "interactions.csv")
    assert [(r["USER_ID"], r["ITEM_ID"]) for r in rows] == [("kept", "sku-3"), ("gone", "sku-0")]
    assert report.deleted_interactions == 2 and report.interactions == 2
    assert read_csv(tmp_path / "out" / "users.csv") == []


def test_cli_export_without_a_terminal_prints_no_progress_bar(app, tmp_path):
    archive = write_archive(tmp_path / "a.jsonl.gz", [_message(n) for n in range(5)])
    result = app.test_cli_runner().invoke(
        args=["export", str(archive), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "5 interactions" in result.output
    assert "%|" not in result.output  # tqdm's bar
    assert (tmp_path / "out" / "interactions.csv").exists()


def test_cli_export_refuses_a_personalize_csv(app, tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("USER_ID,ITEM_ID,TIMESTAMP\nu,i,1\n")
    result = app.test_cli_runner().invoke(
        args=["export", str(path), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code != 0
    assert "Personalize CSV" in result.output
