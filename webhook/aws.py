"""boto3 clients for Amazon Personalize, as both directions of the service use them.

boto3 and botocore's client machinery are imported on a client's first use: in the
embedded default no process pays for them (bench/README.md has the memory figures)."""

from __future__ import annotations

import threading
from typing import Any


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
        self._region = region or None
        self._config = {
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "max_pool_connections": pool_size,
        }
        self._lock = threading.Lock()

    def get(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    self._client = boto3.session.Session().client(
                        self.service, region_name=self._region, config=Config(**self._config)
                    )
        return self._client
