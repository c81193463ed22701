"""GET /: a small page, no build step, that shows what the service recommends.

The HTML is a template with no data in it but what runs (mode, recommender, whether tokens
are required); ``static/page.js`` reads the visitor from the address (``/?userId=…``,
``/?anonymousId=…``) or from Segment's ``ajs_anonymous_id`` cookie, and the visitor's token
from the form or the fragment (``#token=…``: never sent in a request; kept in the tab's
sessionStorage), then fetch()es ``/healthz`` (the public status) and ``/recommendations``
and renders with ``textContent`` only. The page and the static files get security headers
(below); the JSON endpoints are left as they are.
"""

from __future__ import annotations

from flask import Blueprint, current_app, make_response, render_template, request

bp = Blueprint("page", __name__)

# No inline script or style anywhere: everything comes from /static. Images may come from
# the shop's CDN (https:) or be data: URLs; fetch() only to this service.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' https: data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # The address names the visitor: never send it to the image hosts or a clicked shop.
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
}

# Endpoints whose responses get SECURITY_HEADERS: this page, the insights page (and its
# JSON) and the app's static files.
_PAGE_ENDPOINTS = frozenset({"page.index", "static", "insights.insights"})


@bp.get("/")
def index():
    settings = current_app.extensions["segment"].settings
    response = make_response(
        render_template(
            "index.html",
            tokens_required=bool(settings.secret_key),
            mode=settings.mode,
            recommender=settings.recommender_mode,
        )
    )
    # The page itself holds no data; revalidate so a new deployment's script is picked up.
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.after_app_request
def _security_headers(response):
    if request.endpoint in _PAGE_ENDPOINTS:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
    return response
