"""Every error the server can give, and the one shape they are rendered in (contract §5)."""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration (environment or models TOML) is wrong; raised at start-up."""


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def tei_body(self) -> dict:
        """The same error in text-embeddings-inference's shape, which TEI clients read."""
        return {"error": self.message, "error_type": TEI_ERROR_TYPES.get(self.status, "Validation")}


# TEI's error_type per status (its own: Validation, Overloaded, Unhealthy, Backend; the rest are ours).
TEI_ERROR_TYPES = {401: "Unauthorized", 404: "NotFound", 429: "Overloaded", 500: "Backend", 503: "Unhealthy"}


class InvalidRequest(APIError):
    """400: the request is malformed or breaks a limit."""


class Unauthorized(APIError):
    status = 401
    code = "invalid_api_key"


class ModelNotFound(APIError):
    status = 404
    code = "model_not_found"


class RouteNotFound(APIError):
    status = 404
    code = "not_found"


class MethodNotAllowed(APIError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(APIError):
    """408: the client sent its request too slowly (the Gunicorn worker's read deadlines)."""

    status = 408
    code = "request_timeout"


class RequestTooLarge(APIError):
    status = 413
    code = "request_too_large"


class QueueFull(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class ModelNotReady(APIError):
    status = 503
    type = "server_error"
    code = "model_not_ready"


class OutOfMemory(APIError):
    """503: an input needs more GPU memory than the worker has, even in a batch of its own."""

    status = 503
    type = "server_error"
    code = "out_of_memory"


class ServerError(APIError):
    status = 500
    type = "server_error"
    code = "internal_error"


class ClientGone(Exception):
    """The client closed its connection before its work was computed."""
