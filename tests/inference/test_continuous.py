"""Continuous batching: rows join a running batch and leave it at any step, over every adapter
kind; each row's tokens equal that adapter alone (greedy), whatever else runs beside it."""

from __future__ import annotations

import pytest
import torch
from test_batched_generate import _Tokens
from test_mixed_kinds import mixed_kinds_model
from tiny_models import tiny_model

from lorakit.inference import MultiAdapterModel
from lorakit.inference import continuous as continuous_module
from lorakit.inference.batched import GenerationRequest
from lorakit.inference.continuous import ContinuousBatcher


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def multi(request, tmp_path_factory):
    multi = mixed_kinds_model(request.param, tmp_path_factory.mktemp(request.param))
    multi.model.generation_config.eos_token_id = None
    return multi


def _alone(multi, prompt, adapter, n):
    multi.set_adapter(adapter)
    try:
        ids = torch.tensor([prompt])
        out = multi.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
    finally:
        multi.set_adapter(None)
    return out[0, len(prompt):].tolist()


ARRIVALS = [  # (step it arrives at, prompt, adapter, max_new_tokens)
    (0, [5, 9, 30, 41], "dora", 9), (0, [7, 8], None, 3), (2, [100, 3, 3, 60, 61, 62, 63], "mts", 6),
    (3, [12], "ada", 5), (3, [50, 51, 52], "pissa", 7), (4, [9, 9, 9, 9, 9], "lora", 4), (8, [77, 6], "rslora", 5),
]


def test_rows_joining_and_leaving_a_running_batch_equal_each_alone(multi):
    batcher = ContinuousBatcher(multi, _Tokens(), max_rows=3)
    waiting = [(at, batcher.new_row(GenerationRequest(p, a, n))) for at, p, a, n in ARRIVALS]
    rows = [state for _, state in waiting]
    running, joined_at, step = [], {}, 0
    while waiting or batcher.running:
        arrived = [state for at, state in waiting if at <= step]
        joining = []
        for state in arrived:  # arrival order, as many as fit (the engine's rule)
            if not batcher.has_room([s.request for s in joining] + [state.request]):
                break
            joining.append(state)
        waiting = [(at, s) for at, s in waiting if s not in joining]
        for state in joining:
            joined_at[id(state)] = step
        batcher.step(joining)
        running.append(batcher.running)
        step += 1
    assert max(running) == 3  # the cap on rows held
    assert joined_at[id(rows[2])] == 2 and joined_at[id(rows[0])] == 0  # joined while row 0 was mid-answer
    for (_, prompt, adapter, n), state in zip(ARRIVALS, rows):
        assert state.tokens == _alone(multi, prompt, adapter, n), adapter
        assert state.finish_reason == "length"


def test_a_cancelled_row_leaves_at_the_next_step(multi):
    batcher = ContinuousBatcher(multi, _Tokens(), max_rows=4)
    cancelled = []
    quit_early = batcher.new_row(GenerationRequest([5, 6, 7], "dora", 50, is_cancelled=lambda: bool(cancelled)))
    stays = batcher.new_row(GenerationRequest([5, 6, 7], "mts", 6))
    batcher.step([quit_early, stays])
    batcher.step()
    cancelled.append(True)
    left = batcher.step()
    assert left == [quit_early] and quit_early.finish_reason == "cancelled" and batcher.running == 1
    while batcher.running:
        batcher.step()
    assert stays.tokens == _alone(multi, [5, 6, 7], "mts", 6)


def test_kv_cap_limits_rows_and_weights_are_gathered_once_per_row_set(multi, monkeypatch):
    batcher = ContinuousBatcher(multi, _Tokens(), max_rows=8)
    per_position = batcher.kv_cache().bytes_per_position
    batcher.max_kv_bytes = batcher.cache.max_bytes = 2 * 20 * per_position  # two rows of 20 positions
    request = GenerationRequest([1, 2, 3, 4], "dora", 16)  # 20 positions
    assert batcher.has_room([request, request]) and not batcher.has_room([request] * 3)
    assert batcher.fits_alone(request) and not batcher.fits_alone(GenerationRequest([1] * 30, "dora", 16))
    built = []
    original = continuous_module.MixedRows
    monkeypatch.setattr(continuous_module, "MixedRows", lambda *a: built.append(1) or original(*a))
    row = batcher.new_row(request)
    batcher.step([row])  # one prefill (its own per-row set)
    for _ in range(10):
        batcher.step()  # the same rows: no new gather
    assert len(built) == 2 and len(row.tokens) == 11
    assert batcher.cache.rows * batcher.cache.positions * per_position <= batcher.max_kv_bytes


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma", "phi3"])
def test_other_architectures_join_and_leave_exactly(arch, tmp_path):
    """The slot cache and its 4D mask work wherever the model's attention calls cache.update."""
    from test_mixed_batch import _save_adapters

    multi = MultiAdapterModel(tiny_model(arch))
    for name, directory in _save_adapters(arch, tmp_path).items():
        multi.add_adapter(name, directory)
    multi.model.generation_config.eos_token_id = None
    batcher = ContinuousBatcher(multi, _Tokens(), max_rows=4)
    first = batcher.new_row(GenerationRequest([5, 9, 30], "a", 6))
    later = batcher.new_row(GenerationRequest([7, 8, 1, 2, 3], "c", 3))
    batcher.step([first])
    batcher.step()
    batcher.step([later])
    while batcher.running:
        batcher.step()
    assert first.tokens == _alone(multi, [5, 9, 30], "a", 6) and later.tokens == _alone(multi, [7, 8, 1, 2, 3], "c", 3)


