"""GET /openapi.json (OpenAPI 3.0, generated from the marshmallow schemas) and GET /docs (Swagger UI, served here).

The request schemas in `schemas.py` are what validates requests, so the document cannot drift from
them: apispec's MarshmallowPlugin converts them, and this module adds only what a schema cannot say
(the two custom fields' JSON shapes, this server's configured limits, the routes and their status
codes). Every rule in the app's url_map is documented; `OPERATIONS` describes each endpoint.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.resources
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, Response, current_app
from marshmallow import Schema, fields

from .. import __version__
from ..config import Settings
from . import dialect_schemas, schemas
from .common import json_response

log = logging.getLogger(__name__)

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.0.3"


# -- response schemas not in schemas.py (documentation only; the routes build plain dicts) ----------
class ModelInfo(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True, metadata={"example": "model"})
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True)
    kind = fields.String(required=True, metadata={"enum": ["embedding", "rerank"]})
    dimensions = fields.Integer(required=True, allow_none=True,
                                metadata={"description": "embedding size; null for rerank models and until loaded"})
    matryoshka_dimensions = fields.List(fields.Integer(), required=True,
                                        metadata={"description": "smaller `dimensions` values this model accepts"})
    max_tokens = fields.Integer(required=True, allow_none=True,
                                metadata={"description": "max_seq_length: longer inputs are cut (or 400 with truncate=false)"})
    prompt_preset = fields.String(required=True, allow_none=True,
                                  metadata={"description": "ruri-v3, ruri-v1, e5, none or custom; null for rerank"})
    prompts = fields.Dict(keys=fields.String(), values=fields.String(), required=True, allow_none=True,
                          metadata={"description": "input_type -> prefix; null for rerank"})
    aliases = fields.List(fields.String(), required=True)
    ready = fields.Boolean(required=True, metadata={"description": "loaded and warmed in the worker that answered"})
    device = fields.String(required=True, allow_none=True, metadata={"description": "this worker's device"})
    dtype = fields.String(required=True, allow_none=True, metadata={"description": "this worker's dtype"})
    backend = fields.String(required=True, allow_none=True,
                            metadata={"enum": ["torch", "openvino", None],
                                      "description": "what runs this worker's forward pass; null until loaded"})
    attention = fields.String(required=True, allow_none=True,
                              metadata={"description": "attention implementation in use: sdpa, flash_attention_2, "
                                                       "eager; null until loaded"})


class ModelList(Schema):
    object = fields.String(required=True, metadata={"example": "list"})
    data = fields.List(fields.Nested(ModelInfo), required=True)


class RerankV2Result(Schema):
    index = fields.Integer(required=True)
    relevance_score = fields.Float(required=True)
    document = fields.Nested(schemas.RerankDocumentOut, metadata={"description": "only with return_documents"})


class ApiVersion(Schema):
    version = fields.String()


class BilledUnits(Schema):
    search_units = fields.Integer()


class V2Tokens(Schema):
    input_tokens = fields.Integer()
    output_tokens = fields.Integer()


class RerankV2Meta(Schema):
    api_version = fields.Nested(ApiVersion)
    billed_units = fields.Nested(BilledUnits)
    tokens = fields.Nested(V2Tokens)


class RerankV2Response(Schema):
    id = fields.String(required=True)
    results = fields.List(fields.Nested(RerankV2Result), required=True)
    meta = fields.Nested(RerankV2Meta, required=True)


class Health(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok", "failed"]})
    pid = fields.Integer(required=True)
    error = fields.String(metadata={"description": "only when model loading failed"})


class Ready(Schema):
    status = fields.String(required=True, metadata={"description": "ready, or idle / loading / failed"})
    pid = fields.Integer(required=True)
    models = fields.Dict(keys=fields.String(), values=fields.Boolean(), required=True,
                         metadata={"description": "model id -> loaded in this worker"})


# -- operations -----------------------------------------------------------------------------------
ERRORS: dict[int, str] = {
    400: "Invalid request (`invalid_request_error`; `param` names the field)",
    401: "Missing or wrong API key (`invalid_api_key`); only when keys are configured",
    404: "Unknown model (`model_not_found`)",
    413: "Body larger than EMBEDAPI_MAX_BODY_BYTES (`request_too_large`)",
    429: "The worker's queue is full (`rate_limit_error` / `queue_full`); retry after `Retry-After` seconds",
    500: "Unexpected error (`server_error`); the log has the trace under the request id",
    503: "Models not loaded yet in this worker (`model_not_ready`) or no answer in time (`timeout`)",
}
_RETRY = {429, 503}
_MODEL_ERRORS = (400, 401, 404, 413, 429, 500, 503)


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    ok: str | None = None  # response schema name; None: see `content`
    content: dict[str, Any] = field(default_factory=dict)  # media type -> schema, for non-JSON bodies
    request: str | None = None
    errors: tuple[int, ...] = ()
    auth: bool = False
    description: str = ""
    also: dict[int, str] = field(default_factory=dict)  # other statuses answered with the `ok` schema
    # Dialects: other request bodies the route also takes (oneOf with `request`), other answers (oneOf with
    # `ok`, as schemas), and the error body shapes (TEI's routes answer TEI's).
    other_requests: tuple[str, ...] = ()
    other_ok: tuple[dict[str, Any], ...] = ()
    error_schemas: tuple[str, ...] = ("ErrorResponse",)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_TEI_ERRORS = ("TeiError",)
_TEI_VECTORS = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
_TEI_RANKS = {"type": "array", "items": {"$ref": "#/components/schemas/TeiRank"}}

OPERATIONS: dict[str, Operation] = {
    "embeddings.create_embeddings": Operation(
        "Create embeddings (OpenAI)", "embeddings", "EmbeddingsResponse", request="EmbeddingsRequest",
        errors=_MODEL_ERRORS, auth=True,
        description="OpenAI embeddings plus Ruri's prefixes (`input_type`, `instruction`, `apply_ruri_prefix`). "
                    "`data` is in input order; `usage` counts the tokens fed to the model. "
                    "`/embeddings` is the same route without `/v1` (for base URLs that lack it)."),
    "rerank.rerank_v1": Operation(
        "Rerank documents (Jina / Cohere v1, or TEI's body)", "rerank", "RerankResponse", request="RerankRequest",
        other_requests=("TeiRerankRequest",), other_ok=(_TEI_RANKS,), errors=_MODEL_ERRORS, auth=True,
        error_schemas=("ErrorResponse", "TeiError"),
        description="Scores (query, document) pairs; results sorted by score descending, ties by lower index. "
                    "A body with `texts` (and no `documents`) is text-embeddings-inference's: the answer is then "
                    "TEI's bare array `[{index, score, text?}]` and errors TEI's `{error, error_type}`. "
                    "`/rerank` is the same route without `/v1`."),
    "rerank.rerank_v2": Operation(
        "Rerank documents (Cohere v2)", "rerank", "RerankV2Response", request="RerankV2Request",
        errors=_MODEL_ERRORS, auth=True),
    "tei.embed": Operation(
        "Embed (text-embeddings-inference)", "tei", content={"application/json": _TEI_VECTORS},
        request="TeiEmbedRequest",
        errors=_MODEL_ERRORS, auth=True, error_schemas=_TEI_ERRORS,
        description="TEI's /embed: a bare array of vectors in input order. `prompt_name` is an input_type (query, "
                    "document, ...) and picks the model's prefix; without `model`, the first configured embedding "
                    "model. Errors are TEI's `{error, error_type}`."),
    "tei.tokenize": Operation(
        "Tokenize as the model is fed (TEI)", "tei", request="TeiTokenizeRequest", errors=_MODEL_ERRORS, auth=True,
        content={"application/json": {"type": "array", "items": {"type": "array", "items": _ref("TeiToken")}}},
        error_schemas=_TEI_ERRORS,
        description="The tokens /embed feeds for the same text and prompt_name (prefix and truncation included); "
                    "their count equals /v1/embeddings' usage. start/stop are byte offsets into the prefixed text."),
    "tei.decode": Operation(
        "Decode token ids (TEI)", "tei", request="TeiDecodeRequest", errors=_MODEL_ERRORS, auth=True,
        content={"application/json": {"type": "array", "items": {"type": "string"}}}, error_schemas=_TEI_ERRORS),
    "tei.info": Operation(
        "Model info (TEI)", "tei", "TeiInfo", errors=(401, 404, 500), auth=True, error_schemas=_TEI_ERRORS,
        description="`?model=` names a configured model; default the first embedding model."),
    "tei.root": Operation(
        "TEI's POST / : embed or rerank, by the body", "tei", request="TeiEmbedRequest",
        content={"application/json": {"oneOf": [_TEI_VECTORS, _TEI_RANKS]}},
        other_requests=("TeiRerankRequest",), errors=_MODEL_ERRORS, auth=True, error_schemas=_TEI_ERRORS,
        description="`inputs` embeds (what InferenceClient.feature_extraction and Haystack's TEI embedders post "
                    "to a bare URL), `query` + `texts` reranks; the answers are /embed's and /rerank's."),
    "cohere.embed_v2": Operation(
        "Embed (Cohere v2)", "cohere", "CohereEmbedByTypeResponse", request="CohereEmbedV2Request",
        errors=_MODEL_ERRORS, auth=True,
        description="Cohere's input_type (search_query, search_document, classification, clustering) picks "
                    "Ruri's prefix; embedding_types float, int8 and uint8 (= int8 + 128; one fixed per-model "
                    "calibration step, so codes are proportional to the floats), binary and ubinary (packed sign "
                    "bits), base64 (float32 little-endian); truncate NONE/START/END. docs/dialects.md has more."),
    "cohere.embed_v1": Operation(
        "Embed (Cohere v1)", "cohere", "CohereEmbedFloatsResponse", request="CohereEmbedV1Request",
        other_ok=(_ref("CohereEmbedByTypeResponse"),), errors=_MODEL_ERRORS, auth=True,
        description="Without embedding_types: `embeddings_floats`; with them: `embeddings_by_type` as /v2/embed."),
    "models.list_models": Operation(
        "List the configured models", "models", "ModelList", errors=(401, 500), auth=True,
        description="Kind, dimensions, max tokens, prompt preset, aliases, and the answering worker's device "
                    "and dtype. `/models` is the same route without `/v1`."),
    "models.get_model": Operation(
        "Describe one model (by id or alias)", "models", "ModelInfo", errors=(401, 404, 500), auth=True,
        description="`model_id` may contain slashes (`cl-nagoya/ruri-v3-310m`): send them unencoded."),
    "health.health": Operation(
        "Liveness: the process answers (no model work)", "operations", "Health", also={503: "model loading failed"}),
    "health.ready": Operation(
        "Readiness: 200 once this worker has loaded and warmed every model", "operations", "Ready",
        also={503: "not (yet) ready in this worker"}),
    "metrics.scrape": Operation(
        "Prometheus metrics, summed over all Gunicorn workers", "operations",
        content={"text/plain": {"type": "string"}}),
    "openapi.openapi_json": Operation("This document", "operations", content={"application/json": {"type": "object"}}),
    "openapi.docs": Operation("This document rendered for people (Swagger UI, served from this host)", "operations",
                              content={"text/html": {"type": "string"}}),
}

_DOC_SCHEMAS: tuple[type[Schema], ...] = (
    schemas.EmbeddingsRequest, schemas.RerankRequest, schemas.RerankV2Request, schemas.EmbeddingsResponse,
    schemas.RerankResponse, RerankV2Response, ModelInfo, ModelList, Health, Ready, schemas.ErrorResponse,
    dialect_schemas.TeiEmbedRequest, dialect_schemas.TeiRerankRequest, dialect_schemas.TeiTokenizeRequest,
    dialect_schemas.TeiDecodeRequest, dialect_schemas.TeiError, dialect_schemas.TeiRank, dialect_schemas.TeiToken,
    dialect_schemas.TeiInfo, dialect_schemas.CohereEmbedV1Request, dialect_schemas.CohereEmbedV2Request,
    dialect_schemas.CohereEmbedByTypeResponse, dialect_schemas.CohereEmbedFloatsResponse,
)


# -- the two custom fields ---------------------------------------------------------------------------
def _custom_fields(self: Any, field_obj: fields.Field, **kwargs: Any) -> dict[str, Any]:
    """JSON shapes of the fields that validate themselves (apispec would render them as `{}`)."""
    if isinstance(field_obj, schemas.EmbeddingInput):
        text = {"type": "string", "minLength": 1}
        return {"oneOf": [text, {"type": "array", "minItems": 1, "items": text}],
                "description": "a text, or an array of texts (arrays of token ids are refused with a 400 that "
                               "explains why)"}
    if isinstance(field_obj, dialect_schemas.Texts):
        text = {"type": "string", "minLength": 1}
        array = {"type": "array", "minItems": 1, "items": text}
        return {"oneOf": [text, array]} if field_obj.allow_string else array
    if isinstance(field_obj, dialect_schemas.TokenIds):
        ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
        return {"oneOf": [ids, {"type": "array", "minItems": 1, "items": ids}]}
    if isinstance(field_obj, schemas.RerankDocument):
        return {"oneOf": [{"type": "string"},
                          {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}]}
    return {}


def _apply_settings(components: dict[str, Any], settings: Settings) -> None:
    """What this server's configuration decides: the model names each route takes (another name is a
    404, a model of the other kind a 400) and the limits (EMBEDAPI_MAX_*) the service enforces with a 400."""
    for name, kind in (("EmbeddingsRequest", "embedding"), ("RerankRequest", "rerank"), ("RerankV2Request", "rerank")):
        names = [n for m in settings.models if m.kind == kind for n in (m.id, *m.aliases)]
        model = components[name]["properties"]["model"]
        model["description"] = f"a configured {kind} model id or alias (GET /v1/models lists them)"
        if names and not settings.api_keys:  # the document is open: with keys, model names stay behind auth
            model["enum"] = names
    components["EmbeddingsRequest"]["properties"]["dimensions"]["description"] = (
        "the model's full dimension, or one of its matryoshka_dimensions (GET /v1/models); otherwise 400")
    components["EmbeddingsRequest"]["properties"]["truncate"]["description"] = (
        "false: an input longer than the model's max_tokens is a 400 instead of being cut")
    for name in ("EmbeddingsRequest", "RerankRequest", "RerankV2Request", "TeiEmbedRequest", "TeiRerankRequest",
                 "TeiTokenizeRequest", "CohereEmbedV1Request", "CohereEmbedV2Request"):
        for prop in components[name]["properties"].values():
            if prop.get("type") == "integer":  # orjson reads larger integers as floats, which are refused
                prop.setdefault("format", "int64")
                prop.setdefault("maximum", 2**63 - 1)
    chars = settings.max_text_chars
    emb = components["EmbeddingsRequest"]["properties"]["input"]
    emb["oneOf"][0]["maxLength"] = chars
    emb["oneOf"][1]["maxItems"] = settings.max_inputs
    emb["oneOf"][1]["items"] = {**emb["oneOf"][1]["items"], "maxLength": chars}
    for name in ("RerankRequest", "RerankV2Request"):
        props = components[name]["properties"]
        props["query"]["maxLength"] = chars
        props["documents"]["maxItems"] = settings.max_documents
        for option in props["documents"]["items"]["oneOf"]:
            target = option if option["type"] == "string" else option["properties"]["text"]
            target["maxLength"] = chars


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def _one_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"oneOf": schemas}


def _error_response(status: int, error_schemas: tuple[str, ...] = ("ErrorResponse",)) -> dict[str, Any]:
    out: dict[str, Any] = {"description": ERRORS[status],
                           "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
                           "content": {"application/json": {"schema": _one_of([_ref(n) for n in error_schemas])}}}
    if status in _RETRY:
        out["headers"]["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    return out


def _example(settings: Settings, op: Operation) -> dict[str, Any] | None:
    if settings.api_keys:  # /openapi.json needs no key, /v1/models does: do not name the models here
        return None
    embed = next((m.id for m in settings.models if m.kind == "embedding"), None)
    rerank = next((m.id for m in settings.models if m.kind == "rerank"), None)
    if op.request == "EmbeddingsRequest" and embed:
        return {"model": embed, "input": ["名古屋大学で開発された日本語の埋め込みモデルです。"], "input_type": "document"}
    if op.request in ("RerankRequest", "RerankV2Request") and rerank:
        return {"model": rerank, "query": "蔵王温泉の泉質は？",
                "documents": ["蔵王温泉は強酸性の硫黄泉です。", "名古屋は愛知県にあります。"], "top_n": 1}
    if op.request == "TeiEmbedRequest" and embed:  # no model: the first embedding model
        return {"inputs": ["名古屋大学で開発された日本語の埋め込みモデルです。"], "prompt_name": "document"}
    if op.request == "TeiTokenizeRequest" and embed:
        return {"inputs": "蔵王温泉の泉質は？", "prompt_name": "query"}
    if op.request == "CohereEmbedV2Request" and embed:
        return {"model": embed, "texts": ["蔵王温泉の泉質は？"], "input_type": "search_query",
                "embedding_types": ["float", "int8"]}
    return None


def _operation(endpoint: str, path: str, method: str, op: Operation, settings: Settings,
               alias_of: str | None) -> dict[str, Any]:
    request_id = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if op.ok:
        ok_content: dict[str, Any] = {"application/json": {"schema": _one_of([_ref(op.ok), *op.other_ok])}}
    else:
        ok_content = {media: {"schema": schema} for media, schema in op.content.items()}
    responses: dict[str, Any] = {"200": {"description": "OK", "headers": request_id, "content": ok_content}}
    for status, why in op.also.items():
        responses[str(status)] = {"description": why, "headers": request_id, "content": ok_content}
    for status in op.errors:
        if status == 401 and not settings.api_keys:
            continue  # no key is configured: a 401 cannot happen
        responses[str(status)] = _error_response(status, op.error_schemas)
    out: dict[str, Any] = {
        "operationId": endpoint.replace(".", "_") + ("" if alias_of is None else "_" + re.sub(r"\W+", "_", path).strip("_")),
        "summary": op.summary, "tags": [op.tag],
        "parameters": ["X-Request-ID"],
        "responses": responses,
    }
    description = op.description + (f" Same as `{alias_of}`." if alias_of else "")
    if description:
        out["description"] = description.strip()
    if "{model_id}" in path:
        out["parameters"].append({"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"},
                                  "description": "a configured model id or alias"})
    if op.request:
        media: dict[str, Any] = {"schema": _one_of([_ref(n) for n in (op.request, *op.other_requests)])}
        example = _example(settings, op)
        if example:
            media["example"] = example
        out["requestBody"] = {"required": True, "content": {"application/json": media}}
    if op.auth and settings.api_keys:
        out["security"] = [{"bearerAuth": []}]
    return out


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI document of `app`: every url_map rule (but `static`), every method but HEAD/OPTIONS."""
    settings: Settings = app.extensions["embedapi"].settings
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="embedapi", version=__version__, openapi_version=OPENAPI_VERSION, plugins=[plugin],
        info={"description": "OpenAI-compatible Japanese embeddings and rerank (Ruri v3). Every error is "
                             "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`."},
    )
    plugin.converter.add_attribute_function(_custom_fields)
    for schema in _DOC_SCHEMAS:
        spec.components.schema(schema.__name__, schema=schema)
    spec.components.header("X-Request-ID", {"description": "the client's X-Request-ID, or a generated one; "
                                                           "also in the access log", "schema": {"type": "string"}})
    spec.components.header("Retry-After", {"description": "seconds to wait before retrying",
                                           "schema": {"type": "string"}})
    spec.components.parameter("X-Request-ID", "header", {
        "required": False, "schema": {"type": "string"},
        "description": "your request id (its first 128 characters), echoed in the response and logged; "
                       "generated when absent or not printable"})
    if settings.api_keys:
        spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer",
                                                       "description": "a key from EMBEDAPI_API_KEYS(_FILE)"})

    by_endpoint: dict[str, list] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static":
            by_endpoint.setdefault(rule.endpoint, []).append(rule)
    paths: dict[str, dict[str, Any]] = {}
    for endpoint, rules in by_endpoint.items():
        op = OPERATIONS.get(endpoint)
        if op is None:  # a route nobody described: still listed, from its docstring
            log.warning("route %s has no OpenAPI description in embedapi/api/openapi.py", endpoint)
            doc = (app.view_functions[endpoint].__doc__ or endpoint).strip().splitlines()[0]
            op = Operation(doc, "other", content={"application/json": {}}, errors=(400, 500))
        # The first rule registered is the canonical path; decorators apply bottom-up, so prefer /v1.
        rules = sorted(rules, key=lambda r: (not r.rule.startswith("/v"), r.rule))
        canonical = _openapi_path(rules[0].rule)
        for rule in rules:
            path = _openapi_path(rule.rule)
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                paths.setdefault(path, {})[method.lower()] = _operation(
                    endpoint, path, method, op, settings, None if path == canonical else canonical)
    for path in sorted(paths):
        spec.path(path=path, operations=paths[path])
    doc = spec.to_dict()
    _apply_settings(doc["components"]["schemas"], settings)
    return doc


