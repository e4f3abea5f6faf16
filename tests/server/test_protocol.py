"""Request validation and the adapter-root rule, without a server."""

from __future__ import annotations

import pytest

from lorakit.server.app import _under_root
from lorakit.server.protocol import ApiError, Limits, parse_sampling


def test_adapter_path_must_stay_under_root(tmp_path):
    root = tmp_path / "root"
    (root / "good").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert _under_root(root, "good") == (root / "good").resolve()
    assert _under_root(root, str(root / "good")) == (root / "good").resolve()
    for bad in ["../outside", "good/../../outside", str(tmp_path / "outside"), "link", ".", "", "good\x00"]:
        with pytest.raises(ApiError) as err:
            _under_root(root, bad)
        assert err.value.status == 400 and err.value.param == "lora_path", bad
    with pytest.raises(ApiError, match="--adapter-root"):
        _under_root(None, "good")


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("max_tokens", 65), ("max_tokens", True),
                                          ("temperature", -1), ("temperature", 2.5), ("top_p", 0),
                                          ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("n", 2),
                                          ("logprobs", True), ("presence_penalty", 0.5), ("seed", "x")])
def test_invalid_sampling_is_400_naming_the_field(field, value):
    with pytest.raises(ApiError) as err:
        parse_sampling({"model": "m", field: value}, Limits(max_tokens=64))
    assert err.value.status == 400 and err.value.param == field
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_defaults():
    sampling = parse_sampling({"model": "m", "stop": "###", "max_completion_tokens": 5}, Limits())
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.stop) == (5, 1.0, 1.0, ["###"])


@pytest.mark.parametrize("seed", [10**25, -(2**63) - 1, 2**64])
def test_seed_outside_the_generator_range_is_400_not_a_failed_batch(seed):
    """Found by issue 14: one request with seed 10**25 made every row of its batch fail with HTTP 500."""
    with pytest.raises(ApiError) as err:
        parse_sampling({"model": "m", "seed": seed}, Limits())
    assert err.value.status == 400 and err.value.param == "seed"
    for ok in (0, -(2**63), 2**64 - 1):
        assert parse_sampling({"model": "m", "seed": ok}, Limits()).seed == ok


def test_lone_surrogate_in_chat_or_prompt_is_400(smol_tokenizer):
    from lorakit.server.protocol import chat_prompt_ids, completion_prompt_ids

    with pytest.raises(ApiError) as err:
        chat_prompt_ids({"messages": [{"role": "user", "content": "a\ud800b"}]}, smol_tokenizer)
    assert err.value.status == 400 and err.value.param == "messages[0].content"
    with pytest.raises(ApiError) as err:
        completion_prompt_ids({"prompt": "a\udfffb"}, smol_tokenizer)
    assert err.value.status == 400 and err.value.param == "prompt" and "lone surrogate at position 1" in str(err.value)
    with pytest.raises(ApiError, match="role system, developer, user or assistant"):
        chat_prompt_ids({"messages": [{"role": "tool", "content": "x"}]}, smol_tokenizer)
    assert chat_prompt_ids({"messages": [{"role": "developer", "content": "ok é"}]}, smol_tokenizer)
