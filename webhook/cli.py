"""Command-line tools: ``flask --app webhook <command>``."""
from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

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
        click.echo(mint_token(settings.secret_key, anonymous_id=visitor_id))
    else:
        click.echo(mint_token(settings.secret_key, user_id=visitor_id))


@click.command("export")
@click.argument("archives", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for interactions.csv, users.csv and items.csv (made if missing).")
@with_appcontext
def export_command(archives: tuple[str, ...], out_dir: str) -> None:
    """Turn Segment archives (JSON lines, optionally gzip) into Amazon Personalize
    bulk-import CSV files, with the real-time path's mapping (issue 8)."""
    import json
    import os
    import time

    from .export import export_archives, terminal_progress
    settings = current_app.extensions["segment"].settings
    update, bar = terminal_progress(sum(os.path.getsize(a) for a in archives))
    started = time.perf_counter()
    try:
        report = export_archives(archives, out_dir, settings, update)
    except (ValueError, OSError, EOFError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    click.echo(f"exported {report.files} file(s) in {elapsed:.1f} s "
               f"({report.messages / elapsed if elapsed else 0:,.0f} messages/s): "
               f"{report.interactions} interactions, {report.users} users, "
               f"{report.items} items into {out_dir}")
    click.echo(json.dumps(report.as_json()), err=True)


def init_app(app: Flask) -> None:
    app.cli.add_command(token_command)
    app.cli.add_command(export_command)  # ecosystem (issue 8)
