"""What every route shares: the JSON body, schema loading, JSON responses, auth, client liveness."""

from __future__ import annotations

import hmac
import re
import select
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import orjson
from flask import Response, current_app, g, request
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from ..config import Settings
from ..errors import InvalidRequest, Unauthorized
from ..registry import Registry

try:  # what Gunicorn raises from wsgi.input when a chunked body is malformed or ends early
    from gunicorn.http.errors import NoMoreData, ParseException

    BODY_FRAMING_ERRORS: tuple[type[BaseException], ...] = (ParseException, NoMoreData)
except ImportError:  # another WSGI server (flask run)
    BODY_FRAMING_ERRORS = ()

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
# request.environ key: the dialect whose error shape this request's errors take ("tei"; absent: the contract's)
DIALECT = "embedapi.dialect"


@dataclass
class AppState:
    """What create_app hangs on `app.extensions["embedapi"]`."""

    settings: Settings
    registry: Registry


def state() -> AppState:
    return current_app.extensions["embedapi"]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson straight from numpy rows: no per-float Python objects."""
    return Response(orjson.dumps(body, option=JSON_OPTIONS), status=status, headers=headers,
                    content_type="application/json")


def read_json() -> dict[str, Any]:
    """The body as a JSON object, whatever the Content-Type (curl -d sends a form type)."""
    try:
        raw = request.get_data(cache=False)
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        if limit is not None and request.content_length is None and len(raw) >= limit:
            # A chunked body (no Content-Length) is read only up to the limit, and werkzeug returns that
            # prefix without complaint: one more byte on the wire means the body was over the limit.
            if request.environ["wsgi.input"].read(1):
                raise RequestEntityTooLarge()
    except BODY_FRAMING_ERRORS as exc:
        raise InvalidRequest(f"the request body is malformed ({type(exc).__name__}): its chunked transfer "
                             "encoding is broken or it ended early; send a complete body") from None
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidRequest(f"the request body is not valid UTF-8 (byte 0x{raw[bad.start]:02x} at offset "
                                 f"{bad.start}); send JSON encoded as UTF-8") from None
        raise InvalidRequest(f"the request body is not valid JSON ({exc}); send a UTF-8 JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not a JSON {type(body).__name__}")
    return body


def load(schema: Schema, body: dict[str, Any]) -> dict[str, Any]:
    """Validate with a marshmallow schema; the first problem becomes a 400 naming its field."""
    try:
        return schema.load(body)
    except ValidationError as exc:
        field, problem = _first_problem(exc.messages)
        raise InvalidRequest(f"{field}: {problem}", param=field.split(".")[0].split("[")[0]) from None


def _first_problem(messages: Any, path: str = "") -> tuple[str, str]:
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        sub = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))
        return _first_problem(value, sub)
    if isinstance(messages, list) and messages:
        return _first_problem(messages[0], path) if not isinstance(messages[0], str) else (path, messages[0])
    return path, str(messages)


def require_api_key() -> None:
    """before_request of the model blueprints: a bearer key when keys are configured (constant time)."""
    keys = state().settings.api_keys
    if not keys:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip().encode()
    ok = False
    if scheme.lower() == "bearer" and token:
        for key in keys:
            ok |= hmac.compare_digest(token, key.encode())
    if not ok:
        raise Unauthorized("Incorrect or missing API key: send the header 'Authorization: Bearer <key>' "
                           "with a key configured on this server", headers={"WWW-Authenticate": "Bearer"})


def client_gone() -> Callable[[], bool] | None:
    """A check that the client has closed its connection (Gunicorn gives the socket), else None."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return None

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, ValueError):  # nothing to read; or a TLS socket, which cannot peek
            return False
        except OSError:
            return True
    return gone


def note(model: str, items: int, tokens: int) -> None:
    """What the access log line says of this request (never its texts)."""
    g.model, g.items, g.tokens = model, items, tokens


@contextmanager
def renamed(names: dict[str, str]) -> Iterator[None]:
    """A dialect route's 400s name its own fields: the service says `input` / `documents`, TEI says
    `inputs` / `texts`, Cohere `texts`."""
    try:
        yield
    except InvalidRequest as exc:
        if exc.param in names:
            old, new = exc.param, names[exc.param]
            exc.param = new
            exc.message = re.sub(rf"(?<![\w.]){re.escape(old)}(?=[\['=])", new, exc.message)
            exc.args = (exc.message,)
        raise
