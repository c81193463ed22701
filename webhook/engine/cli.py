"""``flask --app webhook train | import FILE... | evaluate``."""

from __future__ import annotations

import json
import time

import click
from flask import current_app
from flask.cli import with_appcontext


def register(app) -> None:
    for command in (train_command, import_command, evaluate_command):
        app.cli.add_command(command)


def _services():
    return current_app.extensions["segment"]


@click.command("train")
@click.option(
    "--if-due", is_flag=True, help="Train only if N new interactions or T seconds call for it."
)
@with_appcontext
def train_command(if_due: bool) -> None:
    """Train the local engine on the stored interactions now."""
    from . import engine_for
    from .persistence import latest_model_info

    engine = engine_for(current_app)
    started = time.perf_counter()
    version = engine.trainer.train(force=not if_due)
    if version is None:
        holder = engine.trainer.lease.holder()
        if holder:
            raise click.ClickException(f"another process is training ({holder}); try later")
        click.echo("nothing to train: no training is due")
        return
    info = latest_model_info(engine.trainer.store)
    _, model = engine.holder.current()
    stats = model.stats if model is not None else {}
    click.echo(
        f"model version {version} trained in {time.perf_counter() - started:.1f} s: "
        + json.dumps({k: stats[k] for k in ("interactions", "users", "items") if k in stats})
    )
    assert info is not None


@click.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@with_appcontext
def import_command(files: tuple[str, ...]) -> None:
    """Import a Personalize interactions CSV or Segment JSON / JSON-lines (optionally
    gzip) through the webhook's ingestion code."""
    from .importer import import_files

    services = _services()
    services.ensure_schema()
    started = time.perf_counter()
    last = [started]

    def progress(report):
        # The local store applier keeps up as the file is read (the inbox stays small,
        # and `train` right after the import sees everything).
        services.drain(["local"])
        now = time.perf_counter()
        if now - last[0] >= 5:
            last[0] = now
            click.echo(
                f"  {report.received} messages read, {report.interactions} interactions stored",
                err=True,
            )

    try:
        report = import_files(
            services.ingestor, files, services.settings.item_id_properties[0], progress
        )
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if not services.drain(["local"], timeout=600):
        raise click.ClickException(
            "the local store did not catch up with the inbox in "
            "10 minutes; the service applies the rest"
        )
    click.echo(
        f"imported {len(files)} file(s) in {time.perf_counter() - started:.1f} s: "
        f"{report.received} messages, {report.accepted} accepted, "
        f"{report.duplicates} duplicates, {report.rejected} rejected, "
        f"{report.skipped} skipped; {report.interactions} new interactions"
    )
    for reason in report.examples:
        click.echo(f"  e.g. {reason}")
    old = report.skipped_by_reason.get("older_than_retention", 0)
    if old:
        days = services.settings.interaction_retention_days
        click.echo(
            f"{old} interaction(s) fell outside retention (older than "
            f"INTERACTION_RETENTION_DAYS={days:g}) and were skipped: set "
            f"INTERACTION_RETENTION_DAYS higher, or 0 to keep interactions for ever, "
            f"and import again"
        )
    for reason, meaning in (
        ("deleted", "about people deleted since"),
        ("no_consent", "denied a CONSENT_CATEGORIES category"),
    ):
        if report.skipped_by_reason.get(reason):
            click.echo(f"{report.skipped_by_reason[reason]} message(s) {meaning} were skipped")
    if "personalize" in services.runners:
        pending = services.inbox.lag(["personalize"])["personalize"].pending
        if pending:
            click.echo(
                f"{pending} message(s) wait in the inbox for Amazon Personalize: the "
                f"running service sends them (rate-limited)"
            )


@click.command("evaluate")
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, dir_okay=False),
    help="A ml-100k.inter file (default: downloaded once into the cache).",
)
@click.option(
    "--holdout",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of each user's latest interactions held out (between 0 and 1).",
)
@click.option("--k", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--no-tune", is_flag=True, help="Use the default hyper-parameters.")
@with_appcontext
def evaluate_command(data_path: str | None, holdout: float, k: int, no_tune: bool) -> None:
    """Offline evaluation on MovieLens-100k: popularity, ALS, item-kNN, EASE, the engine."""
    from .evaluate import ml100k_path, read_ml100k, run_evaluation

    path = data_path or ml100k_path()
    try:
        ratings = read_ml100k(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    if len(set(ratings.users)) < 2:
        # Nothing to hold out and learn from: every figure would be NaN or meaningless.
        raise click.ClickException(
            f"{path}: {len(ratings.users)} interaction(s) of {len(set(ratings.users))} "
            f"user(s) read; evaluate needs an ml-100k.inter file (tab-separated user, item, "
            f"rating, timestamp, after a header line) with interactions of several users"
        )
    # The engine answers with this app's ENGINE_HISTORY_MAX, the cap it serves with.
    run_evaluation(
        ratings,
        holdout=holdout,
        k=k,
        tune_params=not no_tune,
        log=click.echo,
        history_max=_services().settings.engine_history_max,
    )
