"""One way to turn anything that went wrong into an HTTP answer in OpenAI's error shape.

    ApiError (protocol.py)        -> its own status (4xx for the client's mistakes)
    LorakitError (a bad adapter, a bad row, anything lorakit refuses with a reason) -> 400
    any other exception (a bug, out of memory) -> 500, type "server_error"

Routes raise; the app's exception handlers and the streaming generator call ``api_error`` and
``error_response``, so no route builds an error body of its own.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from lorakit.data.readers import BadRow
from lorakit.errors import LorakitError
from lorakit.server.protocol import ApiError


class BodyError(ApiError):
    """A request body refused while it is still arriving: answered with 'Connection: close'
    (the rest of the body is never read)."""


def api_error(err: BaseException, param: str | None = None) -> ApiError:
    """``err`` as the ApiError the client gets (see module docstring)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, (LorakitError, BadRow)):
        return ApiError(400, str(err), param=param)
    return ApiError(500, f"internal error: {type(err).__name__}: {err}", type="server_error")


def error_headers(err: ApiError) -> dict[str, str] | None:
    return {"connection": "close"} if isinstance(err, BodyError) else None


def error_response(err: BaseException) -> JSONResponse:
    error = api_error(err)
    return JSONResponse(error.body(), status_code=error.status, headers=error_headers(error))
