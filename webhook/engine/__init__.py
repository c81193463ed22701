"""The embedded default's recommendation engine.

``make_engine`` builds the parts (``services.build_services`` calls it, the one place that
wires the service); ``init_app(app)`` registers the engine's CLI commands (``train``,
``import``, ``evaluate``). Under a server, each worker's background thread that picks up
new models and trains when due starts with the other background work
(``Services.start_background``). ``recommender_for(app)`` gives the ``LocalRecommender``
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

    app.extensions["engine"] = app.extensions["segment"].engine
    register(app)


def engine_for(app) -> Engine:
    return app.extensions["segment"].engine


def recommender_for(app):
    """The local engine's ``Recommender`` for this app."""
    return engine_for(app).recommender


__all__ = ["init_app", "make_engine", "recommender_for", "engine_for", "Engine"]
