"""GET /metrics: Prometheus text, summed over every Gunicorn worker (no auth, like /health)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from ..metrics import CONTENT_TYPE, Metrics

bp = Blueprint("metrics", __name__)


def metrics() -> Metrics:
    return current_app.extensions["embedapi.metrics"]


@bp.get("/metrics")
def scrape() -> Response:
    return Response(metrics().render(), mimetype=None, headers={"Content-Type": CONTENT_TYPE})
