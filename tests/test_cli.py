"""The operator's commands, as users run them: ``flask --app webhook evaluate``, ``inbox``
and ``dead-letters list | retry``, typed in a copy of the project with a fresh shell's
environment (tests/project.py), so on the embedded default: no ``DATABASE_URL``, the
instance folder's SQLite file.

What the service did before the command (accepted deliveries, a record Amazon
Personalize refused) is done by the service's own parts on that same file, with boto3
pointed at the Personalize stand-in (tests/fake_personalize.py); the command in its own
process sees only what is on disk, as an operator's would.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from tests.conftest import aws_stand_ins, raw_client
from tests.deliveries import product_viewed
from tests.fake_personalize import FakePersonalizeEvents
from tests.project import flask, newcomer_environment, project_copy
from webhook import create_app
from webhook.deadletters import DeadLetters
from webhook.inbox import Entry
from webhook.storage.database import sqlite_url_for

# Each command is a process of its own (the app's imports take a second or two of it).
pytestmark = pytest.mark.slow

TRACKING_ID = "tracking-cli-0123"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return project_copy(tmp_path_factory.mktemp("clone") / "project")


@pytest.fixture
def shell(project, tmp_path):
    """A fresh shell in the project, whose instance folder starts empty."""
    shutil.rmtree(project / "instance", ignore_errors=True)
    return newcomer_environment(tmp_path)


# --- evaluate ---------------------------------------------------------------------------


def chains_file(path, users: int = 60, steps: int = 8):
    """An ml-100k.inter file in which each user walks a chain of items in order: the next
    items are easy to recommend from the earlier ones, impossible from popularity."""
    rng = random.Random(3)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(users):
        start = rng.randrange(30)
        lines += [
            f"{user}\t{(start + step) % 40}\t4\t{1_000_000 + user * 100 + step}"
            for step in range(steps)
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def recall(output: str, method: str) -> float:
    """The recall@10 figure of ``method`` in evaluate's table (after its header line)."""
    table = output.split("\nmethod ", 1)[-1]
    for line in table.splitlines():
        if line.startswith(method + " "):
            return float(line.split()[-2])
    raise AssertionError(f"no {method!r} row in:\n{output}")


