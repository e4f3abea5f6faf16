"""The OpenAI request and response shapes the server speaks, validated by hand so every error
is one line in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.

No web framework here: the functions take parsed JSON and return plain values, so the rules
are testable without a server.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from lorakit.errors import lone_surrogate_at

# Options whose non-default values would change the answer and that lorakit does not implement:
# refused (400) rather than silently ignored.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
                "tool_choice": (None, "none", "auto"), "functions": (None, []), "logit_bias": (None, {}),
                "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""), "n": (None, 1)}


@dataclass
class Limits:
    """Request limits: body bytes, prompt tokens, max_tokens (and its default), requests waiting
    for the generation worker, and how long a client may take to send a request.

    The timeouts bound what a slow (or hostile) client can hold: ``header_timeout_s`` for the
    request line and headers (a few hundred bytes; 10 s allows a very poor link), then
    ``body_timeout_s`` for the whole body (1 MB in 30 s is about 270 kbit/s; real clients send it
    in milliseconds). See lorakit.server.transport.
    """

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_waiting: int = 1024  # more queued generation requests than this: 503, retry later
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0


class ApiError(Exception):
    """An HTTP error answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def quoted(value, limit: int = 200) -> str:
    """A client's value for an error message: quoted on one line (newlines and control characters
    escaped, as Python's repr does), cut after ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def not_found_model(model: str, served: list[str]) -> ApiError:
    return ApiError(404, f"The model {quoted(model)} does not exist; served models: {', '.join(served)}",
                    param="model", code="model_not_found")


def check_media_type(content_type: str | None) -> None:
    """Bodies are JSON: a Content-Type naming something else (a form, plain text) is a 415."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"Content-Type must be application/json; got '{media[:100]}'",
                       code="unsupported_media_type")


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body or b"null", parse_constant=_not_json)
    except RecursionError:  # "[[[[..." deeper than Python's recursion limit
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as err:  # bad syntax or UTF-8, NaN / Infinity, an integer of more than 4300 digits
        raise ApiError(400, f"request body is not valid JSON: {str(err).split('; use sys.')[0]}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def _number(data: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{key}' must be a number in {bound}; got {value!r}", param=key)
    return float(value)


@dataclass
class Sampling:
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_sampling(data: dict, limits: Limits) -> Sampling:
    """The shared fields of chat and text completion requests, checked."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a base model or adapter name from GET /v1/models", param="model")
    for key, defaults in UNSUPPORTED.items():
        if data.get(key) not in defaults:
            raise ApiError(400, f"'{key}' = {data[key]!r} is not supported by lorakit serve", param=key)
    key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = data.get(key)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"'{key}' must be an integer from 1 to {limits.max_tokens}; got {max_tokens!r}", param=key)
    stop = data.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    seed = data.get("seed")
    # torch.Generator.manual_seed takes [-2^63, 2^64): outside it one request's seed would fail its
    # whole batch with an OverflowError (HTTP 500 for every row)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64):
        raise ApiError(400, f"'seed' must be an integer from -2^63 to 2^64 - 1; got {seed!r}", param="seed")
    stream = data.get("stream", False)
    options = data.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(400, "'stream' must be true or false and 'stream_options' an object", param="stream")
    return Sampling(model, max_tokens, _number(data, "temperature", 1.0, 0.0, 2.0),
                    _number(data, "top_p", 1.0, 0.0, 1.0, low_open=True), stop, seed, stream,
                    bool(options.get("include_usage", False)))


def _message_text(message, index: int) -> tuple[str, str]:
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
        raise ApiError(400, f"messages[{index}] must be an object with role system, developer, user or assistant",
                       param=f"messages[{index}]")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{index}].content: only text parts are supported",
                           param=f"messages[{index}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{index}].content must be a string", param=f"messages[{index}].content")
    _check_unicode(content, f"messages[{index}].content")
    role = "system" if message["role"] == "developer" else message["role"]
    return role, content


def _check_unicode(text: str, param: str) -> None:
    """JSON may carry a lone surrogate (\\ud800) that no tokenizer can encode: a 400, not a 500."""
    position = lone_surrogate_at(text)
    if position is not None:
        raise ApiError(400, f"'{param}' is not valid Unicode (lone surrogate at position {position})", param=param)


def chat_prompt_ids(data: dict, tokenizer) -> list[int]:
    """Token ids of the chat template applied to ``messages`` with the assistant turn opened."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns = [dict(zip(("role", "content"), _message_text(m, i))) for i, m in enumerate(messages)]
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use POST /v1/completions with a prompt")
    from lorakit.data import render_chat  # the same rendering training used
    from lorakit.data.readers import BadRow

    try:
        text = render_chat(tokenizer, turns, add_generation_prompt=True)
    except BadRow as err:  # e.g. a template that wants user and assistant turns to alternate
        raise ApiError(400, f"'messages': {err}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_prompt_ids(data: dict, tokenizer) -> list[int]:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < len(tokenizer) for t in prompt):
            raise ApiError(400, "'prompt' token ids must be in the vocabulary", param="prompt")
        return list(prompt)
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of token ids); one prompt per request",
                       param="prompt")
    _check_unicode(prompt, "prompt")
    return tokenizer(prompt)["input_ids"]


def check_prompt_length(prompt_ids: list[int], sampling: Sampling, limits: Limits, context: int | None,
                        param: str) -> None:
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server accepts at most "
                            f"{limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
    if context and len(prompt_ids) + sampling.max_tokens > context:
        raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                            f"model's context of {context} tokens", param=param, code="context_length_exceeded")


# --- responses ------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(chat: bool, rid: str, model: str, text: str | None, finish: str | None,
                 role: bool = False) -> dict:
    created = int(time.time())
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"
