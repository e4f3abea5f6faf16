"""Start the server: load the base model and adapters, then run uvicorn."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.server.protocol import Limits


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """["name=DIR", ...] -> {name: DIR}; a bare DIR is named after its last path segment."""
    adapters = {}
    for spec in specs or []:
        name, sep, directory = spec.partition("=")
        if not sep:
            name, directory = Path(spec).name, spec
        if not name or not directory:
            raise LorakitError(f"--adapter '{spec}' must be NAME=DIR")
        if name in adapters:
            raise LorakitError(f"--adapter name '{name}' is given twice")
        adapters[name] = directory
    return adapters


def serving_dtype(requested: str, device: str = "cpu", probe=None) -> str:
    """The base model's dtype: "auto" -> bfloat16 on a CPU whose bf16 matmul is native and
    faster (lorakit.hardware's measured probe, as training's precision auto), else float32; a
    named dtype is kept. Adapters stay float32 either way (the mixed path casts around them)."""
    if requested != "auto":
        return requested
    if str(device) != "cpu":
        return "float32"
    from lorakit.hardware import resolve_precision

    return "bfloat16" if resolve_precision("auto", probe) == "bf16" else "float32"


def build_app(model: str, adapters: dict[str, str] | None = None, api_key: str | None = None,
              adapter_root: str | Path | None = None, limits: Limits | None = None, dtype: str = "float32",
              device: str = "cpu", max_batch: int = 32, batch_window_ms: float = 10.0,
              served_model_name: str | None = None, force: bool = False, max_kv_mb: float = 1024,
              prefill_tokens: int | None = None):
    """(ASGI app, engine) for ``model`` with ``adapters`` loaded; see lorakit.server.app. An
    adapter recorded as trained on another base (its fingerprint, else its base model name) is
    refused, at startup and at run time, unless ``force``. ``max_batch`` rows decode together at
    most, their KV cache within ``max_kv_mb``; more requests wait in arrival order; while rows
    decode, joining prompts are prefilled ``prefill_tokens`` at most per step (the engine's default)."""
    from lorakit.inference.multi_adapter import MultiAdapterModel
    from lorakit.server.app import ServerSettings, create_app
    from lorakit.server.engine import BatchingEngine

    if adapter_root is not None and not Path(adapter_root).is_dir():
        raise LorakitError(f"--adapter-root '{adapter_root}' is not a directory")
    dtype = serving_dtype(dtype, device)
    multi = MultiAdapterModel.from_pretrained(model, adapters or {}, dtype=dtype, device=device, check_base=not force)
    base_name = served_model_name or model
    if base_name in multi.adapter_names:
        raise LorakitError(f"adapter name '{base_name}' is also the base model's name; rename the adapter")
    engine = BatchingEngine(multi, multi.tokenizer, max_batch=max_batch, batch_window_s=batch_window_ms / 1000,
                            max_kv_bytes=int(max_kv_mb * 2**20),
                            **({} if prefill_tokens is None else {"prefill_tokens": prefill_tokens}))
    settings = ServerSettings(base_name, api_key, Path(adapter_root) if adapter_root else None, limits or Limits())
    return create_app(engine, settings), engine


def serve(model: str, adapters: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, **kwargs) -> None:
    """Build the app and serve it until interrupted. The key may come from $LORAKIT_API_KEY."""
    import uvicorn

    from lorakit.server.transport import uvicorn_config

    api_key = api_key or os.environ.get("LORAKIT_API_KEY") or None
    limits = kwargs.pop("limits", None) or Limits()
    app, engine = build_app(model, adapters, api_key=api_key, limits=limits, **kwargs)
    if api_key is None and not _is_loopback(host):
        print(f"lorakit: warning: serving on {host} without an API key; anyone who can reach it can use it")
    names = ", ".join([kwargs.get("served_model_name") or model] + engine.adapter_names)
    dtype = next(engine.multi.model.parameters()).dtype
    print(f"lorakit: serving {names} ({str(dtype).removeprefix('torch.')} base) on http://{host}:{port}/v1")
    try:
        uvicorn.Server(uvicorn_config(app, limits, host=host, port=port, log_level="warning")).run()
    finally:
        engine.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
