"""GET /openapi.yaml: the API description (``openapi.yaml`` at the project root), served
as it is in the repository, so what is checked in the tests is what callers read."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response

from .errors import error_response

bp = Blueprint("openapi", __name__)

DOCUMENT = Path(__file__).resolve().parents[2] / "openapi.yaml"
_cache: dict[str, bytes] = {}


def _document() -> bytes | None:
    if "body" not in _cache:
        try:
            _cache["body"] = DOCUMENT.read_bytes()
        except OSError:
            return None
    return _cache["body"]


@bp.get("/openapi.yaml")
def openapi_document():
    body = _document()
    if body is None:
        return error_response(404, "not_found", "openapi.yaml is not deployed with the service")
    response = Response(body, content_type="application/yaml; charset=utf-8")
    response.headers["Cache-Control"] = "no-cache"
    return response
