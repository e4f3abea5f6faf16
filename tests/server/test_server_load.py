"""Load without loss: many concurrent clients on loopback, streaming and not, over the base model,
four fixed adapters and four adapters that are loaded and unloaded while the requests run.

Every request ends one of two ways: a complete answer (the JSON of a completion, or a stream whose
last event is ``data: [DONE]`` after a finish_reason) equal to what that model answers alone
(greedy), or a clean refusal (4xx / 503, JSON in OpenAI's error shape with a reason). Lost
(connection error, truncated or malformed stream, 5xx), hung (no answer within REQUEST_TIMEOUT_S)
and wrong (another model's answer) must all be 0. The process's resident memory (the server runs
in it) after the run is compared with before, after a warm-up.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections import Counter

import httpx
import pytest
from server_setup import API_KEY, REPORT, TINY_FIXED, TINY_RUNTIME

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["The sky is", "Once upon a time", "1, 2, 3,"]
MAX_TOKENS = 4
REQUEST_TIMEOUT_S = 120.0

pytestmark = pytest.mark.usefixtures("no_server_errors")


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _body(chat: bool, model: str, prompt: str, stream: bool) -> dict:
    body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def _ask(client: httpx.AsyncClient, chat: bool, model: str, prompt: str, stream: bool) -> tuple[str, str]:
    """(outcome, text): outcome is "complete", "refused <status>" or "lost <why>"."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with client.stream("POST", path, json=_body(chat, model, prompt, stream)) as reply:
        raw = await reply.aread()
    if reply.status_code != 200:
        try:
            error = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            return f"lost {reply.status_code} not in OpenAI's error shape", ""
        clean = reply.status_code < 500 or reply.status_code == 503
        return (f"refused {reply.status_code}" if clean and error.get("message") else f"lost {reply.status_code}"), ""
    if not stream:
        choice = json.loads(raw)["choices"][0]
        return "complete", choice["message"]["content"] if chat else choice["text"]
    events = [line[6:] for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return "lost truncated stream", ""
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return "refused in stream", ""
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    if finish not in ("stop", "length"):
        return "lost no finish_reason", ""
    pieces = [(c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
              for c in chunks if c["choices"]]
    return "complete", "".join(pieces)


async def _references(client, models) -> dict:
    """What each model answers alone (greedy), per endpoint and prompt."""
    answers = {}
    for chat in (True, False):
        for model in models:
            for prompt in PROMPTS:
                outcome, text = await _ask(client, chat, model, prompt, stream=False)
                assert outcome == "complete", (model, outcome)
                answers[chat, model, prompt] = text
    return answers


async def _churn(client, stop: asyncio.Event, counts: Counter) -> None:
    """Unload and reload each runtime adapter in turn until ``stop``."""
    while not stop.is_set():
        for name in TINY_RUNTIME:
            for action, body in (("unload", {"lora_name": name}), ("load", {"lora_name": name, "lora_path": name})):
                reply = await client.post(f"/v1/{action}_lora_adapter", json=body)
                counts[f"{action} {reply.status_code}"] += 1
                await asyncio.sleep(0.05)


async def _run(url: str, clients: int, rounds: int) -> dict:
    models = ["tiny"] + TINY_FIXED + TINY_RUNTIME
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=REQUEST_TIMEOUT_S + 30, limits=limits) as client:
        for name in TINY_RUNTIME:
            assert (await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})).status_code == 200
        references = await _references(client, models)
        await asyncio.gather(*[_ask(client, i % 2 == 0, models[i % len(models)], PROMPTS[0], i % 3 == 0)
                               for i in range(32)])  # warm-up: the batch sizes the run will see
        gc.collect()
        rss_before = _rss_kb()
        outcomes, churn = Counter(), Counter()

        async def one_client(c: int) -> None:
            for r in range(rounds):
                i = c * rounds + r
                chat, model, prompt, stream = i % 2 == 0, models[(c + r) % len(models)], PROMPTS[i % 3], i % 4 < 2
                try:
                    outcome, text = await asyncio.wait_for(_ask(client, chat, model, prompt, stream), REQUEST_TIMEOUT_S)
                except asyncio.TimeoutError:
                    outcome, text = "hung", ""
                except httpx.HTTPError as err:
                    outcome, text = f"lost {type(err).__name__}", ""
                if outcome == "complete" and text != references[chat, model, prompt]:
                    outcome = "wrong"
                outcomes[outcome] += 1

        stop = asyncio.Event()
        churner = asyncio.create_task(_churn(client, stop, churn))
        start = time.monotonic()
        await asyncio.gather(*[one_client(c) for c in range(clients)])
        seconds = time.monotonic() - start
        stop.set()
        await churner
        for name in TINY_RUNTIME:  # leave the server as the fixture made it
            await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    gc.collect()
    return {"outcomes": outcomes, "churn": churn, "seconds": seconds, "rss": (rss_before, _rss_kb())}


