"""The ASGI wrapper every request passes before any route runs, answered in OpenAI's error shape.

    bearer token compared in constant time (hmac.compare_digest)                  -> 401
    a body over ``max_body_bytes``, counted as it is read (chunked bodies too)    -> 413
    a body not complete ``body_timeout_s`` after its headers                      -> 408

Both body errors close the connection. The deadline for the headers themselves is uvicorn's:
server/transport.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from lorakit.server.errors import BodyError, error_headers
from lorakit.server.protocol import ApiError, Limits


class Guard:
    """ASGI wrapper: authentication, the request-size limit and the body deadline."""

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
                return await send_error(send, error)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return await send_error(send, ApiError(400, "Content-Length must be a number of bytes"))
        if len(length) > 18 or int(length) > self.max_body_bytes:
            return await send_error(send, self._too_large())
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
                raise BodyError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                code="request_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        return await self.app(scope, guarded_receive, send)

    def _too_large(self) -> BodyError:
        return BodyError(413, f"request body is larger than this server's limit of {self.max_body_bytes} bytes",
                         code="request_too_large")


async def send_error(send, error: ApiError) -> None:
    """Answer ``error`` directly on the ASGI channel (before the app exists for this request)."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (error_headers(error) or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
