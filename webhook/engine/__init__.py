"""The embedded default's recommendation engine (issue 5 fills this in).

``init_app(app)`` registers the engine's CLI commands and background training;
``LocalRecommender`` implements ``webhook.recommenders.Recommender``.
"""
from __future__ import annotations


def init_app(app) -> None:
    """Register CLI commands and start background training (nothing yet)."""
