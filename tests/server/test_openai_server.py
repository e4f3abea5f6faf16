"""The real server on loopback, driven by the official openai client."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch
from server_setup import ADAPTERS, API_KEY

from lorakit.server import protocol

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Name a colour."}]


def _client(url, key=API_KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def _reference(engine, prompt_ids, adapter, max_tokens):
    """What ``adapter`` alone (None: the base) generates greedily: transformers' generate, one row."""
    multi = engine.multi
    with engine.lock:
        multi.set_adapter(adapter)
        try:
            ids = torch.tensor([prompt_ids])
            out = multi.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_tokens, pad_token_id=engine.tokenizer.pad_token_id)
        finally:
            multi.set_adapter(None)
    return engine.tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def _chat_ids(engine, messages):
    return protocol.chat_prompt_ids({"messages": messages}, engine.tokenizer)


def test_models_lists_base_and_adapters(server):
    url, *_ = server
    ids = [m.id for m in _client(url).models.list().data]
    assert ids[0] == "smol" and sorted(ids[1:]) == sorted(ADAPTERS)
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # no key needed


def test_chat_per_adapter_equals_that_adapter_alone(server):
    url, engine, *_ = server
    client = _client(url)
    answers = {}
    for model in ["smol"] + ADAPTERS:
        reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
        answers[model] = reply.choices[0].message.content
        expected = _reference(engine, _chat_ids(engine, QUESTION), None if model == "smol" else model, 8)
        assert answers[model] == expected, model
        assert reply.model == model and reply.usage.completion_tokens <= 8
    assert len(set(answers.values())) == len(answers), answers  # every adapter answers differently


def test_streaming_chat_and_completion_match_non_streaming(server):
    url, *_ = server
    client = _client(url)
    full = client.chat.completions.create(model="a1", messages=QUESTION, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="a1", messages=QUESTION, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    plain = client.completions.create(model="a2", prompt="The capital of France is", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="a2", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True))
    assert streamed == plain.choices[0].text and plain.choices[0].text


def test_stop_and_sampling_parameters(server):
    url, *_ = server
    client = _client(url)
    free = client.completions.create(model="a3", prompt="1, 2, 3, 4,", max_tokens=10, temperature=0).choices[0]
    stop = free.text.strip()[:2]
    cut = client.completions.create(model="a3", prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                    stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.find(stop)]
    seeded = [client.completions.create(model="a3", prompt="Once upon", max_tokens=8, temperature=1.5, top_p=0.95,
                                        seed=s).choices[0].text for s in (7, 7)]
    assert seeded[0] == seeded[1]


def test_auth_unknown_model_and_limits(server):
    url, *_ = server
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong-key").models.list()
    response = httpx.post(url + "/v1/chat/completions", json={"model": "a0", "messages": QUESTION})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as err:
        _client(url).chat.completions.create(model="nope", messages=QUESTION, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and set(err.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.APIStatusError, match="larger than this server's limit") as err:  # body > 20 kB
        _client(url).chat.completions.create(model="a0", messages=[{"role": "user", "content": "x" * 30_000}])
    assert err.value.status_code == 413  # Payload Too Large, as HTTP has it (was 400)
    with pytest.raises(openai.BadRequestError, match="tokens; this server accepts at most 256"):
        _client(url).completions.create(model="a0", prompt="hello " * 400, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _client(url).completions.create(model="a0", prompt="hi", max_tokens=10_000)


def test_load_and_unload_at_run_time_and_traversal_rejected(server):
    url, engine, dirs, root = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    client = _client(url)
    for bad in ["../fixed/a0", str(dirs["a0"]), "extra/../../fixed/a0"]:
        response = httpx.post(url + "/v1/load_lora_adapter", headers=headers, json={"lora_name": "x", "lora_path": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "lora_path", bad
    (root / "runtime" / "escape").symlink_to(dirs["a0"], target_is_directory=True)
    response = httpx.post(url + "/v1/load_lora_adapter", headers=headers, json={"lora_name": "x", "lora_path": "escape"})
    assert response.status_code == 400
    assert "x" not in [m.id for m in client.models.list().data]

    response = httpx.post(url + "/v1/load_lora_adapter", headers=headers,
                          json={"lora_name": "extra", "lora_path": "extra"})
    assert response.status_code == 200, response.text
    assert "extra" in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model="extra", messages=QUESTION, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == _reference(engine, _chat_ids(engine, QUESTION), "extra", 6)
    response = httpx.post(url + "/v1/unload_lora_adapter", headers=headers, json={"lora_name": "extra"})
    assert response.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="extra", messages=QUESTION, max_tokens=2)
    assert httpx.post(url + "/v1/unload_lora_adapter", headers=headers, json={"lora_name": "extra"}).status_code == 404


def test_32_concurrent_requests_across_4_adapters(server):
    url, engine, *_ = server
    prompts = [[{"role": "user", "content": f"Say something about the number {i}."}] for i in range(8)]
    jobs = [(adapter, messages) for adapter in ADAPTERS for messages in prompts]

    async def ask_all():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        replies = await asyncio.gather(*[client.chat.completions.create(model=a, messages=m, max_tokens=6,
                                                                        temperature=0) for a, m in jobs])
        await client.close()
        return [r.choices[0].message.content for r in replies]

    engine.peak_rows = 0
    answers = asyncio.run(ask_all())
    assert engine.peak_rows > 4  # requests really were batched across adapters
    for (adapter, messages), answer in zip(jobs, answers):
        assert answer == _reference(engine, _chat_ids(engine, messages), adapter, 6), (adapter, messages)