def test_evaluate_prints_recall_on_a_small_data_set(project, shell, tmp_path):
    data = chains_file(tmp_path / "chains.inter")
    result = flask(project, shell, "evaluate", "--data", str(data), "--no-tune")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recall@10" in result.stdout and "NDCG@10" in result.stdout
    assert "480 interactions, 60 users" in result.stdout
    engine, popularity = recall(result.stdout, "engine"), recall(result.stdout, "popularity")
    assert 0.8 <= engine <= 1.0, result.stdout  # the next items of a chain are easy
    assert popularity < engine
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["--data", "missing.inter"], "Invalid value for '--data'"),
        (["--holdout", "1.5"], "Invalid value for '--holdout'"),
        (["--holdout", "0"], "Invalid value for '--holdout'"),
        (["--k", "0"], "Invalid value for '--k'"),
    ],
)
def test_evaluate_refuses_a_bad_argument_clearly(project, shell, tmp_path, args, says):
    data = chains_file(tmp_path / "chains.inter")
    result = flask(project, shell, "evaluate", "--data", str(data), "--no-tune", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr and "recall@" not in result.stdout


@pytest.mark.parametrize(
    "content, says",
    [
        ("", "0 interaction(s)"),
        ("user,item,rating,time\n1,2,4,100\n2,3,4,101\n", "0 interaction(s)"),
        ("header\n1\t2\t4\tyesterday\n", "line 2: the timestamp is not a number"),
    ],
    ids=["empty", "comma-separated", "bad-timestamp"],
)
def test_evaluate_refuses_a_file_it_cannot_read(project, shell, tmp_path, content, says):
    """Once, a file of no usable line printed a table of NaN and exited 0, and a bad
    timestamp ended in a traceback."""
    data = tmp_path / "other.inter"
    data.write_text(content)
    result = flask(project, shell, "evaluate", "--data", str(data), "--no-tune")
    assert result.returncode == 1, result.stdout + result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr and "nan" not in result.stdout


# --- the service's parts on the instance folder's database --------------------------------


@pytest.fixture
def personalize(monkeypatch):
    """The Personalize stand-in, boto3 in this process pointed at it; ``shell_for`` gives
    a shell configured for it, as an operator's would be."""
    with FakePersonalizeEvents(tracking_ids=[TRACKING_ID]) as fake:
        aws_stand_ins(monkeypatch, personalize_events=fake.url)
        yield fake


def personalize_shell(shell: dict, fake) -> dict:
    return {
        **shell,
        "PERSONALIZE_TRACKING_ID": TRACKING_ID,
        "AWS_ENDPOINT_URL_PERSONALIZE_EVENTS": fake.url,
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1,localhost",
    }


@pytest.fixture
def service(project, shell):
    """service(**settings): the service's parts (an app, no server) on the database the
    commands find by default, the instance folder's SQLite file."""
    apps = []

    def factory(**settings):
        app = create_app({"database_url": sqlite_url_for(str(project / "instance")), **settings})
        apps.append(app)
        return app

    yield factory
    for app in apps:
        parts = app.extensions["segment"]
        parts.stop()
        parts.store.dispose()


def lines_of(output: str) -> dict[str, str]:
    """``inbox``'s lines by their first word."""
    return {line.split()[0]: line for line in output.splitlines() if line.strip()}


def test_inbox_shows_each_appliers_lag_and_the_dead_letters(project, shell, service, personalize):
    env = personalize_shell(shell, personalize)
    fresh = flask(project, env, "inbox")
    assert fresh.returncode == 0, fresh.stderr
    assert "0 pending" in lines_of(fresh.stdout)["local"]
    assert "0 pending" in lines_of(fresh.stdout)["personalize"]
    assert "dead letters: 0" in fresh.stdout

    app = service(personalize_tracking_id=TRACKING_ID)
    messages = [product_viewed(f"sku-{n}", anonymous_id="anon-cli") for n in range(5)]
    assert raw_client(app).post("/segment", json=messages).status_code == 200
    waiting = flask(project, env, "inbox")
    assert waiting.returncode == 0, waiting.stderr
    for applier in ("local", "personalize"):
        line = lines_of(waiting.stdout)[applier]
        assert " 5 pending" in line, waiting.stdout
        assert float(line.split("oldest")[1].split()[0]) >= 0

    services = app.extensions["segment"]
    assert services.drain(["local"])  # the local store applied; Personalize not yet
    partly = lines_of(flask(project, env, "inbox").stdout)
    assert " 0 pending" in partly["local"] and " 5 pending" in partly["personalize"]
    assert services.drain(["personalize"], timeout=30)
    done = lines_of(flask(project, env, "inbox").stdout)
    assert " 0 pending" in done["local"] and " 0 pending" in done["personalize"]
    assert len(personalize.events()) == 5


def refused_letter(service, fake, **message_fields) -> tuple[object, dict]:
    """A delivery whose event Personalize refuses for good (InvalidInputException), applied
    by the service's Personalize applier: it is on the dead-letter list."""
    app = service(personalize_tracking_id=TRACKING_ID)
    message = product_viewed("sku-refused", **message_fields)
    fake.reject_event_ids({message["messageId"]})
    assert app.test_client().post("/segment", json=[message]).status_code == 200
    services = app.extensions["segment"]
    assert services.drain(timeout=30)
    assert services.dead_letters.count() == 1
    return app, message


def test_dead_letters_list_shows_what_personalize_refused(project, shell, service, personalize):
    _, message = refused_letter(service, personalize, anonymous_id="anon-dl")
    env = personalize_shell(shell, personalize)

    listed = flask(project, env, "dead-letters", "list")
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert message["messageId"] in line and "event" in line and "InvalidInputException" in line
    assert "attempts 1" in line
    assert "1 dead letter(s)" in listed.stderr
    assert "anon-dl" not in listed.stdout  # the message (personal data) only with --json

    as_json = flask(project, env, "dead-letters", "list", "--json")
    assert as_json.returncode == 0, as_json.stderr
    (letter,) = [json.loads(text) for text in as_json.stdout.splitlines()]
    assert letter["recordId"] == message["messageId"] and letter["kind"] == "event"
    assert letter["message"] == json.loads(json.dumps(message))


def test_dead_letters_retry_sends_once_personalize_takes_it(project, shell, service, personalize):
    _, message = refused_letter(service, personalize, anonymous_id="anon-dl")
    env = personalize_shell(shell, personalize)
    (letter_id,) = [
        int(line.split()[0])
        for line in flask(project, env, "dead-letters", "list").stdout.splitlines()
    ]

    still = flask(project, env, "dead-letters", "retry", str(letter_id))
    assert still.returncode == 0, still.stderr
    assert "refused" in still.stdout and "InvalidInputException" in still.stdout
    assert "0 of 1 resolved" in still.stderr
    assert "attempts 2" in flask(project, env, "dead-letters", "list").stdout
    assert personalize.events() == []

    personalize.reset()  # the stand-in takes the record now (the mapping was fixed)
    sent = flask(project, env, "dead-letters", "retry", "--all")
    assert sent.returncode == 0, sent.stderr
    assert f"{letter_id:>6}  sent" in sent.stdout and "1 of 1 resolved" in sent.stderr
    assert [e["eventId"] for e in personalize.events()] == [message["messageId"]]
    emptied = flask(project, env, "dead-letters", "list")
    assert emptied.stdout == "" and "0 dead letter(s)" in emptied.stderr

    again = flask(project, env, "dead-letters", "retry", "--all")
    assert again.returncode == 0 and "no such dead letter" in again.stdout
    assert len(personalize.events()) == 1  # sent once


def test_dead_letters_of_a_deleted_person_are_never_sent(project, shell, service, personalize):
    """The person asked to be deleted after Personalize refused her event: the deletion
    takes her dead letter with it, and retrying sends nothing of hers, even with the
    stand-in taking everything again."""
    app, _ = refused_letter(service, personalize, user_id="u-deleted", anonymous_id=None)
    env = personalize_shell(shell, personalize)
    assert "1 dead letter(s)" in flask(project, env, "dead-letters", "list").stderr

    # A message of hers from before the deletion, still in another applier's hands.
    late = product_viewed("sku-late", user_id="u-deleted", anonymous_id=None)
    deletion = {"type": "delete", "userId": "u-deleted", "messageId": "del-cli-1"}
    deletion["timestamp"] = product_viewed("x")["timestamp"]
    assert app.test_client().post("/segment", json=[deletion]).status_code == 200
    assert app.extensions["segment"].drain(timeout=30)
    personalize.reset()

    listed = flask(project, env, "dead-letters", "list")
    assert listed.stdout == "" and "0 dead letter(s)" in listed.stderr
    retried = flask(project, env, "dead-letters", "retry", "--all")
    assert retried.returncode == 0 and "no such dead letter" in retried.stdout

    # That applier refused her message after the deletion: its letter is on the list,
    # and retrying resolves it without sending it.
    def letter_of(message: dict) -> None:
        store = app.extensions["segment"].store
        entry = Entry(0, 0, message["messageId"], "track", 0.0, json.dumps(message))
        with store.write() as tx:
            DeadLetters(store).add(
                tx, "personalize", [("event", message["messageId"], entry, "refused")]
            )

    letter_of(late)
    resolved = flask(project, env, "dead-letters", "retry", "--all")
    assert resolved.returncode == 0, resolved.stderr
    assert "deleted" in resolved.stdout and "1 of 1 resolved" in resolved.stderr
    assert personalize.events() == []

    # The control: she came back after the deletion; what she did since is hers to send.
    since = product_viewed("sku-since", user_id="u-deleted", anonymous_id=None)
    letter_of(since)
    sent = flask(project, env, "dead-letters", "retry", "--all")
    assert sent.returncode == 0 and " sent" in sent.stdout, sent.stderr
    assert [e["eventId"] for e in personalize.events()] == [since["messageId"]]


def test_dead_letters_retry_without_personalize_or_ids_says_why(project, shell, personalize):
    bare = flask(project, shell, "dead-letters", "retry", "--all")
    assert bare.returncode == 1
    assert "Amazon Personalize is not configured (PERSONALIZE_TRACKING_ID)" in bare.stderr
    nothing = flask(project, personalize_shell(shell, personalize), "dead-letters", "retry")
    assert nothing.returncode == 1 and "name dead-letter ids, or --all" in nothing.stderr
    for result in (bare, nothing):
        assert "Traceback" not in result.stderr
