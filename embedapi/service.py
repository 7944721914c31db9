"""Request semantics between HTTP and engine: prefixes, one tokenization, truncation, usage, limits.

Takes validated request dicts (see api/schemas.py), returns plain dicts holding numpy rows;
knows neither Flask nor torch.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any, Callable

import numpy as np

from . import quantize
from .config import Settings
from .errors import InvalidRequest
from .prompts import choose_prefix, with_prefix
from .registry import Registry

Gone = Callable[[], bool] | None

# How long a request that reaches a worker still loading its models waits for them before a 503.
# Gunicorn's workers share one listening socket, so a worker the master has just started (or restarted
# after a crash) is handed connections while it loads; waiting turns those into slow answers, not errors.
LOADING_WAIT_S = 60.0


def _loading_wait(settings: Settings) -> float:
    return min(LOADING_WAIT_S, settings.request_timeout_s)


def _check_count(n: int, limit: int, param: str) -> None:
    if n > limit:
        raise InvalidRequest(f"'{param}' has {n} items; at most {limit} are accepted per request, "
                             "split it into several requests", param=param)


def _check_chars(texts: list[str], limit: int, param: str) -> None:
    for i, text in enumerate(texts):
        if len(text) > limit:
            raise InvalidRequest(f"{param}[{i}] has {len(text)} characters; at most {limit} are accepted "
                                 "(the model reads only its first max_tokens tokens anyway)", param=param)


def _check_tokens(tokens: int, limit: int, param: str) -> None:
    """The per-request token limit, on the ids really fed (after truncation, prefixes and special tokens
    included: the number `usage` reports)."""
    if limit and tokens > limit:
        parts = -(-tokens // limit)
        raise InvalidRequest(f"the request holds {tokens} tokens after truncation; at most {limit} are accepted "
                             f"per request (EMBEDAPI_MAX_REQUEST_TOKENS): split '{param}' into {parts} or more "
                             "requests", param=param)


def _check_instruction(instruction: str | None, limit: int) -> None:
    if instruction and len(instruction) > limit:
        raise InvalidRequest(f"instruction has {len(instruction)} characters; at most {limit} are accepted "
                             "(it is prepended to every input)", param="instruction")


def _check_fed_chars(fed: list[str], texts: list[str], limit: int) -> None:
    """The character limit holds for what is really fed: each input with its prefix or instruction."""
    for i, (text, bare) in enumerate(zip(fed, texts)):
        if len(text) > limit:
            raise InvalidRequest(f"input[{i}] has {len(text)} characters with its prefix or instruction "
                                 f"({len(text) - len(bare)} of them); at most {limit} are accepted",
                                 param="input")


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (as torch's normalize: a zero row stays zero)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def embed(registry: Registry, settings: Settings, req: dict[str, Any], gone: Gone = None) -> dict[str, Any]:
    """OpenAI embeddings (+ the seed's extensions) → response dict with numpy rows or base64 strings."""
    texts: list[str] = req["input"]
    _check_count(len(texts), settings.max_inputs, "input")
    _check_chars(texts, settings.max_text_chars, "input")
    _check_instruction(req.get("instruction"), settings.max_instruction_chars)
    entry, model = registry.get(req["model"], "embedding", _loading_wait(settings), gone)
    spec = entry.spec

    dims = req.get("dimensions")
    if dims is not None and dims != model.dimensions and dims not in spec.matryoshka_dimensions:
        allowed = sorted({model.dimensions, *spec.matryoshka_dimensions})
        raise InvalidRequest(f"dimensions={dims} is not available for {req['model']}; use one of {allowed}",
                             param="dimensions")

    prefix = choose_prefix(entry.prefixes, spec.instruction_template, input_type=req.get("input_type"),
                           instruction=req.get("instruction"), apply_ruri_prefix=req.get("apply_ruri_prefix", False),
                           input_is_string=req.get("input_is_string", False))
    fed = [with_prefix(prefix, t) for t in texts]
    _check_fed_chars(fed, texts, settings.max_text_chars)
    encoder = model.encoder
    # Dialect options (TEI, Cohere): cut the text's start instead of its tail, keeping the prefix; a per-request cap.
    left = req.get("truncation_direction") == "left"
    head = encoder.ids([prefix])[0] if left and prefix else ()
    seqs = []
    for i, ids in enumerate(encoder.iter_ids(fed, gone)):
        seq = encoder.single(ids, truncate=req.get("truncate", True), left=left, head=head,
                             max_length=req.get("max_tokens"))
        if seq is None:
            raise InvalidRequest(
                f"input[{i}] is {len(ids) + encoder.template.single_overhead} tokens long, over the model's "
                f"{encoder.max_seq_length}; shorten it or send \"truncate\": true to cut its tail", param="input")
        seqs.append(seq)
    tokens = sum(len(s) for s in seqs)
    _check_tokens(tokens, settings.max_request_tokens, "input")
    if req.get("tokens_only"):  # POST /tokenize: exactly what the forward pass would be fed
        return {"model": req["model"], "texts": fed, "seqs": seqs, "encoder": encoder, "tokens": tokens}

    rows = model.engine.submit(seqs).wait(settings.request_timeout_s, gone)
    if dims is not None and dims != rows.shape[1]:
        rows = rows[:, :dims]
    normalize = req.get("normalize")
    normalized = spec.normalize if normalize is None else normalize
    if normalized:
        rows = _unit(rows)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    by_type = None
    if req.get("embedding_types"):  # Cohere: int8/uint8 with the model's fixed calibration step
        by_type = quantize.by_type(rows, lambda: model.quantizer.step(rows.shape[1], normalized),
                                   req["embedding_types"])

    if req.get("encoding_format") == "base64":
        vectors: list[Any] = [base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode("ascii")
                              for row in rows]
    else:
        vectors = list(rows)
    out = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": req["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    if by_type is not None:
        out["embeddings_by_type"] = by_type
    return out


def rerank(registry: Registry, settings: Settings, req: dict[str, Any], gone: Gone = None) -> dict[str, Any]:
    """Score (query, document) pairs; results sorted by score, ties by index, cut to top_n."""
    docs: list[str] = req["documents"]
    _check_count(len(docs), settings.max_documents, "documents")
    _check_chars([req["query"]], settings.max_text_chars, "query")
    _check_chars(docs, settings.max_text_chars, "documents")
    entry, model = registry.get(req["model"], "rerank", _loading_wait(settings), gone)
    encoder = model.encoder

    ids = encoder.iter_ids([req["query"], *docs], gone)  # each document's ids are cut as they come
    query_ids = next(ids)
    cap = req.get("max_tokens_per_doc")
    strict = req.get("truncate") is False  # TEI: an over-long pair is a 400 instead of being cut
    left = req.get("truncation_direction") == "left"
    seqs = []
    for i, d in enumerate(ids):
        d = d[:cap] if cap else d
        n = len(query_ids) + len(d) + encoder.template.pair_overhead
        if strict and n > encoder.max_seq_length:
            raise InvalidRequest(f"query + document {i} is {n} tokens long, over the model's "
                                 f"{encoder.max_seq_length}; shorten it or send \"truncate\": true", param="documents")
        seqs.append(encoder.pair(query_ids, d, left=left))
    tokens = sum(len(s) for s in seqs)
    _check_tokens(tokens, settings.max_request_tokens, "documents")

    logits = model.engine.submit(seqs).wait(settings.request_timeout_s, gone)
    scores = logits if req.get("raw_scores") else model.activation(logits)
    order = np.lexsort((np.arange(len(docs)), -scores))
    top_n = req.get("top_n")
    if top_n is not None:
        order = order[:top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": int(i), "relevance_score": float(scores[i])}
        if req.get("return_documents"):
            item["document"] = {"text": docs[i]}
        results.append(item)
    return {"id": f"rerank-{secrets.token_hex(12)}", "model": req["model"], "query": req["query"],
            "results": results, "data": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def tokenize(registry: Registry, settings: Settings, req: dict[str, Any], gone: Gone = None) -> dict[str, Any]:
    """TEI's /tokenize: the token ids `embed` would feed for the same request (prefix, truncation), each
    as `{id, text, special, start, stop}`; `tokens` is the usage the embeddings route reports."""
    prep = embed(registry, settings, {**req, "tokens_only": True}, gone)
    encoder = prep["encoder"]
    special = req.get("add_special_tokens", True)
    lists = []
    for text, seq in zip(prep["texts"], prep["seqs"]):
        tokens = encoder.describe(text, seq)
        lists.append(tokens if special else [t for t in tokens if not t["special"]])
    return {"model": req["model"], "tokens": lists, "usage": prep["tokens"]}


def decode(registry: Registry, settings: Settings, req: dict[str, Any], gone: Gone = None) -> list[str]:
    """TEI's /decode: token id lists back to text with the model's tokenizer."""
    seqs: list[list[int]] = req["ids"]
    _check_count(len(seqs), settings.max_inputs, "ids")
    kind = registry.entry(req["model"]).spec.kind
    _, model = registry.get(req["model"], kind, _loading_wait(settings), gone)
    encoder = model.encoder
    vocab = encoder.vocab_size
    for i, ids in enumerate(seqs):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"ids[{i}] holds {bad}, which is not a token id of {req['model']} "
                                 f"(ids are 0..{vocab - 1})", param="ids")
    return [encoder.decode(ids, req.get("skip_special_tokens", True)) for ids in seqs]
