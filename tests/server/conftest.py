"""Real lorakit servers on loopback: over the built-in model with four random adapters, and over a
tiny random model (for fuzzing and load, where thousands of requests must run in seconds)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from server_setup import ADAPTERS, API_KEY, REPORT, TINY_FIXED, TINY_RUNTIME


def _save_random_adapters(model_dir, root, fixed=ADAPTERS, elsewhere=None):
    """Random LoRA adapters of the model in ``model_dir``: ``fixed`` under root/fixed/<name>,
    the others at the paths ``elsewhere`` gives (default: 'extra' under root/runtime)."""
    from lorakit import LoraConfig, get_peft_model, load_model
    from lorakit.inference.blend import save_adapter

    model, _ = load_model(str(model_dir))
    elsewhere = elsewhere if elsewhere is not None else {"extra": root / "runtime" / "extra"}
    dirs = {}
    for i, name in enumerate(list(fixed) + list(elsewhere)):
        torch.manual_seed(1000 + i)
        config = LoraConfig(r=4 + 2 * i, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        if i == 0:
            lora = get_peft_model(model, config, name)
        else:
            lora.add_adapter(name, config)
        directory = elsewhere.get(name, root / "fixed" / name)
        save_adapter(lora, name, directory)
        dirs[name] = directory
    return dirs


def _start(app, limits):
    """(base url, stop) of ``app`` served by uvicorn, configured as ``lorakit serve`` does, on a free loopback port."""
    import uvicorn

    from lorakit.server.transport import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn_config(app, limits, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)

    def stop():
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="session")
def server(builtin_model_dir, tmp_path_factory):
    """(base url, engine, adapter dirs, adapter root) of a running server; stopped at the end."""
    from lorakit.server.protocol import Limits
    from lorakit.server.run import build_app

    root = tmp_path_factory.mktemp("adapters")
    dirs = _save_random_adapters(builtin_model_dir, root)
    (root / "runtime").mkdir(exist_ok=True)
    limits = Limits(max_body_bytes=20_000, max_prompt_tokens=256, max_tokens=64)
    app, engine = build_app(str(builtin_model_dir), {n: str(dirs[n]) for n in ADAPTERS}, api_key=API_KEY,
                            adapter_root=root / "runtime", served_model_name="smol", limits=limits)
    url, stop = _start(app, limits)
    yield url, engine, dirs, root
    stop()
    engine.close()


def _tiny_model_dir(tokenizer, directory):
    """A 2-layer Llama with random weights and the real SmolLM2 tokenizer (so chat templates,
    unicode and token-id prompts behave as in production) that generates in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_server(smol_tokenizer, tmp_path_factory):
    """A real server over a tiny random model: fixed adapters t0..t3, runtime adapters r0..r3 under
    the adapter root (not loaded), a decoy adapter outside the root, short client timeouts (2 s)."""
    from lorakit.server.protocol import Limits
    from lorakit.server.run import build_app

    base = tmp_path_factory.mktemp("tiny")
    model_dir = _tiny_model_dir(smol_tokenizer, base / "model")
    root = base / "root"
    dirs = _save_random_adapters(model_dir, base, TINY_FIXED,
                                 {**{name: root / name for name in TINY_RUNTIME}, "decoy": base / "decoy"})
    limits = Limits(max_body_bytes=20_000, max_prompt_tokens=256, max_tokens=16, header_timeout_s=2.0,
                    body_timeout_s=2.0)
    app, engine = build_app(str(model_dir), {n: str(dirs[n]) for n in TINY_FIXED}, api_key=API_KEY,
                            adapter_root=root, served_model_name="tiny", limits=limits)
    url, stop = _start(app, limits)
    yield SimpleNamespace(url=url, app=app, engine=engine, dirs=dirs, root=root, limits=limits)
    stop()
    engine.close()


@pytest.fixture(scope="module")
def two_row_server(smol_tokenizer, tmp_path_factory):
    """A real server over a tiny random model that decodes at most 2 rows at a time and allows
    long answers (max_tokens 400), for watching requests join, wait and leave a running batch."""
    from lorakit.server.protocol import Limits
    from lorakit.server.run import build_app

    base = tmp_path_factory.mktemp("two_rows")
    model_dir = _tiny_model_dir(smol_tokenizer, base / "model")
    dirs = _save_random_adapters(model_dir, base, TINY_FIXED, {})
    limits = Limits(max_body_bytes=20_000, max_prompt_tokens=64, max_tokens=400)
    app, engine = build_app(str(model_dir), {n: str(dirs[n]) for n in TINY_FIXED}, api_key=API_KEY,
                            served_model_name="tiny", limits=limits, max_batch=2)
    url, stop = _start(app, limits)
    yield SimpleNamespace(url=url, engine=engine)
    stop()
    engine.close()


class _ErrorRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def no_server_errors():
    """Fails the test if the server logged an error meanwhile: a traceback from a route
    ("Exception in ASGI application") or from uvicorn's protocol (asyncio's exception handler)."""
    handler = _ErrorRecords()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    yield
    for logger in loggers:
        logger.removeHandler(handler)
    assert not handler.records, [f"{r.name}: {r.getMessage()} {r.exc_info[1] if r.exc_info else ''}"
                                 for r in handler.records]


def pytest_terminal_summary(terminalreporter):
    """The counts the reliability tests measured (cases, requests, lost, hung, RSS), after the run."""
    if REPORT:
        terminalreporter.section("lorakit server reliability")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def budget_engine(smol_tokenizer, tmp_path_factory):
    """A generation engine (no HTTP) over a tiny random model and two adapters that prefills at
    most 12 prompt tokens per step while rows decode (tests/server/test_prefill_budget.py)."""
    from lorakit.inference.multi_adapter import MultiAdapterModel
    from lorakit.server.engine import BatchingEngine

    base = tmp_path_factory.mktemp("budget")
    model_dir = _tiny_model_dir(smol_tokenizer, base / "model")
    dirs = _save_random_adapters(model_dir, base, TINY_FIXED[:2], {})
    multi = MultiAdapterModel.from_pretrained(str(model_dir), {n: str(dirs[n]) for n in TINY_FIXED[:2]})
    engine = BatchingEngine(multi, multi.tokenizer, max_batch=8, prefill_tokens=12)
    yield engine
    engine.close()
