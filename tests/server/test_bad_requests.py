"""Bad requests stay 4xx over real HTTP: each is one line in OpenAI's error shape naming the field,
and the server keeps answering good requests afterwards."""

from __future__ import annotations

import httpx
import pytest
from server_setup import API_KEY, TINY_FIXED

AUTH = {"Authorization": f"Bearer {API_KEY}"}
USER = [{"role": "user", "content": "Hi"}]

pytestmark = pytest.mark.usefixtures("no_server_errors")

BAD = [  # (path, body, status, param)
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "Hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"model": 5, "messages": USER}, 400, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"model": "tiny", "messages": USER, "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "Hi", "n": 3}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": {"text": "Hi"}}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "no-such-adapter", "messages": USER}, 404, "model"),
    ("/v1/completions", {"model": "no-such-adapter", "prompt": "Hi"}, 404, "model"),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_request_is_4xx_naming_the_field(tiny_server, path, body, status, param):
    reply = httpx.post(tiny_server.url + path, headers=AUTH, json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and "\n" not in error["message"] and error["type"] == "invalid_request_error"
    if status == 404:
        assert error["code"] == "model_not_found" and TINY_FIXED[0] in error["message"]  # says what is served


def test_a_chat_the_template_rejects_is_400_not_500(tiny_server):
    """The model's chat template raising (many insist that roles alternate) surfaced as HTTP 500."""
    tokenizer = tiny_server.engine.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                               "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    try:
        two_users = USER + [{"role": "user", "content": "again"}]
        for stream in (False, True):
            reply = httpx.post(tiny_server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                               json={"model": TINY_FIXED[1], "messages": two_users, "stream": stream})
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["param"] == "messages" and "roles must alternate" in error["message"]
        good = httpx.post(tiny_server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                          json={"model": TINY_FIXED[1], "messages": USER, "max_tokens": 2})
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        tokenizer.chat_template = saved


def test_the_engine_gives_routes_what_they_need(tiny_server):
    engine = tiny_server.engine
    assert engine.context_length == 512 and engine.vocab_size == len(engine.tokenizer)
    assert engine.adapter_names[:len(TINY_FIXED)] == TINY_FIXED


def test_an_adapter_mixed_batches_cannot_serve_is_refused_at_load_and_nothing_changes(tiny_server):
    """An adapter training biases loads as a model but cannot mix (one shared bias): a 400 at
    load time, and it is not left half-loaded (it used to break every later batch)."""
    import shutil

    from lorakit import LoraConfig, get_peft_model, load_model

    model, _ = load_model(str(tiny_server.root.parent / "model"))
    biased = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], bias="all"), "biased")
    directory = tiny_server.root / "biased"
    biased.save_pretrained(directory, selected_adapters=["biased"])
    path = "biased/biased" if (directory / "biased").is_dir() else "biased"
    try:
        served = [m["id"] for m in httpx.get(tiny_server.url + "/v1/models", headers=AUTH).json()["data"]]
        reply = httpx.post(tiny_server.url + "/v1/load_lora_adapter", headers=AUTH, timeout=60,
                           json={"lora_name": "biased", "lora_path": path})
        assert reply.status_code == 400 and "trains biases" in reply.json()["error"]["message"]
        assert [m["id"] for m in httpx.get(tiny_server.url + "/v1/models", headers=AUTH).json()["data"]] == served
        good = httpx.post(tiny_server.url + "/v1/completions", headers=AUTH, timeout=60,
                          json={"model": TINY_FIXED[0], "prompt": "Hi", "max_tokens": 2})
        assert good.status_code == 200
    finally:
        shutil.rmtree(directory, ignore_errors=True)
