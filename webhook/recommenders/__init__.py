"""Recommenders: items for a user, an anonymous session or an item. See ``base``."""

from .base import Recommendation, Recommender, RecommenderUnavailable, ScoredItem

__all__ = ["Recommendation", "Recommender", "RecommenderUnavailable", "ScoredItem"]
