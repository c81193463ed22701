"""The embedded default's recommendation engine.

``make_engine`` builds the parts (``wiring.build`` calls it, the one place that wires the
service); ``init_app(app)`` registers the engine's CLI commands (``train``, ``import``,
``evaluate``). The web process reloads newer models (``refresher``); the worker trains when
training is due (``training``, in a child process). ``recommender_for(app)`` gives the
``LocalRecommender`` (the ``webhook.recommenders.Recommender`` protocol).
How the model works and how good it is: docs/engine.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .service import LocalRecommender, ModelHolder, ModelRefresher, Trainer, TrainingLoop

log = logging.getLogger("webhook.engine")


@dataclass
class Engine:
    holder: ModelHolder
    recommender: LocalRecommender
    trainer: Trainer
    refresher: ModelRefresher  # the web process: newer models swapped in
    training: TrainingLoop  # the worker: trains when due


def make_engine(store, settings, popular, instance_path: str) -> Engine:
    """The model holder, the recommender on it (``popular`` before the first model), the
    trainer and their loops, for one store."""
    from .service import LocalRecommender, ModelHolder, ModelRefresher, Trainer, TrainingLoop

    holder = ModelHolder(store, settings.engine_model_refresh_seconds)
    trainer = Trainer(store, settings, holder, instance_path=instance_path)
    return Engine(
        holder=holder,
        recommender=LocalRecommender(store, settings, holder, popular),
        trainer=trainer,
        refresher=ModelRefresher(holder),
        training=TrainingLoop(trainer),
    )


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
