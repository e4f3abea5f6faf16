"""While rows decode, the engine prefills at most ``prefill_tokens`` prompt tokens per step: a
burst of arrivals joins over several steps (in arrival order, the first always joining), and
every answer still equals that adapter alone (greedy)."""

from __future__ import annotations

import asyncio

from server_setup import TINY_FIXED
from test_continuous_batching import _alone

from lorakit.inference.batched import GenerationRequest


async def _answer(job) -> str:
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value.text
        if kind == "error":
            raise value


async def _burst_beside_a_long_answer(engine, prompts):
    long_job = engine.submit(GenerationRequest(engine.tokenizer("Once upon a time")["input_ids"], TINY_FIXED[0], 60,
                                               ignore_eos=True))
    while engine.running == 0:  # the long answer is decoding
        await asyncio.sleep(0.001)
    jobs = [engine.submit(GenerationRequest(engine.tokenizer(p)["input_ids"], TINY_FIXED[i % 2], 4))
            for i, p in enumerate(prompts)]
    texts = await asyncio.gather(*(_answer(job) for job in jobs))
    await _answer(long_job)
    return jobs, texts


def test_a_burst_joins_over_several_steps_within_the_budget_and_answers_are_unchanged(budget_engine):
    engine = budget_engine
    prompts = [f"The number {i} is bigger than" for i in range(6)]  # 6 tokens or more each
    jobs, texts = asyncio.run(_burst_beside_a_long_answer(engine, prompts))
    started = [job.started_step for job in jobs]
    assert started == sorted(started)  # arrival order
    assert len(set(started)) >= 3  # 6 prompts of >= 6 tokens under a 12-token budget: >= 3 steps
    for step in set(started):
        tokens = [len(job.request.prompt_ids) for job in jobs if job.started_step == step]
        assert sum(tokens) <= engine.prefill_tokens or len(tokens) == 1
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        assert text == _alone(engine, prompt, TINY_FIXED[i % 2], 4)
