"""POST /v1/rerank, /rerank (Jina / Cohere v1 + the seed's fields) and /v2/rerank (Cohere v2).

Both v1 paths also take TEI's body (`texts` instead of `documents`) and then answers as TEI (api/tei.py).
"""

from __future__ import annotations

from flask import Blueprint, Response

from .. import service
from . import tei
from .common import client_gone, json_response, load, note, read_json, require_api_key, state
from .schemas import RerankRequest, RerankV2Request

bp = Blueprint("rerank", __name__)
bp.before_request(require_api_key)
_v1 = RerankRequest()
_v2 = RerankV2Request()


@bp.post("/v1/rerank")
@bp.post("/rerank")
def rerank_v1() -> Response:
    body = read_json()
    if "texts" in body and "documents" not in body:
        return tei.rerank_body(body)  # TEI's body (query, texts): TEI's bare array answer
    req = load(_v1, body)
    return json_response(_rerank(req))


@bp.post("/v2/rerank")
def rerank_v2() -> Response:
    req = load(_v2, read_json())
    out = _rerank(req)
    return json_response({
        "id": out["id"],
        "results": out["results"],
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                 "tokens": {"input_tokens": out["usage"]["total_tokens"], "output_tokens": 0}},
    })


def _rerank(req: dict) -> dict:
    st = state()
    out = service.rerank(st.registry, st.settings, req, gone=client_gone())
    note(req["model"], len(req["documents"]), out["usage"]["total_tokens"])
    return out