def _check_and_report(result: dict, clients: int, rounds: int) -> None:
    outcomes, churn = result["outcomes"], result["churn"]
    sent = clients * rounds
    refused = sum(n for k, n in outcomes.items() if k.startswith("refused"))
    lost = {k: n for k, n in outcomes.items() if k.startswith("lost")}
    before, after = result["rss"]
    REPORT.append(f"load ({clients} clients x {rounds}): {sent} requests sent, {outcomes['complete']} complete, "
                  f"{refused} refused 4xx/503 ({', '.join(f'{k[8:]}: {n}' for k, n in sorted(outcomes.items()) if k.startswith('refused')) or '-'}), "
                  f"{sum(lost.values())} lost, {outcomes['hung']} hung, {outcomes['wrong']} wrong; "
                  f"{result['seconds']:.1f} s; adapter churn {dict(sorted(churn.items()))}; "
                  f"RSS {before / 1024:.0f} MB before, {after / 1024:.0f} MB after ({after / before:.2f}x)")
    assert sum(outcomes.values()) == sent
    assert not lost and outcomes["hung"] == 0 and outcomes["wrong"] == 0, outcomes
    assert outcomes["refused in stream"] == 0  # an error before the first token has its own HTTP status
    assert outcomes["complete"] > sent // 2  # the fixed models never refuse: most requests complete
    assert churn["load 200"] > 0 and churn["unload 200"] > 0 and not any(k.endswith(("500", "503")) for k in churn)
    assert after < 1.5 * before


def test_64_clients_streaming_and_not_while_adapters_come_and_go(tiny_server):
    _check_and_report(asyncio.run(_run(tiny_server.url, clients=64, rounds=4)), 64, 4)


@pytest.mark.long
def test_256_clients_streaming_and_not_while_adapters_come_and_go(tiny_server):
    _check_and_report(asyncio.run(_run(tiny_server.url, clients=256, rounds=8)), 256, 8)


def test_stream_for_an_adapter_unloaded_while_queued_is_a_404_not_a_200(tiny_server, monkeypatch):
    """Regression: a streamed request whose adapter was unloaded while it waited for the worker got
    HTTP 200 and then an error event; the status now says what happened, since no token was sent."""
    import threading

    url, engine = tiny_server.url, tiny_server.engine
    name = TINY_RUNTIME[2]
    assert httpx.post(url + "/v1/load_lora_adapter", headers=AUTH,
                      json={"lora_name": name, "lora_path": name}).status_code == 200
    replies, submitted = [], []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda request: submitted.append(request) or submit(request))

    def ask():
        body = _body(False, name, PROMPTS[0], stream=True)
        with httpx.stream("POST", url + "/v1/completions", headers=AUTH, json=body, timeout=60) as reply:
            replies.append((reply.status_code, reply.read()))

    with engine.lock:  # the worker cannot start a batch: the request waits
        thread = threading.Thread(target=ask)
        thread.start()
        deadline = time.monotonic() + 20
        while (not submitted or engine.waiting()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert submitted and not engine.waiting()  # taken by the worker, which now waits for the lock
        engine.multi.delete_adapter(name)  # what unload does, under the same lock
    thread.join(timeout=30)
    status, body = replies[0]
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found", (status, body[:300])


def test_a_full_queue_is_503_with_a_reason(tiny_server):
    limits = tiny_server.limits
    saved, limits.max_waiting = limits.max_waiting, 0  # read per request
    try:
        reply = httpx.post(tiny_server.url + "/v1/completions", headers=AUTH, json=_body(False, "tiny", "Hi", False))
    finally:
        limits.max_waiting = saved
    assert reply.status_code == 503
    error = reply.json()["error"]
    assert error["code"] == "overloaded" and "retry" in error["message"] and error["type"] == "server_error"
