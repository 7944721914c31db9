"""text-embeddings-inference's routes: POST /embed, /rerank (TEI body), /tokenize, /decode, GET /info, POST /.

What Haystack's and LlamaIndex's TEI integrations, huggingface_hub's InferenceClient and TEI scripts
send. Each body is translated into the request dict of `service.embed` / `service.rerank` (one
service path with the OpenAI route); answers are TEI's bare arrays, errors TEI's
`{"error": "...", "error_type": "..."}` (marked in request.environ, read by handlers.render).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from .. import __version__, service
from ..errors import InvalidRequest
from .common import DIALECT, client_gone, json_response, load, note, read_json, renamed, require_api_key, state
from .dialect_schemas import TeiDecodeRequest, TeiEmbedRequest, TeiRerankRequest, TeiTokenizeRequest

bp = Blueprint("tei", __name__)


@bp.before_request
def _tei() -> None:
    request.environ[DIALECT] = "tei"
    require_api_key()


_embed = TeiEmbedRequest()
_rerank = TeiRerankRequest()
_tokenize = TeiTokenizeRequest()
_decode = TeiDecodeRequest()


def default_model(kind: str, name: str | None) -> str:
    """The `model` a dialect request names, else the first configured model of `kind`."""
    if name:
        return name
    for entry in state().registry.entries.values():
        if entry.spec.kind == kind:
            return entry.spec.id
    raise InvalidRequest(f"this server has no {kind} model configured", param="model")


def _embed_request(req: dict[str, Any]) -> dict[str, Any]:
    return {
        "input": req["inputs"], "model": default_model("embedding", req.get("model")),
        "input_type": req.get("prompt_name"), "normalize": req.get("normalize"),
        "truncate": True if req.get("truncate") is None else req["truncate"],
        "truncation_direction": req["truncation_direction"].lower(), "dimensions": req.get("dimensions"),
    }


def embed_body(body: dict[str, Any]) -> Response:
    req = _embed_request(load(_embed, body))
    st = state()
    with renamed({"input": "inputs"}):
        out = service.embed(st.registry, st.settings, req, gone=client_gone())
    note(req["model"], len(req["input"]), out["usage"]["total_tokens"])
    return json_response([d["embedding"] for d in out["data"]])


def rerank_body(body: dict[str, Any]) -> Response:
    """TEI's rerank: `{query, texts}` → `[{index, score, text?}]`, every text, best first."""
    request.environ[DIALECT] = "tei"
    tei = load(_rerank, body)
    req = {"query": tei["query"], "documents": tei["texts"], "model": default_model("rerank", tei.get("model")),
           "raw_scores": tei["raw_scores"], "truncate": tei.get("truncate"),
           "truncation_direction": tei["truncation_direction"].lower()}
    st = state()
    with renamed({"documents": "texts"}):
        out = service.rerank(st.registry, st.settings, req, gone=client_gone())
    note(req["model"], len(req["documents"]), out["usage"]["total_tokens"])
    ranks = []
    for r in out["results"]:
        item: dict[str, Any] = {"index": r["index"], "score": r["relevance_score"]}
        if tei["return_text"]:
            item["text"] = tei["texts"][r["index"]]
        ranks.append(item)
    return json_response(ranks)


@bp.post("/embed")
def embed() -> Response:
    return embed_body(read_json())


@bp.post("/tokenize")
def tokenize() -> Response:
    tei = load(_tokenize, read_json())
    req = {"input": tei["inputs"], "model": default_model("embedding", tei.get("model")),
           "input_type": tei.get("prompt_name"), "add_special_tokens": tei["add_special_tokens"]}
    st = state()
    with renamed({"input": "inputs"}):
        out = service.tokenize(st.registry, st.settings, req, gone=client_gone())
    note(req["model"], len(req["input"]), out["usage"])
    return json_response(out["tokens"])


@bp.post("/decode")
def decode() -> Response:
    tei = load(_decode, read_json())
    req = {**tei, "model": default_model("embedding", tei.get("model"))}
    st = state()
    return json_response(service.decode(st.registry, st.settings, req, gone=client_gone()))


@bp.get("/info")
def info() -> Response:
    """TEI's /info for one model (`?model=`; default the first embedding model)."""
    st = state()
    registry, settings = st.registry, st.settings
    name = request.args.get("model") or default_model("embedding", None)
    entry = registry.entry(name)
    spec, loaded = entry.spec, registry.models.get(entry.spec.id)
    model_type: dict[str, Any] = ({"embedding": {}} if spec.kind == "embedding"
                                  else {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}})
    return json_response({
        "model_id": spec.id, "model_sha": spec.revision, "model_dtype": loaded.dtype if loaded else None,
        "model_type": model_type,
        "max_input_length": loaded.encoder.max_seq_length if loaded else spec.max_seq_length,
        "max_batch_tokens": getattr(loaded.engine, "max_batch_tokens", None) if loaded else None,
        "max_queue_tokens": settings.max_queue_tokens,
        "max_batch_requests": settings.max_batch_size,
        "max_client_batch_size": settings.max_inputs if spec.kind == "embedding" else settings.max_documents,
        "auto_truncate": True, "tokenization_workers": 1,
        "version": __version__, "sha": None, "docker_label": None,
        "served_model_name": spec.id, "kind": spec.kind, "ready": loaded is not None,
    })


@bp.post("/")
def root() -> Response:
    """TEI answers POST / by its model's type; here by the body: `inputs` embeds (what InferenceClient's
    feature_extraction and Haystack's TEI embedders post to a bare URL), `query` + `texts` reranks."""
    body = read_json()
    if "texts" in body or "query" in body:
        return rerank_body(body)
    if "inputs" in body:
        return embed_body(body)
    raise InvalidRequest("POST / takes TEI's embed body {\"inputs\": ...} or its rerank body "
                         "{\"query\": ..., \"texts\": [...]}; see /openapi.json", param=None)
