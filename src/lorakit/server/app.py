"""The OpenAI-compatible HTTP app (FastAPI); the routes are in routes.py, the model work in the engine.

    GET  /health                          no auth
    GET  /openapi.json                    the request bodies and limits as JSON Schema (server/openapi.py)
    GET  /v1/models                       the base model and every adapter
    POST /v1/chat/completions             model = base or adapter name; stream (SSE) or not
    POST /v1/completions
    POST /v1/load_lora_adapter            {"lora_name", "lora_path"}  (vLLM's shape)
    POST /v1/unload_lora_adapter          {"lora_name"}

Every request passes the guard first (guard.py: API key, body size, body deadline); every error,
raised anywhere, is answered by one helper (errors.py) in OpenAI's error shape.
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException

from lorakit import __version__
from lorakit.server import openapi
from lorakit.server.errors import error_response
from lorakit.server.guard import Guard
from lorakit.server.protocol import ApiError
from lorakit.server.routes import Served, ServerSettings, router

__all__ = ["ServerSettings", "create_app"]


def create_app(engine, settings: ServerSettings):
    """The ASGI app serving ``engine`` (see routes.py for what it must offer), behind the guard."""
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    served = Served(engine, settings, {settings.base_name: int(time.time())})
    app.state.served = served

    def openapi_document() -> dict:  # rebuilt on every request: the served names change at run time
        document = get_openapi(title="lorakit", version=__version__, routes=app.routes)
        return openapi.add_bodies(document, settings.limits, served.names(), engine.vocab_size)

    app.openapi = openapi_document

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(_, err: HTTPException):
        return error_response(ApiError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _server_error(_, err: Exception):
        return error_response(err)

    app.include_router(router)
    return Guard(app, settings.api_key, settings.limits)