def spec_for(app: Flask) -> dict[str, Any]:
    """Built once per app (routes and settings do not change while it runs)."""
    cached = app.extensions.get("embedapi.openapi")
    if cached is None:
        cached = app.extensions["embedapi.openapi"] = build_spec(app)
    return copy.deepcopy(cached)


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return json_response(spec_for(current_app._get_current_object()))


# /docs: Swagger UI from the flask-swagger-ui wheel's dist folder, served by this app (create_app makes it the
# app's static folder under DOCS_ASSETS_URL), so the page works on hosts with no internet. The page is ours,
# not the package's template: that one leaves Swagger UI's online validator badge on, an image from
# validator.swagger.io. The Content-Security-Policy lets the browser load nothing from another origin.
SWAGGER_UI_DIR = str(importlib.resources.files("flask_swagger_ui") / "dist")
DOCS_ASSETS_URL = "/docs/assets"

# The model routes first, the probes and documents last (the document lists paths alphabetically).
_DOCS_SCRIPT = """window.onload = function () {
  var rank = function (tag) {
    var i = ["embeddings", "rerank", "models"].indexOf(tag);
    return i >= 0 ? i : (tag === "operations" ? 99 : 50);
  };
  window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", layout: "BaseLayout",
                               deepLinking: true, validatorUrl: null,
                               tagsSorter: function (a, b) { return rank(a) - rank(b) || a.localeCompare(b); }});
};"""
_DOCS_HTML = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>embedapi API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png"></head>
<body><noscript>The machine-readable document is at <a href="openapi.json">openapi.json</a>.</noscript>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script>{_DOCS_SCRIPT}</script>
</body></html>
"""
_DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
             "script-src 'self' 'sha256-" + base64.b64encode(hashlib.sha256(_DOCS_SCRIPT.encode()).digest()).decode()
             + "'; frame-ancestors 'self'")


@bp.get("/docs")
def docs() -> Response:
    response = Response(_DOCS_HTML, mimetype="text/html")
    response.headers["Content-Security-Policy"] = _DOCS_CSP
    return response
