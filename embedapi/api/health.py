"""GET /health (liveness, no model work) and GET /ready (this worker has every model loaded and warm)."""

from __future__ import annotations

import os

from flask import Blueprint, Response

from .common import json_response, state

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    registry = state().registry
    if registry.state == "failed":
        return json_response({"status": "failed", "error": "model loading failed; see the log",
                              "pid": os.getpid()}, status=503)
    return json_response({"status": "ok", "pid": os.getpid()})


@bp.get("/ready")
def ready() -> Response:
    registry = state().registry
    body = {"status": "ready" if registry.ready else registry.state, "pid": os.getpid(),
            "models": {name: name in registry.models for name in registry.entries}}
    return json_response(body, status=200 if registry.ready else 503)
