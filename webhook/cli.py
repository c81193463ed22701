"""Command-line tools: ``flask --app webhook <command>``."""

from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from .settings import reveal
from .tokens import mint_token


@click.command("token")
@click.argument("visitor_id")
@click.option("--anonymous", is_flag=True, help="VISITOR_ID is an anonymousId, not a userId.")
def token_command(visitor_id: str, anonymous: bool) -> None:
    """Print a token for GET /recommendations, bound to VISITOR_ID (needs SECRET_KEY)."""
    settings = current_app.extensions["segment"].settings
    if not settings.secret_key:
        raise click.ClickException("SECRET_KEY is not set: tokens are not needed or checked")
    if anonymous:
        click.echo(mint_token(reveal(settings.secret_key), anonymous_id=visitor_id))
    else:
        click.echo(mint_token(reveal(settings.secret_key), user_id=visitor_id))


@click.command("export")
@click.argument("archives", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for interactions.csv, users.csv and items.csv (made if missing).",
)
@with_appcontext
def export_command(archives: tuple[str, ...], out_dir: str) -> None:
    """Turn Segment archives (JSON lines, optionally gzip) into Amazon Personalize
    bulk-import CSV files, with the real-time path's mapping."""
    import json
    import os
    import time

    from .export import export_archives, terminal_progress

    services = current_app.extensions["segment"]
    settings = services.settings
    # People deleted through this service stay deleted in the files (their tombstones).
    services.ensure_schema()
    tombstones = services.tombstones
    tombstones.refresh(force=True)

    def forgotten(message) -> bool:
        return tombstones.deleted_since(
            (message.user_id, message.anonymous_id, message.previous_id),
            message.timestamp.timestamp(),
            refresh=False,
        )

    update, bar = terminal_progress(sum(os.path.getsize(a) for a in archives))
    started = time.perf_counter()
    try:
        report = export_archives(archives, out_dir, settings, update, forgotten)
    except (ValueError, OSError, EOFError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    click.echo(
        f"exported {report.files} file(s) in {elapsed:.1f} s "
        f"({report.messages / elapsed if elapsed else 0:,.0f} messages/s): "
        f"{report.interactions} interactions, {report.users} users, "
        f"{report.items} items into {out_dir}"
    )
    click.echo(json.dumps(report.as_json()), err=True)


@click.group("dead-letters")
def dead_letters_group() -> None:
    """Records Amazon Personalize refused for good (InvalidInputException) or that did
    not fit its limits, kept with their messages."""


@dead_letters_group.command("list")
@click.option("--limit", default=50, show_default=True)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object a line, with the message (it holds personal data).",
)
@with_appcontext
def dead_letters_list(limit: int, as_json: bool) -> None:
    """Show the oldest dead letters."""
    import json

    services = current_app.extensions["segment"]
    services.ensure_schema()
    letters = services.dead_letters.list(limit=limit)
    total = services.dead_letters.count()
    for letter in letters:
        if as_json:
            click.echo(json.dumps(letter.as_json(with_message=True), ensure_ascii=False))
        else:
            click.echo(
                f"{letter.id:>6}  {letter.kind:<5}  {letter.record_id[:40]:<40}  "
                f"attempts {letter.attempts}  {letter.reason[:100]}"
            )
    click.echo(
        f"{total} dead letter(s)" + (f", {len(letters)} shown" if total > len(letters) else ""),
        err=True,
    )


@dead_letters_group.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead letter.")
@click.option(
    "--timeout", default=60.0, show_default=True, help="Seconds to wait for Amazon Personalize."
)
@with_appcontext
def dead_letters_retry(ids: tuple[int, ...], retry_all: bool, timeout: float) -> None:
    """Route the messages again with today's mapping and send their records; the ones
    that go through (or no longer yield a record) leave the list."""
    services = current_app.extensions["segment"]
    runner = services.runners.get("personalize")
    if runner is None:
        raise click.ClickException("Amazon Personalize is not configured (PERSONALIZE_TRACKING_ID)")
    if not ids and not retry_all:
        raise click.ClickException("name dead-letter ids, or --all")
    services.ensure_schema()
    letters = services.dead_letters.list(limit=10**9, ids=None if retry_all else ids)
    if not letters:
        click.echo("no such dead letter")
        return
    try:
        outcomes = runner.applier.retry(letters, timeout=timeout)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        runner.applier.sender.stop()
    by_id = {letter.id: letter for letter in letters}
    resolved = [i for i, outcome in outcomes.items() if outcome in ("sent", "gone", "deleted")]
    services.dead_letters.resolve(resolved)
    for letter_id, outcome in outcomes.items():
        if outcome.startswith("refused"):
            services.dead_letters.refused_again(by_id[letter_id], outcome[len("refused: ") :])
        click.echo(f"{letter_id:>6}  {outcome[:120]}")
    click.echo(f"{len(resolved)} of {len(outcomes)} resolved", err=True)


@click.command("inbox")
@with_appcontext
def inbox_command() -> None:
    """Each applier's lag: inbox rows not yet applied, the oldest's age, who applies."""
    services = current_app.extensions["segment"]
    services.ensure_schema()
    for name, lag in services.inbox.lag(services.runners).items():
        click.echo(
            f"{name:<12} {lag.pending:>9} pending  oldest {lag.oldest_seconds:9.1f} s"
            + ("  (applying now)" if lag.owner else "")
        )
    click.echo(f"dead letters: {services.dead_letters.count()}")


@click.command("insights")
@click.option(
    "--days",
    default=7,
    show_default=True,
    type=click.IntRange(1, 366),
    help="The last DAYS days (UTC), today included.",
)
@click.option("--json", "as_json", is_flag=True, help="Print GET /insights' JSON instead.")
@with_appcontext
def insights_command(days: int, as_json: bool) -> None:
    """What the recommendations earned, per experiment variant: impressions, visitors,
    clicks, CTR, add-to-carts, orders, revenue; each variant against the baseline
    (always-valid and fixed-sample), the sample-ratio check, and which variant is ahead."""
    import json

    from .insights import report, report_settings, table

    services = current_app.extensions["segment"]
    services.ensure_schema()
    if services.impressions is not None:
        services.impressions.flush()
    body = report(services.store, days, **report_settings(services))
    click.echo(json.dumps(body, indent=2) if as_json else table(body))


@click.command("worker")
@with_appcontext
def worker_command() -> None:
    """Run the worker: the inbox's appliers, retention, checkpoints, data deletion jobs,
    training and the write-backs after purchases (the Procfile's worker process)."""
    from .worker import run

    run(current_app.extensions["segment"])


def init_app(app: Flask) -> None:
    for command in (
        token_command,
        export_command,
        dead_letters_group,
        inbox_command,
        insights_command,
        worker_command,
    ):
        app.cli.add_command(command)
