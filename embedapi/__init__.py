"""embedapi: an OpenAI-compatible embeddings and rerank server for Ruri v3, on Flask and Gunicorn."""

from __future__ import annotations

from typing import Any, Mapping

from flask import Flask

from . import logs
from .config import Settings

__all__ = ["create_app"]
__version__ = "0.1.0"


class _App(Flask):
    """Flask, asking once per function whether a view or hook is a coroutine: Flask.ensure_sync asks
    `inspect` on every call, for the view and each before/after hook of every request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync: dict[Any, Any] = {}

    def ensure_sync(self, func: Any) -> Any:
        try:
            return self._sync[func]
        except KeyError:
            wrapped = self._sync[func] = super().ensure_sync(func)
            return wrapped
        except TypeError:  # an unhashable callable
            return super().ensure_sync(func)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the WSGI app. `config` overrides Settings fields (lower-case names, e.g. models_file).

    Models load in this process as `load_models` says: `background` (default: /ready turns 200 when
    done), `sync` (tests), or `off` (Gunicorn's post_fork hook loads them in each worker).
    The factory itself never touches torch.
    """
    from .api import cohere, embeddings, handlers, health, metrics as metrics_api, models, openapi, rerank, tei
    from .api.common import AppState
    from .metrics import Metrics
    from .registry import Registry

    settings = Settings.from_env(**dict(config or {}))
    logs.configure(settings.log_format, settings.log_level)
    # The app's only static files are Swagger UI's, for /docs (embedapi/api/openapi.py says why).
    app = _App(__name__, static_folder=openapi.SWAGGER_UI_DIR, static_url_path=openapi.DOCS_ASSETS_URL)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    metrics = Metrics()
    registry = Registry(settings, observer=metrics)
    app.extensions["embedapi"] = AppState(settings, registry)
    app.extensions["embedapi.metrics"] = metrics
    for blueprint in (embeddings.bp, rerank.bp, tei.bp, cohere.bp, models.bp, health.bp, metrics_api.bp, openapi.bp):
        app.register_blueprint(blueprint)
    handlers.register(app)

    if settings.load_models == "sync":
        registry.load_all()
    elif settings.load_models == "background":
        registry.start_loading()
    return app
