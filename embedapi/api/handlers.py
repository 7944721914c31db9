"""Error rendering (every error is the contract's JSON object), request ids and the access log."""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any, Callable

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed as WzMethodNotAllowed, NotFound, \
    RequestEntityTooLarge

from ..errors import APIError, ClientGone, InvalidRequest, MethodNotAllowed, RequestTooLarge, RouteNotFound, \
    ServerError
from .common import DIALECT, json_response

# Metric labels come from closed sets: Gunicorn accepts any method token of up to 20 characters, and a series
# per invented method would let any client, without a key, grow /metrics without bound.
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "other"

log = logging.getLogger("embedapi.access")
error_log = logging.getLogger("embedapi.errors")


def render(error: APIError) -> Response:
    g.error_code = error.code or error.type
    body = error.tei_body() if request.environ.get(DIALECT) == "tei" else error.body()  # TEI routes: TEI's shape
    return json_response(body, status=error.status, headers=error.headers)


def _http_exception(exc: HTTPException) -> Response:
    if isinstance(exc, NotFound):
        return render(RouteNotFound(f"No route {request.method} {request.path}; see /openapi.json for the API"))
    if isinstance(exc, WzMethodNotAllowed):
        allowed = ", ".join(sorted(exc.valid_methods or []))
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}",
                                 headers={"Allow": allowed})
        return render(error)
    if isinstance(exc, RequestEntityTooLarge):
        return render(RequestTooLarge("The request body is larger than this server accepts "
                                      "(EMBEDAPI_MAX_BODY_BYTES); send fewer or shorter inputs per request"))
    if exc.code and exc.code < 500:
        return render(InvalidRequest(exc.description or exc.name, status=exc.code))
    return _unexpected(exc)


def _unexpected(exc: BaseException) -> Response:
    error_log.error("unhandled error in %s %s (request %s)", request.method, request.path,
                    g.get("request_id", "-"), exc_info=exc)
    return render(ServerError(f"The server failed to process the request (request id {g.get('request_id', '-')}); "
                              "it has been logged. Retry, and report the request id if it persists"))


def _client_gone(exc: ClientGone) -> Response:
    return render(InvalidRequest("the client closed the connection", status=499))


def _timeout(exc: TimeoutError) -> Response:
    return render(ServerError("The model did not answer in time (EMBEDAPI_REQUEST_TIMEOUT); retry with fewer inputs",
                              status=503, code="timeout"))


def _start() -> None:
    g.started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    # A generated id only has to be unique, not secret: 128 bits from the process's Mersenne Twister (reseeded
    # in each forked worker) cost no system call, where secrets' getrandom also hands the GIL to another thread.
    g.request_id = incoming[:128] if incoming and incoming.isprintable() else f"{random.getrandbits(128):032x}"


def _finish(response: Response) -> Response:
    # Runs on every request: the context-local proxies are resolved once each.
    req, ctx = request._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
    request_id = ctx.get("request_id")
    response.headers["X-Request-ID"] = request_id or ""
    seconds = time.perf_counter() - ctx.get("started", time.perf_counter())
    status, method = response.status_code, req.method
    metrics = current_app.extensions.get("embedapi.metrics")
    if metrics is not None:
        # The URL rule, never the raw path: unknown paths must not create a series each.
        route = req.url_rule.rule if req.url_rule is not None else "<unmatched>"
        metrics.request_done(route, method if method in METRIC_METHODS else OTHER_METHOD, status, seconds)
    if log.isEnabledFor(logging.INFO):
        path = req.path
        # The record is made here and handed to the logger: log.info would first walk the stack for the
        # caller's file and line (findCaller), which no format of ours shows, on every request.
        log.handle(log.makeRecord(
            log.name, logging.INFO, "", 0, "%s %s %d %.1fms", (method, path, status, seconds * 1000), None,
            extra={"request_id": request_id, "status": status, "method": method, "path": path,
                   "duration_ms": round(seconds * 1000, 2), "model": ctx.get("model"),
                   "items": ctx.get("items"), "tokens": ctx.get("tokens")}))
    return response


_SLASHES = re.compile("//+")


def _merge_slashes(wsgi_app: Callable) -> Callable:
    """Serve `/v1//embeddings` (a base URL with a trailing slash) as `/v1/embeddings`, in place.

    Werkzeug would answer a 308 whose Location it builds from the client's Host header: a redirect
    anyone can point at another host, and one that SDKs do not follow for a POST anyway.
    """
    def app(environ: dict, start_response: Callable) -> Any:
        path = environ.get("PATH_INFO", "")
        if "//" in path:
            environ["PATH_INFO"] = _SLASHES.sub("/", path)
        return wsgi_app(environ, start_response)
    return app


def register(app: Flask) -> None:
    app.wsgi_app = _merge_slashes(app.wsgi_app)  # type: ignore[method-assign]
    app.register_error_handler(APIError, render)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(ClientGone, _client_gone)
    app.register_error_handler(TimeoutError, _timeout)
    app.register_error_handler(Exception, _unexpected)
    app.before_request(_start)
    app.after_request(_finish)
