"""boto3 clients for Amazon Personalize, as both directions of the service use them."""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.config import Config


def client_options(region: str, timeout: float, pool_size: int) -> dict:
    """A client's options as plain values (a child process makes its client from them)."""
    return {
        "region_name": region or None,
        "config": {
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "max_pool_connections": pool_size,
        },
    }


class LazyClient:
    """A boto3 client made on first use, so each forked gunicorn worker gets its own; one
    attempt per call with short timeouts, since callers retry or fall back themselves.
    boto3 clients are thread-safe once made."""

    def __init__(
        self,
        service: str,
        *,
        region: str = "",
        timeout: float = 1.0,
        pool_size: int = 10,
        client: Any = None,
    ):
        self.service = service
        self._client = client
        options = client_options(region, timeout, pool_size)
        self._args = {"region_name": options["region_name"], "config": Config(**options["config"])}
        self._lock = threading.Lock()

    def get(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = boto3.session.Session().client(self.service, **self._args)
        return self._client
