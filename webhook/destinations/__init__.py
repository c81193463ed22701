"""Where routed records go. See ``base.Destination``."""
from .base import Destination, DestinationError
from .local import LocalDestination

__all__ = ["Destination", "DestinationError", "LocalDestination"]
