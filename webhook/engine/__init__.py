"""The embedded default's recommendation engine.

``make_engine`` builds the parts (``services.build_services`` calls it, the one place that
wires the service); ``init_app(app)`` registers the engine's CLI commands (``train``,
``import``, ``evaluate``) and, under a server, the per-worker background thread that picks
up new models and trains when due. ``recommender_for(app)`` gives the ``LocalRecommender``
(the ``webhook.recommenders.Recommender`` protocol).
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


def make_engine(store, settings, popular) -> Engine:
    """The model holder, the recommender on it (``popular`` before the first model) and
    the trainer, for one store."""
    from .service import LocalRecommender, ModelHolder, Trainer

    holder = ModelHolder(store, settings.engine_model_refresh_seconds)
    return Engine(holder=holder, recommender=LocalRecommender(store, settings, holder, popular),
                  trainer=Trainer(store, settings, holder))


def init_app(app) -> None:
    """Register CLI commands and the background model refresh/training."""
    from .cli import register

    services = app.extensions["segment"]
    settings = services.settings
    engine = services.engine
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
    return app.extensions["segment"].engine


def recommender_for(app):
    """The local engine's ``Recommender`` for this app."""
    return engine_for(app).recommender


__all__ = ["init_app", "make_engine", "recommender_for", "engine_for", "Engine"]
