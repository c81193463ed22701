"""Command-line tools: ``flask --app webhook <command>``."""
from __future__ import annotations

import click
from flask import Flask, current_app

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


def init_app(app: Flask) -> None:
    app.cli.add_command(token_command)
