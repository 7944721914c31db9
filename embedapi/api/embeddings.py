"""POST /v1/embeddings (and /embeddings): OpenAI embeddings with Ruri's prefixes."""

from __future__ import annotations

from flask import Blueprint, Response

from .. import service
from .common import client_gone, json_response, load, note, read_json, require_api_key, state
from .schemas import EmbeddingsRequest

bp = Blueprint("embeddings", __name__)
bp.before_request(require_api_key)
_schema = EmbeddingsRequest()


@bp.post("/v1/embeddings")
@bp.post("/embeddings")
def create_embeddings() -> Response:
    body = read_json()
    req = load(_schema, body)
    req["input_is_string"] = isinstance(body.get("input"), str)
    st = state()
    out = service.embed(st.registry, st.settings, req, gone=client_gone())
    note(req["model"], len(req["input"]), out["usage"]["total_tokens"])
    return json_response(out)
