"""Request schemas of the other clients' dialects (TEI, Cohere embed), and their documented answers.

Each validated request is translated (api/tei.py, api/cohere.py) into the request dict that
`service.embed` / `service.rerank` take, so prefixes, truncation and usage are the OpenAI route's.
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate

from ..prompts import INPUT_TYPE_ALIASES
from ..quantize import EMBEDDING_TYPES
from .schemas import StrictBoolean, _is_int, _positive_int, _Request, check_strings

TEI_IDS_MESSAGE = ("inputs holds token ids; this server takes text and tokenizes it itself (POST /tokenize "
                   "shows the ids it feeds). Send strings instead")


class Texts(fields.Field):
    """A string or an array of non-empty strings, named `name` in error messages."""

    def __init__(self, name: str, allow_string: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label, self.allow_string = name, allow_string

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        name = self.label
        if isinstance(value, str) and self.allow_string:
            texts = [value]
        elif isinstance(value, list):
            if not value:
                raise ValidationError(f"{name} must not be an empty array")
            if _is_int(value[0]) or (isinstance(value[0], list) and value[0] and all(_is_int(v) for v in value[0])):
                raise ValidationError(TEI_IDS_MESSAGE)
            texts = value
        else:
            raise ValidationError(f"{name} must be {'a string or ' if self.allow_string else ''}an array of strings")
        check_strings(texts, name, "every text must contain something")
        return texts


class TokenIds(fields.Field):
    """`[int]` or `[[int]]` (TEI's /decode), always returned as a list of id lists."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[list[int]]:
        if not isinstance(value, list) or not value:
            raise ValidationError("ids must be a non-empty array of token ids, or an array of such arrays")
        seqs = [value] if all(_is_int(v) for v in value) else value
        for i, ids in enumerate(seqs):
            if not isinstance(ids, list) or not all(_is_int(v) for v in ids):
                raise ValidationError(f"ids[{i}] must be an array of integer token ids")
        return seqs


def _direction() -> fields.String:
    # TEI accepts Left/Right in either case.
    return fields.String(load_default="right", validate=validate.OneOf(["left", "right", "Left", "Right"]),
                         metadata={"description": "which end of an over-long text is cut (the prefix is kept)"})


def _prompt_name() -> fields.String:
    return fields.String(allow_none=True, validate=validate.OneOf(list(INPUT_TYPE_ALIASES)),
                         metadata={"description": "an input_type (query, document, ...): the model's prefix for it"})


def _model() -> fields.String:
    return fields.String(allow_none=True, validate=validate.Length(min=1),
                         metadata={"description": "optional: default the first configured model of the route's kind"})


# -- TEI ------------------------------------------------------------------------------------------
class TeiEmbedRequest(_Request):
    inputs = Texts("inputs", required=True, metadata={"description": "a text or an array of texts"})
    model = _model()
    normalize = StrictBoolean(allow_none=True, load_default=None)
    truncate = StrictBoolean(allow_none=True, load_default=None,
                             metadata={"description": "default true: cut over-long texts; false: a 400"})
    truncation_direction = _direction()
    prompt_name = _prompt_name()
    dimensions = _positive_int()


class TeiRerankRequest(_Request):
    query = fields.String(required=True, validate=validate.Length(min=1, error="query must not be empty"))
    texts = fields.List(fields.String(), required=True,
                        validate=validate.Length(min=1, error="texts must hold at least one text"))
    model = _model()
    truncate = StrictBoolean(allow_none=True, load_default=None)
    truncation_direction = _direction()
    raw_scores = StrictBoolean(load_default=False)
    return_text = StrictBoolean(load_default=False)


class TeiTokenizeRequest(_Request):
    inputs = Texts("inputs", required=True)
    model = _model()
    add_special_tokens = StrictBoolean(load_default=True)
    prompt_name = _prompt_name()


class TeiDecodeRequest(_Request):
    ids = TokenIds(required=True)
    model = _model()
    skip_special_tokens = StrictBoolean(load_default=True)


class TeiError(Schema):
    error = fields.String(required=True)
    error_type = fields.String(required=True, metadata={"enum": ["Validation", "Empty", "Overloaded", "Unhealthy",
                                                                 "Backend", "Unauthorized", "NotFound"]})


class TeiRank(Schema):
    index = fields.Integer(required=True)
    score = fields.Float(required=True)
    text = fields.String(metadata={"description": "only with return_text"})


class TeiToken(Schema):
    id = fields.Integer(required=True)
    text = fields.String(required=True)
    special = fields.Boolean(required=True)
    start = fields.Integer(required=True, allow_none=True, metadata={"description": "byte offset; null if special"})
    stop = fields.Integer(required=True, allow_none=True)


class TeiModelType(Schema):
    embedding = fields.Dict()
    reranker = fields.Dict()


class TeiInfo(Schema):
    model_id = fields.String(required=True)
    model_sha = fields.String(required=True, allow_none=True)
    model_dtype = fields.String(required=True, allow_none=True)
    model_type = fields.Nested(TeiModelType, required=True)
    max_input_length = fields.Integer(required=True, allow_none=True)
    max_batch_tokens = fields.Integer(required=True, allow_none=True,
                                      metadata={"description": "padded tokens per forward pass; null until loaded"})
    max_queue_tokens = fields.Integer(required=True, metadata={
        "description": "queued tokens beyond which a 429 comes (there is no request count limit like TEI's "
                       "max_concurrent_requests)"})
    max_batch_requests = fields.Integer(required=True, allow_none=True)
    max_client_batch_size = fields.Integer(required=True)
    auto_truncate = fields.Boolean(required=True)
    tokenization_workers = fields.Integer(required=True)
    version = fields.String(required=True)
    sha = fields.String(required=True, allow_none=True)
    docker_label = fields.String(required=True, allow_none=True)
    served_model_name = fields.String(required=True)
    kind = fields.String(required=True, metadata={"enum": ["embedding", "rerank"]})
    ready = fields.Boolean(required=True, metadata={"description": "loaded in the worker that answered"})


# -- Cohere ---------------------------------------------------------------------------------------
class CohereEmbedV1Request(_Request):
    texts = Texts("texts", allow_string=False, required=True)
    model = _model()
    input_type = fields.String(allow_none=True, validate=validate.OneOf(list(INPUT_TYPE_ALIASES)),
                               metadata={"description": "search_query, search_document, classification, clustering "
                                                        "(or any input_type of /v1/embeddings)"})
    embedding_types = fields.List(fields.String(validate=validate.OneOf(EMBEDDING_TYPES)), allow_none=True,
                                  validate=validate.Length(min=1))
    truncate = fields.String(load_default="END", validate=validate.OneOf(["NONE", "START", "END"]))
    images = fields.Raw(allow_none=True, metadata={"description": "not supported: a 400 unless null or absent"})


class CohereEmbedV2Request(CohereEmbedV1Request):
    model = fields.String(required=True, validate=validate.Length(min=1))
    input_type = fields.String(required=True, validate=validate.OneOf(list(INPUT_TYPE_ALIASES)),
                               error_messages={"required": "input_type is required (as on Cohere's v2 API): "
                                                           "search_query, search_document, classification or "
                                                           "clustering"},
                               metadata={"description": "search_query, search_document, classification, clustering "
                                                        "(or any input_type of /v1/embeddings)"})
    output_dimension = _positive_int()
    max_tokens = _positive_int(metadata={"description": "cut each text to this many tokens (special tokens "
                                                        "included), as truncate says"})
    inputs = fields.Raw(allow_none=True, metadata={"description": "not supported: send texts"})
    priority = fields.Raw(allow_none=True, metadata={"description": "accepted, ignored"})


class CohereEmbeddings(Schema):
    float = fields.List(fields.List(fields.Float()))
    int8 = fields.List(fields.List(fields.Integer(validate=validate.Range(-128, 127))))
    uint8 = fields.List(fields.List(fields.Integer(validate=validate.Range(0, 255))))
    binary = fields.List(fields.List(fields.Integer(validate=validate.Range(-128, 127))))
    ubinary = fields.List(fields.List(fields.Integer(validate=validate.Range(0, 255))))
    base64 = fields.List(fields.String())


class CohereApiVersion(Schema):
    version = fields.String()


class CohereBilledUnits(Schema):
    input_tokens = fields.Integer()


class CohereTokens(Schema):
    input_tokens = fields.Integer()


class CohereMeta(Schema):
    api_version = fields.Nested(CohereApiVersion)
    billed_units = fields.Nested(CohereBilledUnits)
    tokens = fields.Nested(CohereTokens)


class CohereEmbedByTypeResponse(Schema):
    id = fields.String(required=True)
    response_type = fields.String(metadata={"enum": ["embeddings_by_type"]})
    embeddings = fields.Nested(CohereEmbeddings, required=True)
    texts = fields.List(fields.String())
    meta = fields.Nested(CohereMeta)


class CohereEmbedFloatsResponse(Schema):
    id = fields.String(required=True)
    response_type = fields.String(required=True, metadata={"enum": ["embeddings_floats"]})
    embeddings = fields.List(fields.List(fields.Float()), required=True)
    texts = fields.List(fields.String(), required=True)
    meta = fields.Nested(CohereMeta)
