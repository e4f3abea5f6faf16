"""The OpenAI-compatible HTTP app (FastAPI): routes only; the model work is in the engine.

    GET  /health                          no auth
    GET  /openapi.json                    the request bodies and limits as JSON Schema (server/openapi.py)
    GET  /v1/models                       the base model and every adapter
    POST /v1/chat/completions             model = base or adapter name; stream (SSE) or not
    POST /v1/completions
    POST /v1/load_lora_adapter            {"lora_name", "lora_path"}  (vLLM's shape)
    POST /v1/unload_lora_adapter          {"lora_name"}

Guards (an ASGI wrapper, before any route runs): bearer token compared in constant time
(hmac.compare_digest) -> 401; request bodies over ``max_body_bytes`` -> 413, counted as they
are read, so a chunked body without Content-Length is bounded too; a body not complete
``body_timeout_s`` after its headers -> 408. Both body errors close the connection (the rest of
the body is never read). The deadline for the headers themselves is uvicorn's: server/transport.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit import __version__
from lorakit.errors import LorakitError, lone_surrogate_at
from lorakit.inference.batched import GenerationRequest
from lorakit.inference.multi_adapter import check_adapter_name
from lorakit.server import openapi, protocol
from lorakit.server.protocol import ApiError, Limits


@dataclass
class ServerSettings:
    base_name: str
    api_key: str | None = None
    adapter_root: Path | None = None  # runtime loading only from directories under it
    limits: Limits = field(default_factory=Limits)


class _BodyError(ApiError):
    """A request body refused while it is still arriving: answered with 'Connection: close'."""


class _Guard:
    """ASGI wrapper: authentication, the request-size limit and the body deadline, answered in
    OpenAI's error shape."""

    def __init__(self, app, api_key: str | None, limits: Limits):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = limits.max_body_bytes
        self.body_timeout_s = limits.body_timeout_s

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
        if len(length) > 18 or int(length) > self.max_body_bytes:
            return await _send_error(send, self._too_large())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        received, complete = 0, False

        async def guarded_receive():
            nonlocal received, complete
            if complete:  # after the body only http.disconnect can come, whenever the client leaves
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise _BodyError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                 code="request_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        return await self.app(scope, guarded_receive, send)

    def _too_large(self) -> _BodyError:
        return _BodyError(413, f"request body is larger than this server's limit of {self.max_body_bytes} bytes",
                          code="request_too_large")


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(error, _BodyError):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(engine, settings: ServerSettings):
    """The ASGI app serving ``engine.multi`` (a MultiAdapterModel) through ``engine``."""
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    tokenizer = engine.tokenizer
    config = engine.multi.model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    created = {settings.base_name: int(time.time())}
    limits = settings.limits

    def openapi_document() -> dict:  # rebuilt on every request: the served names change at run time
        document = get_openapi(title="lorakit", version=__version__, routes=app.routes)
        return openapi.add_bodies(document, limits, served(), len(tokenizer))

    app.openapi = openapi_document

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        closing = {"connection": "close"} if isinstance(err, _BodyError) else None
        return JSONResponse(err.body(), status_code=err.status, headers=closing)

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
        protocol.check_media_type(request.headers.get("content-type"))
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
        waiting = engine.waiting()
        if waiting >= limits.max_waiting:
            raise ApiError(503, f"the server is busy ({waiting} requests are waiting); retry shortly",
                           type="server_error", code="overloaded")
        job = engine.submit(GenerationRequest(prompt_ids, adapter, sampling.max_tokens, sampling.temperature,
                                              sampling.top_p, sampling.stop, sampling.seed))
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        try:
            if sampling.stream:  # an error before the first token still gets its HTTP status
                first = await _event(job, until_text=True)
                return StreamingResponse(_stream(job, chat, rid, sampling, first), media_type="text/event-stream")
            _, result = await _event(job, until_text=False)
        except BaseException:
            job.cancelled = True  # stops the row if the client went away
            raise
        job.cancelled = True  # a no-op once finished
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
            raise ApiError(404, f"The LoRA adapter {protocol.quoted(name)} is not loaded; loaded: "
                                f"{', '.join(engine.multi.adapter_names) or 'none'}", param="lora_name",
                           code="model_not_found")
        await asyncio.to_thread(engine.unload_adapter, name)
        created.pop(name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return _Guard(app, settings.api_key, limits)


async def _event(job, until_text: bool) -> tuple[str, object]:
    """The job's next ("text", str) event (``until_text``) or its ("done", result); an error is raised."""
    while True:
        kind, value = await job.events.get()
        if kind == "error":
            raise _api_error(value)
        if kind == "done" or until_text:
            return kind, value


def _api_error(value: Exception) -> ApiError:
    return value if isinstance(value, ApiError) else ApiError(500, str(value), type="server_error")


def _finish(result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


async def _stream(job, chat: bool, rid: str, sampling, first: tuple[str, object]):
    """SSE events: (chat: a role chunk,) text chunks, a chunk with finish_reason, [usage,] [DONE].
    ``first`` is the job's first event, already taken."""
    try:
        if chat:
            yield protocol.sse(protocol.stream_chunk(True, rid, sampling.model, None, None, role=True))
        kind, value = first
        while kind == "text":
            yield protocol.sse(protocol.stream_chunk(chat, rid, sampling.model, value, None))
            kind, value = await job.events.get()
        if kind == "error":  # after text was sent, the status is already 200: the error is an event
            yield protocol.sse(_api_error(value).body())
        else:
            yield protocol.sse(protocol.stream_chunk(chat, rid, sampling.model, None, _finish(value)))
            if sampling.include_usage:
                chunk = protocol.stream_chunk(chat, rid, sampling.model, None, None)
                chunk["choices"] = []
                chunk["usage"] = protocol.usage(value.prompt_tokens, len(value.token_ids))
                yield protocol.sse(chunk)
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


_MAX_PATH = 4096  # Linux's PATH_MAX: anything longer cannot name a directory


def _under_root(root: Path | None, path) -> Path:
    """The adapter directory ``path`` names, which must lie inside ``root`` after resolving '..'
    and symlinks (no path traversal), as must every entry directly in it: a symlinked
    adapter_config.json or weights file pointing outside the root would be read from there."""
    if root is None:
        raise ApiError(400, "loading adapters at run time is off; start the server with --adapter-root DIR",
                       param="lora_path")
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > _MAX_PATH \
            or lone_surrogate_at(path) is not None:
        raise ApiError(400, f"'lora_path' must be a directory path inside the adapter root, at most {_MAX_PATH} "
                            f"characters of valid text", param="lora_path")
    root = Path(root).resolve()
    candidate = Path(path)
    shown = protocol.quoted(path)
    outside = ApiError(400, f"'lora_path' must be a directory inside the adapter root; {shown} is not",
                       param="lora_path", code="invalid_path")
    if ".." in candidate.parts:
        raise outside
    try:
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root) or resolved == root:
            raise outside
        if not resolved.is_dir():
            raise ApiError(400, f"{shown} is not a directory under the adapter root", param="lora_path")
        escaping = sorted(protocol.quoted(entry.name) for entry in resolved.iterdir()
                          if not entry.resolve().is_relative_to(root))
    except (OSError, RuntimeError) as err:  # a name too long, a symlink loop, no permission
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "a symlink loop"
        raise ApiError(400, f"'lora_path' cannot be resolved ({reason})", param="lora_path") from None
    if escaping:
        raise ApiError(400, f"{shown} holds links that lead outside the adapter root ({', '.join(escaping)}); "
                            f"copy the files in instead", param="lora_path", code="invalid_path")
    return resolved
