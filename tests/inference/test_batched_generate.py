"""Batched generation across adapters: each row equals that adapter alone, greedily."""

from __future__ import annotations

import torch
from test_mixed_batch import _save_adapters
from tiny_models import tiny_model

from lorakit.inference import MultiAdapterModel
from lorakit.inference.batched import GenerationRequest, generate_batch


class _Tokens:
    """A stand-in tokenizer for tiny models: token t decodes to "<t>"."""

    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{t}>" for t in ids)


def _multi(tmp_path):
    multi = MultiAdapterModel(tiny_model("llama"))
    for name, directory in _save_adapters("llama", tmp_path).items():
        multi.add_adapter(name, directory)
    multi.model.generation_config.eos_token_id = None
    return multi


def _alone(multi, prompt, adapter, n):
    multi.set_adapter(adapter)
    ids = torch.tensor([prompt])
    out = multi.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_rows_of_different_lengths_and_adapters_equal_each_alone(tmp_path):
    multi = _multi(tmp_path)
    prompts = [[5, 9, 30, 41], [7, 8], [100, 3, 3, 60, 61, 62, 63], [12], [50, 51, 52]]
    adapters = ["a", "b", None, "c", "d"]
    lengths = [6, 3, 6, 1, 4]  # rows leave the batch at different steps
    streamed = [[] for _ in prompts]
    requests = [GenerationRequest(p, a, n, on_text=streamed[i].append)
                for i, (p, a, n) in enumerate(zip(prompts, adapters, lengths))]
    results = generate_batch(multi, _Tokens(), requests)
    for i, (prompt, adapter, n) in enumerate(zip(prompts, adapters, lengths)):
        assert results[i].token_ids == _alone(multi, prompt, adapter, n)
        assert results[i].finish_reason == "length" and results[i].prompt_tokens == len(prompt)
        assert "".join(streamed[i]) == results[i].text == _Tokens().decode(results[i].token_ids)


def test_stop_string_eos_and_sampling(tmp_path):
    multi = _multi(tmp_path)
    free = generate_batch(multi, _Tokens(), [GenerationRequest([5, 9, 30], "a", 6)])[0]
    third = f"<{free.token_ids[2]}>"
    stopped = generate_batch(multi, _Tokens(), [GenerationRequest([5, 9, 30], "a", 6, stop=[third])])[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.find(third)]
    eos = _Tokens()
    eos.eos_token_id = free.token_ids[1]
    ended = generate_batch(multi, eos, [GenerationRequest([5, 9, 30], "a", 6)])[0]
    assert ended.finish_reason == "stop" and ended.token_ids == free.token_ids[:1]
    sampled = [generate_batch(multi, _Tokens(), [GenerationRequest([5, 9], "b", 8, temperature=5.0, seed=s)])[0]
               for s in (1, 1, 2)]
    assert sampled[0].token_ids == sampled[1].token_ids != sampled[2].token_ids
    narrow = generate_batch(multi, _Tokens(), [GenerationRequest([5, 9], "b", 8, temperature=5.0, top_p=1e-6,
                                                                seed=3)])[0]
    assert narrow.token_ids == _alone(multi, [5, 9], "b", 8)  # top_p -> 0 keeps only the argmax


def test_subnormal_top_p_or_temperature_is_greedy_not_a_failed_batch(tmp_path):
    """Found by the server's schema fuzzing: top_p = 5e-324 rounds to 0.0 in float32, which
    removed every token (multinomial on all zeros), and a temperature that small divides the
    logits by 0; either failed the whole batch (HTTP 500 for every row in it)."""
    multi = _multi(tmp_path)
    greedy = _alone(multi, [5, 9], "b", 6)
    for temperature, top_p in [(1.0, 5e-324), (5e-324, 1.0), (1e-30, 0.5), (5e-6, 1.0)]:
        row = generate_batch(multi, _Tokens(), [GenerationRequest([5, 9], "b", 6, temperature=temperature,
                                                                 top_p=top_p, seed=1)])[0]
        assert row.token_ids == greedy, (temperature, top_p)
