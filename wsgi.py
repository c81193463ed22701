"""WSGI entry point: ``gunicorn wsgi:app``."""

import sys

from webhook import ConfigError, create_app

try:
    app = create_app()
except ConfigError as exc:
    sys.stderr.write(f"configuration error: {exc}\n")
    raise SystemExit(3) from None
