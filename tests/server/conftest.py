"""A real lorakit server on loopback over the built-in model, with four random adapters."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from server_setup import ADAPTERS, API_KEY


def _save_random_adapters(model_dir, root):
    from lorakit import LoraConfig, get_peft_model, load_model
    from lorakit.inference.blend import save_adapter

    model, _ = load_model(str(model_dir))
    dirs = {}
    names = ADAPTERS + ["extra"]
    for i, name in enumerate(names):
        torch.manual_seed(1000 + i)
        config = LoraConfig(r=4 + 2 * i, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        if i == 0:
            lora = get_peft_model(model, config, name)
        else:
            lora.add_adapter(name, config)
        directory = (root / "runtime" / name) if name == "extra" else (root / "fixed" / name)
        save_adapter(lora, name, directory)
        dirs[name] = directory
    return dirs


@pytest.fixture(scope="session")
def server(builtin_model_dir, tmp_path_factory):
    """(base url, engine, adapter dirs, adapter root) of a running server; stopped at the end."""
    import uvicorn

    from lorakit.server.protocol import Limits
    from lorakit.server.run import build_app

    root = tmp_path_factory.mktemp("adapters")
    dirs = _save_random_adapters(builtin_model_dir, root)
    (root / "runtime").mkdir(exist_ok=True)
    app, engine = build_app(str(builtin_model_dir), {n: str(dirs[n]) for n in ADAPTERS}, api_key=API_KEY,
                            adapter_root=root / "runtime", served_model_name="smol",
                            limits=Limits(max_body_bytes=20_000, max_prompt_tokens=256, max_tokens=64))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine, dirs, root
    uv.should_exit = True
    thread.join(timeout=10)
    engine.close()
    sock.close()
