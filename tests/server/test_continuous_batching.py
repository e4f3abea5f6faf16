"""Continuous batching over real HTTP: a request joins a running generation at its next step,
requests beyond the row cap wait in arrival order, and a client that hangs up frees its row.
Answers are compared with what that adapter generates alone (transformers, greedy)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from server_setup import API_KEY, TINY_FIXED

AUTH = {"Authorization": f"Bearer {API_KEY}"}

pytestmark = pytest.mark.usefixtures("no_server_errors")


def _alone(engine, prompt: str, adapter, max_tokens: int) -> str:
    """What ``adapter`` (None: the base) answers alone, greedily: transformers' generate, one row."""
    ids = engine.tokenizer(prompt)["input_ids"]
    with engine.lock:
        engine.multi.set_adapter(adapter)
        try:
            tensor = torch.tensor([ids])
            out = engine.multi.model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor),
                                              do_sample=False, max_new_tokens=max_tokens,
                                              pad_token_id=engine.tokenizer.pad_token_id)
        finally:
            engine.multi.set_adapter(None)
    return engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def _capture_jobs(engine, monkeypatch) -> list:
    jobs, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda request: jobs.append(submit(request)) or jobs[-1])
    return jobs


def _body(model, prompt, max_tokens, stream=False):
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def _stream_chunks(lines):
    """(arrival time, text) of each SSE text chunk in ``lines``, and the finish_reason."""
    chunks, finish = [], None
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        finish = choice["finish_reason"] or finish
        chunks.append((time.monotonic(), choice["text"]))
    return chunks, finish


def test_a_request_sent_mid_generation_starts_before_the_first_ends(two_row_server, monkeypatch):
    url, engine = two_row_server.url, two_row_server.engine
    jobs = _capture_jobs(engine, monkeypatch)
    long_prompt, short_prompt = "Once upon a time", "The sky is"
    replies = {}

    def ask_short():
        reply = httpx.post(url + "/v1/completions", headers=AUTH, json=_body(TINY_FIXED[1], short_prompt, 5),
                           timeout=60)
        replies["short"] = (time.monotonic(), reply)

    chunks = []
    with httpx.stream("POST", url + "/v1/completions", headers=AUTH, timeout=60,
                      json=_body(TINY_FIXED[0], long_prompt, 300, stream=True)) as reply:
        lines = reply.iter_lines()
        while len(chunks) < 3:  # the long answer is under way
            line = next(lines)
            if line.startswith("data: "):
                chunks.append(line)
        asker = threading.Thread(target=ask_short)
        asker.start()
        rest, finish = _stream_chunks(lines)
        asker.join(timeout=60)
    long_text = "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks) + "".join(t for _, t in rest)
    short_done, short_reply = replies["short"]
    assert short_reply.status_code == 200 and finish == "length"
    assert short_done < rest[-1][0]  # the short answer was complete before the long one ended
    long_job, short_job = jobs
    assert long_job.started_step < short_job.started_step < short_job.finished_step < long_job.finished_step
    assert short_reply.json()["choices"][0]["text"] == _alone(engine, short_prompt, TINY_FIXED[1], 5)
    assert long_text == _alone(engine, long_prompt, TINY_FIXED[0], 300)


def test_requests_beyond_the_row_cap_wait_in_arrival_order_and_all_complete(two_row_server, monkeypatch):
    url, engine = two_row_server.url, two_row_server.engine
    jobs = _capture_jobs(engine, monkeypatch)
    asks = [(TINY_FIXED[i % 4], f"Number {i} is", 6 + i) for i in range(6)]
    replies = [None] * len(asks)

    def ask(i):
        model, prompt, n = asks[i]
        replies[i] = httpx.post(url + "/v1/completions", headers=AUTH, json=_body(model, prompt, n), timeout=60)

    engine.peak_rows = 0
    threads = []
    for i in range(len(asks)):  # a known arrival order
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while len(jobs) <= i and time.monotonic() < deadline:
            time.sleep(0.001)
    for thread in threads:
        thread.join(timeout=60)
    assert engine.peak_rows == 2  # the cap held, and rows did run together
    started = [job.started_step for job in jobs]
    assert started == sorted(started) and len(jobs) == len(asks)  # first come, first served
    for (model, prompt, n), reply in zip(asks, replies):
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == _alone(engine, prompt, model, n)


def _wait_for_no_rows(engine, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    return not engine.running


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(two_row_server, monkeypatch, stream):
    url, engine = two_row_server.url, two_row_server.engine
    jobs = _capture_jobs(engine, monkeypatch)
    body = _body(TINY_FIXED[2], "Tell me a long story", 400, stream=stream)
    if stream:
        with httpx.stream("POST", url + "/v1/completions", headers=AUTH, json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            while not next(lines).startswith("data: "):
                pass
        # leaving the block closed the connection after the first chunk
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", headers=AUTH, json=body, timeout=httpx.Timeout(60, read=0.3))
    assert _wait_for_no_rows(engine)
    (job,) = jobs
    assert job.cancelled and job.finished_step - job.started_step < 400  # it left before its 400 tokens
    after = httpx.post(url + "/v1/completions", headers=AUTH, json=_body(TINY_FIXED[3], "Hello", 4), timeout=60)
    assert after.status_code == 200  # the freed row serves the next request
