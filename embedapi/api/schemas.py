"""Marshmallow request schemas (validation and the OpenAPI source) and response schemas (docs only).

Responses are built as plain dicts: `dump` over thousands of floats would be slow.
"""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from ..prompts import INPUT_TYPE_ALIASES

TOKEN_IDS_MESSAGE = (
    "input holds token ids, but this server takes text: ids from another tokenizer (tiktoken) mean nothing "
    "to this model. Send strings instead. LangChain's OpenAIEmbeddings sends ids by default: create it with "
    "check_embedding_ctx_length=False."
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_strings(texts: list[Any], name: str, rule: str) -> None:
    """Each item of a text array is a non-empty string; else a ValidationError naming `name[i]` (and `rule`)."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValidationError(f"{name}[{i}] must be a string, not {type(text).__name__}")
        if not text:
            raise ValidationError(f"{name}[{i}] is an empty string; {rule}")


class EmbeddingInput(fields.Field):
    """A string or an array of strings; token-id arrays are refused with an explanation."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, list):
            if not value:
                raise ValidationError("input must not be an empty array")
            if _is_int(value[0]) or (isinstance(value[0], list) and all(_is_int(v) for v in value[0])):
                raise ValidationError(TOKEN_IDS_MESSAGE)
            texts = value
        else:
            raise ValidationError("input must be a string or an array of strings")
        check_strings(texts, "input", "every input must contain text")
        return texts


class RerankDocument(fields.Field):
    """A document as a string or as `{"text": ...}` (Jina, Cohere v1)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, dict):
            value = value.get("text")
        if not isinstance(value, str):
            raise ValidationError('each document must be a string or an object {"text": "..."}')
        return value


class StrictBoolean(fields.Boolean):
    """A JSON boolean and nothing else: "yes" or 1 is a client bug worth a 400, not a guess."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


def _positive_int(**kwargs: Any) -> fields.Integer:
    return fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=1), **kwargs)


class _Request(Schema):
    class Meta:
        unknown = EXCLUDE  # OpenAI clients send extras


class EmbeddingsRequest(_Request):
    input = EmbeddingInput(required=True, metadata={"description": "text or array of texts (1..max_inputs)"})
    model = fields.String(required=True, validate=validate.Length(min=1))
    encoding_format = fields.String(load_default="float", validate=validate.OneOf(["float", "base64"]))
    dimensions = _positive_int()
    user = fields.Raw(allow_none=True, metadata={"description": "accepted and ignored"})
    input_type = fields.String(allow_none=True, validate=validate.OneOf(list(INPUT_TYPE_ALIASES)))
    instruction = fields.String(allow_none=True)
    apply_ruri_prefix = StrictBoolean(load_default=False)
    normalize = StrictBoolean(allow_none=True, load_default=None)
    truncate = StrictBoolean(load_default=True)


class RerankV2Request(_Request):
    """Cohere v2 rerank; the v1 request adds the seed's and Jina's fields to it."""

    query = fields.String(required=True, validate=validate.Length(min=1, error="query must not be empty"))
    documents = fields.List(RerankDocument(), required=True,
                            validate=validate.Length(min=1, error="documents must hold at least one document"))
    model = fields.String(required=True, validate=validate.Length(min=1))
    top_n = _positive_int()
    max_tokens_per_doc = _positive_int()
    return_documents = StrictBoolean(load_default=False)


class RerankRequest(RerankV2Request):
    top_k = _positive_int(metadata={"description": "alias of top_n"})
    raw_scores = StrictBoolean(load_default=False)

    @post_load
    def _top_k_alias(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        top_k = data.pop("top_k", None)
        if data.get("top_n") is None and top_k is not None:
            data["top_n"] = top_k
        return data


# -- responses (documentation only) ------------------------------------------------------
class Usage(Schema):
    prompt_tokens = fields.Integer()
    total_tokens = fields.Integer()


class EmbeddingItem(Schema):
    object = fields.String(metadata={"example": "embedding"})
    index = fields.Integer()
    embedding = fields.Raw(metadata={"description": "array of floats, or a base64 string of little-endian float32"})


class EmbeddingsResponse(Schema):
    object = fields.String(metadata={"example": "list"})
    data = fields.List(fields.Nested(EmbeddingItem))
    model = fields.String()
    usage = fields.Nested(Usage)


class RerankDocumentOut(Schema):
    text = fields.String()


class RerankResult(Schema):
    index = fields.Integer()
    relevance_score = fields.Float()
    document = fields.Nested(RerankDocumentOut, metadata={"description": "only with return_documents"})


class RerankResponse(Schema):
    id = fields.String()
    model = fields.String()
    query = fields.String()
    results = fields.List(fields.Nested(RerankResult))
    data = fields.List(fields.Nested(RerankResult))
    usage = fields.Nested(Usage)


class ErrorDetail(Schema):
    message = fields.String()
    type = fields.String()
    param = fields.String(allow_none=True)
    code = fields.String(allow_none=True)


class ErrorResponse(Schema):
    error = fields.Nested(ErrorDetail)
