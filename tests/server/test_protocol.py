"""Request validation and the adapter-root rule, without a server."""

from __future__ import annotations

import pytest

from lorakit.server.adapter_paths import under_root as _under_root
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


def test_adapter_paths_that_cannot_be_resolved_are_400_not_500(tmp_path):
    """Found by the schema fuzzing: a 5,000-character lora_path raised OSError (File name too long),
    a symlink loop RuntimeError and a lone surrogate UnicodeEncodeError, each an HTTP 500."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    for bad in ["a" * 5000, "a/" * 2000, "x" * 300, "loop1", "loop1/sub", "\ud800", "ok\udcff"]:
        with pytest.raises(ApiError) as err:
            _under_root(root, bad)
        assert err.value.status == 400 and err.value.param == "lora_path", bad[:20]
        assert len(err.value.message) < 300 and str(tmp_path) not in err.value.message


def test_adapter_directory_with_links_out_of_the_root_is_refused(tmp_path):
    """An adapter directory inside the root whose adapter_config.json or weights file is a symlink
    to a file outside the root was accepted, and the file outside was read."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    outside.mkdir()
    (outside / "adapter_model.safetensors").write_bytes(b"secret")
    (root / "inner" / "adapter_config.json").write_text("{}")
    (root / "inner" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(ApiError, match=r"links that lead outside the adapter root \('adapter_model.safetensors'\)"):
        _under_root(root, "inner")
    (root / "other").mkdir()
    (root / "other" / "adapter_model.safetensors").symlink_to(root / "inner" / "adapter_config.json")
    assert _under_root(root, "other") == (root / "other").resolve()  # a link that stays inside is fine


@pytest.mark.parametrize("body", [b"[" * 20_000, b'{"a":' * 5_000, b'{"seed": ' + b"9" * 5_000 + b"}",
                                  b'{"temperature": NaN}', b'{"top_p": -Infinity}'])
def test_json_python_cannot_or_should_not_parse_is_400(body):
    """Found while testing malformed bodies: deep nesting raised RecursionError and an integer of
    more than 4,300 digits ValueError, both HTTP 500; NaN and Infinity are not JSON."""
    from lorakit.server.protocol import parse_json

    with pytest.raises(ApiError) as err:
        parse_json(body)
    assert err.value.status == 400 and err.value.message.startswith("request body is not valid JSON: ")
    assert "sys." not in err.value.message and len(err.value.message) < 200


def test_conversation_the_chat_template_refuses_is_400(smol_tokenizer):
    """A template that raises for some conversations (many insist that roles alternate) made
    render_chat raise BadRow, which the server answered with HTTP 500."""
    import copy

    from lorakit.server.protocol import chat_prompt_ids

    strict = copy.deepcopy(smol_tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    assert chat_prompt_ids({"messages": [{"role": "user", "content": "hi"}]}, strict)
    with pytest.raises(ApiError) as err:
        chat_prompt_ids({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, strict)
    assert err.value.status == 400 and err.value.param == "messages" and "roles must alternate" in err.value.message


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_bodies_that_are_not_json_by_content_type_are_415(content_type):
    from lorakit.server.protocol import check_media_type

    with pytest.raises(ApiError) as err:
        check_media_type(content_type)
    assert err.value.status == 415 and "application/json" in err.value.message
    for fine in [None, "application/json", "application/json; charset=utf-8", "Application/JSON", "application/merged+json"]:
        check_media_type(fine)


def test_client_strings_in_error_messages_stay_on_one_line(tmp_path):
    """Found by the long schema fuzzing: a lora_name or lora_path with a newline was echoed as is,
    making a two-line error message; and "name\\n" passed the adapter-name check ('$' matches
    before a final newline), so such an adapter could be loaded."""
    from lorakit.errors import LorakitError
    from lorakit.inference.multi_adapter import check_adapter_name
    from lorakit.server.protocol import not_found_model, quoted

    for name in ["a0\n", "a0\r", "a\nb", "\na0"]:
        with pytest.raises(LorakitError):
            check_adapter_name(name)
    check_adapter_name("org/name-1.5:v2")
    (tmp_path / "ok").mkdir()
    with pytest.raises(ApiError) as err:
        _under_root(tmp_path, "x\ny\x1b[31m")
    assert "\n" not in err.value.message and "\x1b" not in err.value.message and "'x\\ny\\x1b[31m'" in err.value.message
    assert "\n" not in not_found_model("a\nb", ["m"]).message
    assert quoted("z" * 500).endswith("'...") and len(quoted("z" * 500)) < 210 and quoted(["a"]) == "'[\"a\"]'"


def test_serving_dtype_auto_follows_the_measured_probe():
    import torch

    from lorakit.hardware import HostProbe
    from lorakit.server.run import serving_dtype

    def probe(bf16_gflops):
        return HostProbe(cpu="test", capability="AVX512", bf16_instructions=True, threads=2, fp32_gflops=100.0,
                         bf16_gflops=bf16_gflops, memory_gbps=10.0, torch_version=torch.__version__)

    assert serving_dtype("auto", probe=probe(300.0)) == "bfloat16"  # native and faster
    assert serving_dtype("auto", probe=probe(110.0)) == "float32"  # native, not faster enough
    assert serving_dtype("auto", probe=probe(0.3)) == "float32"  # emulated
    assert serving_dtype("float16", probe=probe(300.0)) == "float16" and serving_dtype("auto", "cuda") == "float32"
