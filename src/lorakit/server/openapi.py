"""The server's OpenAPI document (GET /openapi.json, behind the API key like every /v1 route).

The routes read raw JSON and check it by hand in protocol.py (so every error is one line in
OpenAI's shape); FastAPI cannot see those rules, so this module writes them out as JSON Schema,
with this server's limits and the names it serves at the moment the document is asked for.
Clients and schema-driven testers (schemathesis) then know what each body may hold.
"""

from __future__ import annotations

from lorakit.server.protocol import UNSUPPORTED, Limits


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": _nullable({"type": "string"}), "code": _nullable({"type": "string"})}}}}

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"enum": ["system", "developer", "user", "assistant"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}}
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"}


def _sampling(limits: Limits, models: list[str]) -> dict:
    tokens = _nullable({"type": "integer", "minimum": 1, "maximum": limits.max_tokens})
    properties = {
        "model": {"enum": models, "description": "the base model or a loaded adapter (GET /v1/models)"},
        "max_tokens": tokens, "max_completion_tokens": tokens,
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "stop": _nullable({"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 4,
                                                          "items": {"type": "string", "minLength": 1}}]}),
        "seed": _nullable({"type": "integer", "minimum": -2**63, "maximum": 2**64 - 1}),
        "stream": {"type": "boolean"},
        "stream_options": _nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
    }
    for key, allowed in UNSUPPORTED.items():  # accepted only with a value that changes nothing
        properties[key] = {"enum": [v for i, v in enumerate(allowed) if v not in allowed[:i]]}
    return properties


def request_bodies(limits: Limits, models: list[str], vocab_size: int) -> dict[str, dict]:
    """path -> JSON Schema of the body that POST route accepts."""
    chat = {"type": "object", "required": ["model", "messages"],
            "properties": {**_sampling(limits, models),
                           "messages": {"type": "array", "minItems": 1, "items": _MESSAGE}}}
    prompt = {"anyOf": [{"type": "string", "minLength": 1},
                        {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}},
                        {"type": "array", "minItems": 1,
                         "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}],
              "description": "one prompt: text, or token ids"}
    completion = {"type": "object", "required": ["model", "prompt"],
                  "properties": {**_sampling(limits, models), "prompt": prompt}}
    load = {"type": "object", "required": ["lora_name", "lora_path"],
            "properties": {"lora_name": _NAME, "lora_path": {
                "type": "string", "minLength": 1, "maxLength": 4096,
                "description": "a directory inside the server's --adapter-root (relative to it, or absolute)"}}}
    unload = {"type": "object", "required": ["lora_name"], "properties": {"lora_name": _NAME}}
    return {"/v1/chat/completions": chat, "/v1/completions": completion,
            "/v1/load_lora_adapter": load, "/v1/unload_lora_adapter": unload}


def add_bodies(document: dict, limits: Limits, models: list[str], vocab_size: int) -> dict:
    """``document`` (FastAPI's OpenAPI dict) with the request bodies and the error responses filled in."""
    document.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    error = {"description": "OpenAI's error shape", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, schema in request_bodies(limits, models, vocab_size).items():
        operation = document["paths"][path]["post"]
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        operation["responses"].update({"4XX": error, "5XX": error})
    for path, item in document["paths"].items():
        if path != "/health":
            item["get" if "get" in item else "post"]["responses"].setdefault("401", error)
    return document