def test_a_bf16_base_with_fp32_adapters_decodes_like_each_alone(tmp_path):
    """What ``lorakit serve --dtype auto`` runs on a host with native bf16: the KV cache and mask
    follow the base's dtype, the adapters stay fp32 and the mixed path casts around them."""
    from test_mixed_batch import _save_adapters

    multi = MultiAdapterModel(tiny_model("llama").to(torch.bfloat16))
    for name, directory in _save_adapters("llama", tmp_path).items():
        multi.add_adapter(name, directory)
    multi.model.generation_config.eos_token_id = None
    assert multi.lora.adapter_layers()[0][1].lora_A["a"].weight.dtype == torch.float32
    batcher = ContinuousBatcher(multi, _Tokens(), max_rows=4)
    rows = [batcher.new_row(GenerationRequest(p, a, 5)) for p, a in [([5, 9, 30], "a"), ([7, 8], "d"), ([4], None)]]
    batcher.step(rows[:2])
    batcher.step(rows[2:])
    while batcher.running:
        batcher.step()
    assert batcher.cache.keys[0].dtype == torch.bfloat16
    for row, (prompt, adapter) in zip(rows, [([5, 9, 30], "a"), ([7, 8], "d"), ([4], None)]):
        assert row.tokens == _alone(multi, prompt, adapter, 5), adapter


def _windowed(arch):
    """Tiny Mistral (one window for every layer) and Qwen2 (sliding and full layers mixed), both
    with a window of 3 positions, shorter than the rows below."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from tiny_models import _COMMON

    torch.manual_seed(0)
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=3)).eval()
    config = Qwen2Config(**dict(_COMMON, num_hidden_layers=3), use_sliding_window=True, sliding_window=3,
                         max_window_layers=1)
    assert set(config.layer_types) == {"full_attention", "sliding_attention"}
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_models_decode_like_each_alone(arch, tmp_path):
    multi = MultiAdapterModel(_windowed(arch))
    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = get_peft_model(_windowed(arch), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False), "a")
    lora.save_pretrained(tmp_path / "a", selected_adapters=["a"])
    multi.add_adapter("a", tmp_path / "a" / "a" if (tmp_path / "a" / "a").is_dir() else tmp_path / "a")
    multi.model.generation_config.eos_token_id = None
    batcher = ContinuousBatcher(multi, _Tokens(), max_rows=4)
    asks = [([5, 9, 30, 41, 7], "a", 8), ([7, 8], None, 6), ([3, 4, 5, 6, 7, 8], "a", 7)]
    rows = [batcher.new_row(GenerationRequest(p, a, n)) for p, a, n in asks]
    batcher.step(rows[:1])
    batcher.step(rows[1:])
    while batcher.running:
        batcher.step()
    for row, (prompt, adapter, n) in zip(rows, asks):
        assert row.tokens == _alone(multi, prompt, adapter, n), adapter
    # without the window the answers differ: the test can tell
    batcher = ContinuousBatcher(multi, _Tokens(), max_rows=4)
    batcher.windows = None
    unwindowed = batcher.new_row(GenerationRequest(*asks[0]))
    batcher.step([unwindowed])
    while batcher.running:
        batcher.step()
    assert unwindowed.tokens != rows[0].tokens


def test_joining_prompts_are_prefilled_together_within_the_token_budget(multi, monkeypatch):
    monkeypatch.setattr(continuous_module, "PREFILL_TOKENS", 8)
    batcher = ContinuousBatcher(multi, _Tokens(), max_rows=8)
    asks = [([5, 9, 30, 41], "dora", 4), ([7, 8], "mts", 3), ([1, 2, 3, 4, 5, 6, 7], None, 5), ([12], "ada", 4)]
    rows = [batcher.new_row(GenerationRequest(p, a, n)) for p, a, n in asks]
    groups = batcher._prefill_groups(rows)
    assert [[len(s.request.prompt_ids) for s in g] for g in groups] == [[4, 2], [7], [1]]  # 4 x 2 <= 8 < 7 x 2
    forwards = []
    original = batcher._prefill
    monkeypatch.setattr(batcher, "_prefill", lambda states: forwards.append(len(states)) or original(states))
    batcher.step(rows)
    while batcher.running:
        batcher.step()
    assert forwards == [2, 1, 1]
    for row, (prompt, adapter, n) in zip(rows, asks):
        assert row.tokens == _alone(multi, prompt, adapter, n), adapter
