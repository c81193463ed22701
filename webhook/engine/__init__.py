"""The embedded default's recommendation engine.

``init_app(app)`` registers the engine's CLI commands (``train``, ``import``, ``evaluate``)
and, under a server, the per-worker background thread that picks up new models and trains
when due. ``recommender_for(app)`` gives the ``LocalRecommender`` (the
``webhook.recommenders.Recommender`` protocol) that ``GET /recommendations`` uses.
How the model works and how good it is: docs/engine.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("webhook.engine")


@dataclass
class Engine:
    holder: "ModelHolder"
    recommender: "LocalRecommender"
    trainer: "Trainer"


def init_app(app) -> None:
    """Register CLI commands and the background model refresh/training."""
    from .cli import register
    from .service import LocalRecommender, ModelHolder, Trainer

    services = app.extensions["segment"]
    settings = services.settings
    holder = ModelHolder(services.store, settings.engine_model_refresh_seconds)
    engine = Engine(holder=holder, recommender=LocalRecommender(services, holder),
                    trainer=Trainer(services, holder))
    app.extensions["engine"] = engine
    register(app)

    @app.before_request
    def _start_engine_thread():
        # Under a server (not in tests), each worker process gets one thread that swaps
        # in new models and, if due, trains (in a subprocess, under the database lease).
        # Started here rather than in create_app, so it runs in the worker after a fork.
        if app.testing or settings.mode != "embedded":
            return
        engine.trainer.start_background(settings.engine_model_refresh_seconds)
        engine.recommender.inline_refresh = False


def engine_for(app) -> Engine:
    return app.extensions["engine"]


def recommender_for(app):
    """The local engine's ``Recommender`` for this app."""
    return app.extensions["engine"].recommender


__all__ = ["init_app", "recommender_for", "engine_for", "Engine"]
