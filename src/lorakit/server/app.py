"""The OpenAI-compatible HTTP app (FastAPI): routes only; the model work is in the engine.

    GET  /health                          no auth
    GET  /v1/models                       the base model and every adapter
    POST /v1/chat/completions             model = base or adapter name; stream (SSE) or not
    POST /v1/completions
    POST /v1/load_lora_adapter            {"lora_name", "lora_path"}  (vLLM's shape)
    POST /v1/unload_lora_adapter          {"lora_name"}

Guards (an ASGI wrapper, before any route runs): bearer token compared in constant time
(hmac.compare_digest) -> 401; request bodies over ``max_body_bytes`` -> 413, counted as they
are read, so a chunked body without Content-Length is bounded too.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.errors import LorakitError
from lorakit.inference.batched import GenerationRequest
from lorakit.inference.multi_adapter import check_adapter_name
from lorakit.server import protocol
from lorakit.server.protocol import ApiError, Limits


@dataclass
class ServerSettings:
    base_name: str
    api_key: str | None = None
    adapter_root: Path | None = None  # runtime loading only from directories under it
    limits: Limits = field(default_factory=Limits)


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI wrapper: authentication and the request-size limit, answered in OpenAI's error shape."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] != "/health":
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                error = ApiError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return await _send_error(send, error)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return await _send_error(send, ApiError(400, "Content-Length must be a number of bytes"))
        if int(length) > self.max_body_bytes:
            return await _send_error(send, _too_large(self.max_body_bytes))
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise _BodyTooLarge()
            return message

        return await self.app(scope, bounded_receive, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than this server's limit of {limit} bytes", code="request_too_large")


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(engine, settings: ServerSettings):
    """The ASGI app serving ``engine.multi`` (a MultiAdapterModel) through ``engine``."""
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = engine.tokenizer
    config = engine.multi.model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    created = {settings.base_name: int(time.time())}
    limits = settings.limits

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(_BodyTooLarge)
    async def _body_error(_, __):
        return JSONResponse(_too_large(limits.max_body_bytes).body(), status_code=413)

    @app.exception_handler(HTTPException)
    async def _http_error(_, err: HTTPException):
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_, err: Exception):
        error = ApiError(500, f"internal error: {type(err).__name__}: {err}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    def served() -> list[str]:
        return [settings.base_name] + engine.multi.adapter_names

    async def read_json(request: Request) -> dict:
        return protocol.parse_json(await request.body())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": created.get(name, now), "owned_by": "lorakit",
                 "root": name, "parent": None if name == settings.base_name else settings.base_name}
                for name in served()]
        return {"object": "list", "data": data}

    async def complete(request: Request, chat: bool):
        data = await read_json(request)
        sampling = protocol.parse_sampling(data, limits)
        if sampling.model not in served():
            raise protocol.not_found_model(sampling.model, served())
        param = "messages" if chat else "prompt"
        prompt_ids = protocol.chat_prompt_ids(data, tokenizer) if chat else protocol.completion_prompt_ids(data, tokenizer)
        protocol.check_prompt_length(prompt_ids, sampling, limits, context, param)
        adapter = None if sampling.model == settings.base_name else sampling.model
        job = engine.submit(GenerationRequest(prompt_ids, adapter, sampling.max_tokens, sampling.temperature,
                                              sampling.top_p, sampling.stop, sampling.seed))
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        if sampling.stream:
            return StreamingResponse(_stream(job, chat, rid, sampling), media_type="text/event-stream")
        try:
            result = await _result(job)
        finally:
            job.cancelled = True  # a no-op once finished; stops the row if the client went away
        build = protocol.chat_response if chat else protocol.completion_response
        return build(rid, sampling.model, result.text, _finish(result), result.prompt_tokens, len(result.token_ids))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        data = await read_json(request)
        name, path = data.get("lora_name"), data.get("lora_path")
        _check_new_name(name, served())
        directory = _under_root(settings.adapter_root, path)
        try:
            await asyncio.to_thread(engine.load_adapter, name, directory)
        except LorakitError as err:
            raise ApiError(400, str(err), param="lora_path") from None
        created[name] = int(time.time())
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        data = await read_json(request)
        name = data.get("lora_name")
        if name not in engine.multi.adapter_names:
            raise ApiError(404, f"The LoRA adapter '{name}' is not loaded; loaded: "
                                f"{', '.join(engine.multi.adapter_names) or 'none'}", param="lora_name",
                           code="model_not_found")
        await asyncio.to_thread(engine.unload_adapter, name)
        created.pop(name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return _Guard(app, settings.api_key, limits.max_body_bytes)


async def _result(job):
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise value if isinstance(value, ApiError) else ApiError(500, str(value), type="server_error")


def _finish(result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


async def _stream(job, chat: bool, rid: str, sampling):
    """SSE events: (chat: a role chunk,) text chunks, a chunk with finish_reason, [usage,] [DONE]."""
    try:
        if chat:
            yield protocol.sse(protocol.stream_chunk(True, rid, sampling.model, None, None, role=True))
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield protocol.sse(protocol.stream_chunk(chat, rid, sampling.model, value, None))
            elif kind == "error":
                error = value if isinstance(value, ApiError) else ApiError(500, str(value), type="server_error")
                yield protocol.sse(error.body())
                break
            else:
                yield protocol.sse(protocol.stream_chunk(chat, rid, sampling.model, None, _finish(value)))
                if sampling.include_usage:
                    chunk = protocol.stream_chunk(chat, rid, sampling.model, None, None)
                    chunk["choices"] = []
                    chunk["usage"] = protocol.usage(value.prompt_tokens, len(value.token_ids))
                    yield protocol.sse(chunk)
                break
        yield protocol.sse("[DONE]")
    finally:
        job.cancelled = True


def _check_new_name(name, served: list[str]) -> None:
    try:
        check_adapter_name(name)
    except LorakitError as err:
        raise ApiError(400, str(err), param="lora_name") from None
    if name in served:
        raise ApiError(400, f"the name '{name}' is already served; unload it first or choose another",
                       param="lora_name")


def _under_root(root: Path | None, path) -> Path:
    """The adapter directory ``path`` names, which must lie inside ``root`` after resolving
    '..' and symlinks (no path traversal)."""
    if root is None:
        raise ApiError(400, "loading adapters at run time is off; start the server with --adapter-root DIR",
                       param="lora_path")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ApiError(400, "'lora_path' must be a directory path inside the adapter root", param="lora_path")
    root = Path(root).resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if ".." in candidate.parts or not resolved.is_relative_to(root) or resolved == root:
        raise ApiError(400, f"'lora_path' must be a directory inside the adapter root; '{path}' is not",
                       param="lora_path", code="invalid_path")
    if not resolved.is_dir():
        raise ApiError(400, f"adapter directory '{path}' does not exist under the adapter root", param="lora_path")
    return resolved
