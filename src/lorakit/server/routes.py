"""The HTTP routes: read and check the request (protocol.py), hand the work to the engine, shape
the answer. Everything a route needs lives in ``request.app.state.served`` (a ``Served``); the
model itself is only reached through the engine's small interface (``submit``, ``waiting``,
``context_length``, ``vocab_size``, ``adapter_names``, ``load_adapter``, ``unload_adapter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from lorakit.errors import LorakitError
from lorakit.inference.batched import GenerationRequest
from lorakit.server import protocol
from lorakit.server.adapter_paths import check_new_name, under_root
from lorakit.server.errors import api_error
from lorakit.server.protocol import ApiError, Limits

router = APIRouter()


@dataclass
class ServerSettings:
    base_name: str
    api_key: str | None = None
    adapter_root: Path | None = None  # runtime loading only from directories under it
    limits: Limits = field(default_factory=Limits)


@dataclass
class Served:
    """What the routes share: the engine, the settings, and when each served name appeared."""

    engine: object
    settings: ServerSettings
    created: dict[str, int] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [self.settings.base_name] + self.engine.adapter_names


def _served(request: Request) -> Served:
    return request.app.state.served


async def _read_json(request: Request) -> dict:
    protocol.check_media_type(request.headers.get("content-type"))
    return protocol.parse_json(await request.body())


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/v1/models")
async def models(request: Request):
    served, now = _served(request), int(time.time())
    base = served.settings.base_name
    data = [{"id": name, "object": "model", "created": served.created.get(name, now), "owned_by": "lorakit",
             "root": name, "parent": None if name == base else base} for name in served.names()]
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _complete(request, chat=True)


@router.post("/v1/completions")
async def completions(request: Request):
    return await _complete(request, chat=False)


def _generation_request(served: Served, data: dict, chat: bool) -> tuple[GenerationRequest, protocol.Sampling]:
    """The checked request: sampling fields, a served model, a prompt that fits (else ApiError)."""
    engine, limits = served.engine, served.settings.limits
    sampling = protocol.parse_sampling(data, limits)
    if sampling.model not in served.names():
        raise protocol.not_found_model(sampling.model, served.names())
    tokenizer = engine.tokenizer
    prompt_ids = protocol.chat_prompt_ids(data, tokenizer) if chat else protocol.completion_prompt_ids(data, tokenizer)
    protocol.check_prompt_length(prompt_ids, sampling, limits, engine.context_length, "messages" if chat else "prompt")
    adapter = None if sampling.model == served.settings.base_name else sampling.model
    request = GenerationRequest(prompt_ids, adapter, sampling.max_tokens, sampling.temperature, sampling.top_p,
                                sampling.stop, sampling.seed)
    return request, sampling


async def _complete(request: Request, chat: bool):
    served = _served(request)
    engine = served.engine
    generation, sampling = _generation_request(served, await _read_json(request), chat)
    waiting = engine.waiting()
    if waiting >= served.settings.limits.max_waiting:
        raise ApiError(503, f"the server is busy ({waiting} requests are waiting); retry shortly",
                       type="server_error", code="overloaded")
    job = engine.submit(generation)
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        if sampling.stream:  # an error before the first token still gets its HTTP status
            first = await _event(job, until_text=True)
            return StreamingResponse(_stream(job, chat, rid, sampling, first), media_type="text/event-stream")
        _, result = await _event(job, until_text=False)
    except BaseException:
        job.cancel()  # stops the row if the client went away
        raise
    finally:
        watcher.cancel()
    job.cancel()  # a no-op once finished
    build = protocol.chat_response if chat else protocol.completion_response
    return build(rid, sampling.model, result.text, _finish(result), result.prompt_tokens, len(result.token_ids))


async def _cancel_on_disconnect(request: Request, job) -> None:
    """Cancel ``job`` when the client hangs up before its answer (its row leaves the batch at
    the next step). The body is already read, so the next ASGI message can only be a disconnect;
    a streamed answer is watched by StreamingResponse itself (then ``_stream`` cancels)."""
    with contextlib.suppress(Exception):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return


async def _event(job, until_text: bool) -> tuple[str, object]:
    """The job's next ("text", str) event (``until_text``) or its ("done", result); an error is raised."""
    while True:
        kind, value = await job.events.get()
        if kind == "error":
            raise api_error(value)
        if kind == "done" or until_text:
            return kind, value


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
            yield protocol.sse(api_error(value).body())
        else:
            yield protocol.sse(protocol.stream_chunk(chat, rid, sampling.model, None, _finish(value)))
            if sampling.include_usage:
                chunk = protocol.stream_chunk(chat, rid, sampling.model, None, None)
                chunk["choices"] = []
                chunk["usage"] = protocol.usage(value.prompt_tokens, len(value.token_ids))
                yield protocol.sse(chunk)
        yield protocol.sse("[DONE]")
    finally:
        job.cancel()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request):
    served = _served(request)
    data = await _read_json(request)
    name, path = data.get("lora_name"), data.get("lora_path")
    check_new_name(name, served.names())
    directory = under_root(served.settings.adapter_root, path)
    try:
        await asyncio.to_thread(served.engine.load_adapter, name, directory)
    except LorakitError as err:
        raise api_error(err, param="lora_path") from None
    served.created[name] = int(time.time())
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request):
    served = _served(request)
    data = await _read_json(request)
    name = data.get("lora_name")
    loaded = served.engine.adapter_names
    if name not in loaded:
        raise ApiError(404, f"The LoRA adapter {protocol.quoted(name)} is not loaded; loaded: "
                            f"{', '.join(loaded) or 'none'}", param="lora_name", code="model_not_found")
    await asyncio.to_thread(served.engine.unload_adapter, name)
    served.created.pop(name, None)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
