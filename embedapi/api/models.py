"""GET /v1/models, /models, /v1/models/<id>: what is configured, with kind, dimensions, max tokens."""

from __future__ import annotations

from flask import Blueprint, Response

from .common import json_response, require_api_key, state

bp = Blueprint("models", __name__)
bp.before_request(require_api_key)


@bp.get("/v1/models")
@bp.get("/models")
def list_models() -> Response:
    return json_response({"object": "list", "data": state().registry.describe()})


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id: str) -> Response:
    registry = state().registry
    wanted = registry.entry(model_id).spec.id
    return json_response(next(m for m in registry.describe() if m["id"] == wanted))
