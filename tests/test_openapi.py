"""GET /openapi.json: a valid OpenAPI 3 document that covers every route, and that real answers obey."""

from __future__ import annotations

import json
import re

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from embedapi import create_app
from embedapi.api import schemas
from embedapi.api.openapi import OPERATIONS

from .conftest import EMBED, EMBED_ALIAS, RERANK

MODEL_ERRORS = {"400", "404", "413", "429", "500", "503"}


@pytest.fixture(scope="module")
def doc(app):
    resp = app.test_client().get("/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    return resp.json


def conforms(doc: dict, schema_name: str, instance) -> None:
    """Validate `instance` against a component schema of the document (refs resolved inside it)."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    errors = sorted(OAS30Validator(schema).iter_errors(instance), key=str)
    assert not errors, f"{schema_name}: {errors[0]}"


def openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_document_validates_as_openapi_3(doc):
    validate(doc)
    assert doc["openapi"].startswith("3.")


def test_every_route_the_app_serves_is_documented(app, doc):
    rules = [r for r in app.url_map.iter_rules() if r.endpoint != "static"]
    assert len(rules) >= 13
    for rule in rules:
        # Described on purpose (not only listed from a docstring): a new route must get an entry.
        assert rule.endpoint in OPERATIONS, f"{rule.endpoint} ({rule.rule}) has no entry in OPERATIONS"
        path = openapi_path(rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in doc["paths"].get(path, {}), f"{method} {path} is not documented"
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    served = {(openapi_path(r.rule), m.lower()) for r in rules for m in r.methods - {"HEAD", "OPTIONS"}}
    assert documented == served  # nothing documented that is not served
    operation_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))


ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
TEI_ERROR = {"$ref": "#/components/schemas/TeiError"}
# Each model route's error body: the contract's, TEI's on TEI's routes, either where the body decides.
ERROR_BODIES = {"/v1/embeddings": ERROR, "/embeddings": ERROR, "/v2/rerank": ERROR, "/v2/embed": ERROR,
                "/v1/embed": ERROR, "/v1/rerank": {"oneOf": [ERROR, TEI_ERROR]},
                "/rerank": {"oneOf": [ERROR, TEI_ERROR]},
                "/embed": TEI_ERROR, "/tokenize": TEI_ERROR, "/decode": TEI_ERROR, "/": TEI_ERROR}


def test_model_routes_document_their_errors(doc):
    for path, error_body in ERROR_BODIES.items():
        op = doc["paths"][path]["post"]
        assert MODEL_ERRORS <= set(op["responses"]), path
        for status in MODEL_ERRORS:
            body = op["responses"][status]["content"]["application/json"]["schema"]
            assert body == error_body, path
        assert "Retry-After" in op["responses"]["429"]["headers"]
        assert op["requestBody"]["required"] is True
        assert "security" not in op and "401" not in op["responses"]  # no keys configured in this app
    assert "404" in doc["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    assert set(doc["paths"]["/ready"]["get"]["responses"]) == {"200", "503"}
    error = doc["components"]["schemas"]["ErrorDetail"]["properties"]
    assert error["param"]["nullable"] is True and error["code"]["nullable"] is True


def test_request_schemas_are_the_validating_schemas(doc):
    for cls in (schemas.EmbeddingsRequest, schemas.RerankRequest, schemas.RerankV2Request):
        component = doc["components"]["schemas"][cls.__name__]
        declared = cls().fields
        assert set(component["properties"]) == set(declared)
        assert set(component["required"]) == {name for name, f in declared.items() if f.required}
    emb = doc["components"]["schemas"]["EmbeddingsRequest"]["properties"]
    assert emb["encoding_format"]["enum"] == ["float", "base64"]
    # Model names come from the configuration, per kind (the other kind is a 400, an unknown name a 404).
    assert EMBED in emb["model"]["enum"] and EMBED_ALIAS in emb["model"]["enum"] and RERANK not in emb["model"]["enum"]
    for name in ("RerankRequest", "RerankV2Request"):
        assert doc["components"]["schemas"][name]["properties"]["model"]["enum"] == [RERANK]
    assert "retrieval.query" in emb["input_type"]["enum"] and emb["input_type"]["nullable"] is True
    assert emb["dimensions"]["type"] == "integer" and emb["dimensions"]["nullable"] is True
    assert emb["dimensions"]["maximum"] == 2**63 - 1  # a larger JSON integer reaches the schema as a float
    # The custom input field: a text or an array of texts, with this app's limits (conftest: 64 inputs).
    text, array = emb["input"]["oneOf"]
    assert text["type"] == "string" and text["minLength"] == 1
    assert array["type"] == "array" and array["maxItems"] == 64 and array["items"]["type"] == "string"
    docs = doc["components"]["schemas"]["RerankRequest"]["properties"]["documents"]
    assert docs["maxItems"] == 32 and {o["type"] for o in docs["items"]["oneOf"]} == {"string", "object"}


def test_examples_are_valid_and_accepted(client, doc):
    for path in ("/v1/embeddings", "/v1/rerank", "/v2/rerank", "/embed", "/", "/tokenize", "/v2/embed"):
        media = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        ref = media["schema"].get("$ref") or media["schema"]["oneOf"][0]["$ref"]  # /v1/rerank: or TEI's body
        conforms(doc, ref.rsplit("/", 1)[1], media["example"])
        resp = client.post(path, json=media["example"])
        assert resp.status_code == 200, resp.json


def test_real_answers_conform_to_the_documented_responses(client, doc):
    def check(method: str, path: str, schema: str, status: int = 200, **kwargs) -> dict:
        resp = client.open(path, method=method, **kwargs)
        assert resp.status_code == status, resp.json
        assert str(status) in doc["paths"][openapi_path(path) if "<" in path else path][method.lower()]["responses"]
        conforms(doc, schema, resp.json)
        return resp.json

    for fmt in ("float", "base64"):
        check("POST", "/v1/embeddings", "EmbeddingsResponse",
              json={"model": EMBED, "input": ["一つ", "二つ"], "encoding_format": fmt})
    check("POST", "/v1/rerank", "RerankResponse",
          json={"model": RERANK, "query": "温泉", "documents": ["蔵王温泉", {"text": "名古屋"}], "return_documents": True})
    check("POST", "/v2/rerank", "RerankV2Response", json={"model": RERANK, "query": "温泉", "documents": ["a", "b"]})
    listing = check("GET", "/v1/models", "ModelList")
    assert {m["kind"] for m in listing["data"]} == {"embedding", "rerank"}
    check("GET", "/health", "Health")
    check("GET", "/ready", "Ready")
    check("POST", "/v1/embeddings", "ErrorResponse", 400, json={"model": EMBED, "input": ""})
    check("POST", "/v1/embeddings", "ErrorResponse", 404, json={"model": "no-such-model", "input": "x"})
    resp = client.get(f"/v1/models/{EMBED}")
    assert resp.status_code == 200
    conforms(doc, "ModelInfo", resp.json)


def test_unloaded_models_and_keys(models_file):
    app = create_app({"models_file": str(models_file), "load_models": "off", "api_keys": "k1"})
    client = app.test_client()
    resp = client.get("/openapi.json")  # open, like /health: it is documentation
    assert resp.status_code == 200
    doc = resp.json
    validate(doc)
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "a key from EMBEDAPI_API_KEYS(_FILE)"}
    for path, method in (("/v1/embeddings", "post"), ("/v2/rerank", "post"), ("/v1/models", "get")):
        op = doc["paths"][path][method]
        assert op["security"] == [{"bearerAuth": []}] and "401" in op["responses"]
    for path in ("/health", "/ready", "/metrics", "/openapi.json", "/docs"):
        assert "security" not in doc["paths"][path]["get"]
        assert client.get(path).status_code in (200, 503)  # open: no key needed
    # The open document does not name the models that /v1/models shows only with a key.
    assert EMBED not in json.dumps(doc) and RERANK not in json.dumps(doc)
    # Before loading: nullable fields are null, and the answers still conform.
    resp = client.get("/v1/models", headers={"Authorization": "Bearer k1"})
    conforms(doc, "ModelList", resp.json)
    assert all(m["dimensions"] is None and m["device"] is None for m in resp.json["data"])
    resp = client.get("/ready")
    assert resp.status_code == 503
    conforms(doc, "Ready", resp.json)
    conforms(doc, "ErrorResponse", client.post("/v1/embeddings", json={"model": EMBED, "input": "x"}).json)


def test_docs_page(client):
    resp = client.get("/docs")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    assert 'url: "openapi.json"' in html and "https://" not in html  # tests/test_docs_browser.py renders it
    for asset in re.findall(r'(?:src|href)="(docs/assets/[^"]+)"', html):  # served from the installed wheel
        assert client.get("/" + asset).status_code == 200, asset


def test_dialect_answers_conform_to_their_documented_responses(client, doc):
    """TEI's bare arrays and Cohere's objects, and TEI-shaped errors, against each operation's own schema."""
    def check(method: str, path: str, status: int = 200, **kwargs) -> None:
        resp = client.open(path, method=method, **kwargs)
        assert resp.status_code == status, resp.json
        schema = doc["paths"][path][method.lower()]["responses"][str(status)]["content"]["application/json"]["schema"]
        errors = list(OAS30Validator({**schema, "components": doc["components"]}).iter_errors(resp.json))
        assert not errors, f"{method} {path} {status}: {errors[0]}"

    check("POST", "/embed", json={"inputs": ["一つ", "二つ"], "prompt_name": "query"})
    check("POST", "/", json={"inputs": "一つ"})
    check("POST", "/", json={"query": "温泉", "texts": ["蔵王温泉", "名古屋"]})
    check("POST", "/rerank", json={"query": "温泉", "texts": ["蔵王温泉", "名古屋"], "return_text": True})
    check("POST", "/tokenize", json={"inputs": "蔵王温泉", "prompt_name": "document"})
    check("POST", "/decode", json={"ids": [[5, 6], [7]]})
    check("GET", "/info")
    check("GET", "/info", query_string={"model": RERANK})
    check("POST", "/v2/embed", json={"model": EMBED, "texts": ["一つ"], "input_type": "search_query",
                                     "embedding_types": ["float", "int8", "uint8", "binary", "ubinary", "base64"]})
    check("POST", "/v1/embed", json={"model": EMBED, "texts": ["一つ"]})
    check("POST", "/v1/embed", json={"model": EMBED, "texts": ["一つ"], "embedding_types": ["int8"]})
    check("POST", "/embed", 400, json={"inputs": ""})
    check("POST", "/embed", 404, json={"inputs": "a", "model": "no-such-model"})
    check("POST", "/rerank", 400, json={"query": "温泉", "texts": []})
    check("POST", "/v2/embed", 400, json={"model": EMBED, "texts": ["a"]})
