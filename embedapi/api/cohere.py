"""Cohere's embed: POST /v2/embed (ClientV2.embed) and POST /v1/embed (Client.embed).

Cohere's `input_type` values (search_query, search_document, classification, clustering) are the
input_type aliases of Ruri's prefixes; `truncate` NONE / START / END maps to truncate false / cut the
start / cut the end; `embedding_types` adds quantized copies (embedapi/quantize.py). The request is
translated into `service.embed`'s dict, so prefixes, truncation and usage are the OpenAI route's.
Errors keep the contract's shape (the SDK maps statuses to its typed errors and keeps the body).
"""

from __future__ import annotations

import secrets
from typing import Any

from flask import Blueprint, Response

from .. import service
from ..errors import InvalidRequest
from .common import client_gone, json_response, load, note, read_json, renamed, require_api_key, state
from .dialect_schemas import CohereEmbedV1Request, CohereEmbedV2Request
from .tei import default_model

bp = Blueprint("cohere", __name__)
bp.before_request(require_api_key)
_v1 = CohereEmbedV1Request()
_v2 = CohereEmbedV2Request()


def _embed(co: dict[str, Any], version: str) -> tuple[dict[str, Any], dict[str, Any]]:
    for unsupported in ("images", "inputs"):
        if co.get(unsupported) is not None:
            raise InvalidRequest(f"'{unsupported}' is not supported: this server embeds text; send 'texts'",
                                 param=unsupported)
    req = {
        "input": co["texts"], "model": default_model("embedding", co.get("model")),
        "input_type": co.get("input_type"), "truncate": co["truncate"] != "NONE",
        "truncation_direction": "left" if co["truncate"] == "START" else "right",
        "dimensions": co.get("output_dimension"), "max_tokens": co.get("max_tokens"),
        "embedding_types": co.get("embedding_types") or ["float"],
    }
    st = state()
    with renamed({"input": "texts", "dimensions": "output_dimension"}):
        out = service.embed(st.registry, st.settings, req, gone=client_gone())
    tokens = out["usage"]["total_tokens"]
    note(req["model"], len(req["input"]), tokens)
    meta = {"api_version": {"version": version}, "billed_units": {"input_tokens": tokens},
            "tokens": {"input_tokens": tokens}}
    return out, {"id": secrets.token_hex(16), "texts": co["texts"], "meta": meta}


@bp.post("/v2/embed")
def embed_v2() -> Response:
    out, common = _embed(load(_v2, read_json()), "2")
    return json_response({"response_type": "embeddings_by_type", "embeddings": out["embeddings_by_type"],
                          **common})


@bp.post("/v1/embed")
def embed_v1() -> Response:
    co = load(_v1, read_json())
    out, common = _embed(co, "1")
    if co.get("embedding_types"):
        return json_response({"response_type": "embeddings_by_type", "embeddings": out["embeddings_by_type"],
                              **common})
    return json_response({"response_type": "embeddings_floats", "embeddings": out["embeddings_by_type"]["float"],
                          **common})
