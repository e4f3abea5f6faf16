"""Prefix tuning against peft's PeftModelForCausalLM (the reference) on the same prefix weights:
logits and loss, files both ways, generation with a KV cache, training, the projection MLP.

peft's own ``generate`` is not the reference for generation: with transformers 5 it hands the
prefix to the model under the old ``past_key_values`` name next to generate's ``cache`` and the
prefix is dropped (on Llama it generates what the base model generates). Generation is checked
against greedy steps over full forwards instead, whose logits are checked against peft's.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tiny_models import FP32_ATOL, sample_input_ids, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from lorakit import get_peft_model, load_adapter
from lorakit.adapters.prefix import PrefixModel, PrefixTuningConfig
from lorakit.errors import LorakitError

ARCHS = ["llama", "qwen2", "gpt2"]
TOKENS = 4


def _pair(arch: str, **options):
    """(lorakit model, peft model) on the same tiny base with the same prefix encoder weights."""
    ref = peft.get_peft_model(tiny_model(arch), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=TOKENS, **options)).eval()
    ours = get_peft_model(tiny_model(arch), PrefixTuningConfig(num_virtual_tokens=TOKENS, **options)).eval()
    state = {k.removeprefix("prompt_encoder.default."): v for k, v in ref.state_dict().items()
             if k.startswith("prompt_encoder.default.")}
    ours.prompt_encoder["default"].load_state_dict(state)
    return ours, ref


def _gpt2_with_layers(n_layer: int):
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_head=4, n_positions=64, n_layer=n_layer,
                                      bos_token_id=1, eos_token_id=2))


def _padded_mask(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 left-padded
    return mask


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_loss_equal_pefts_on_the_same_prefix(arch, padded):
    ours, ref = _pair(arch)
    ids = sample_input_ids()
    kwargs = {"attention_mask": _padded_mask(ids)} if padded else {}
    with torch.no_grad():
        got, want = ours(input_ids=ids, labels=ids, **kwargs), ref(input_ids=ids, labels=ids, **kwargs)
    torch.testing.assert_close(got.logits, want.logits, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=FP32_ATOL, rtol=0)
    with ours.disable_adapter():
        assert not torch.allclose(_logits(ours, ids, **kwargs), got.logits, atol=1e-3)  # the prefix matters


def test_explicit_position_ids_are_shifted_as_peft_shifts_them():
    ours, ref = _pair("llama")
    ids = sample_input_ids()
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    torch.testing.assert_close(_logits(ours, ids, position_ids=positions), _logits(ref, ids, position_ids=positions),
                               atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(_logits(ours, ids, position_ids=positions), _logits(ours, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_samples_see_the_prefix_and_not_each_other(arch):
    """A packed row (no attention_mask, position_ids restarting at each sample, as lorakit packs)
    gives each sample the logits it has alone: transformers separates packed samples only
    without a cache, so the wrapper builds the mask over [prefix; tokens]."""
    ours, _ = _pair(arch)
    a, b, c = sample_input_ids(batch=3, length=6).unbind(0)
    packed = torch.stack([torch.cat([a, c]), torch.cat([b, c])])                    # (2, 12)
    positions = torch.cat([torch.arange(6), torch.arange(6)]).expand(2, -1)
    alone = _logits(ours, c[None])
    got = _logits(ours, packed, position_ids=positions)
    for row in (0, 1):
        torch.testing.assert_close(got[row, 6:], alone[0], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(got[0, :6], _logits(ours, a[None])[0], atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_config_is_filled_from_the_model_as_peft_fills_it(arch):
    """GQA (llama, qwen2): the prefix has the key/value heads' shape, token_dim = kv_heads x head_dim."""
    ours, ref = _pair(arch)
    written = ours.peft_config["default"].to_dict()
    metadata = ("auto_mapping", "peft_version")
    expected = {k: v for k, v in ref.peft_config["default"].to_dict().items() if k not in metadata}
    assert written == expected
    config = tiny_model(arch).config
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    assert (written["num_attention_heads"], written["token_dim"]) == (kv_heads, kv_heads * 8)  # head_dim 8
    ids = sample_input_ids()
    with torch.no_grad():
        cache = ours(input_ids=ids, use_cache=True).cache
    assert tuple(cache.layers[0].keys.shape) == (2, kv_heads, TOKENS + ids.shape[1], 8)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_what_we_save(arch, tmp_path):
    ours, _ = _pair(arch)
    ids = sample_input_ids()
    ours.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {"prompt_embeddings"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_we_load_what_peft_saves(arch, tmp_path):
    _, ref = _pair(arch)
    ids = sample_input_ids()
    ref.save_pretrained(tmp_path)
    loaded = load_adapter(tiny_model(arch), tmp_path)
    assert isinstance(loaded, PrefixModel)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    mask = _padded_mask(ids)
    torch.testing.assert_close(_logits(loaded, ids, attention_mask=mask), _logits(ref, ids, attention_mask=mask),
                               atol=FP32_ATOL, rtol=0)
    trainable = load_adapter(tiny_model(arch), tmp_path, is_trainable=True)
    trained = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert trained == ["prompt_encoder.default.embedding.weight"]


def _greedy_by_full_forwards(model, ids, steps):
    """Greedy decoding with no cache: each step a full forward over the whole sequence."""
    seq = ids
    for _ in range(steps):
        seq = torch.cat([seq, _logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_with_the_cache_equals_greedy_full_forwards(arch):
    ours, _ = _pair(arch)
    ids = sample_input_ids()
    expected = _greedy_by_full_forwards(ours, ids, 6)
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=6, do_sample=False), expected)
    no_cache = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             use_cache=False)
    assert torch.equal(no_cache, expected)
    assert "prepare_inputs_for_generation" not in vars(ours.model)  # the generation hook is undone
    with ours.disable_adapter():
        assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=6, do_sample=False),
                           tiny_model(arch).generate(input_ids=ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_generates_what_each_row_generates_alone(arch):
    ours, _ = _pair(arch)
    ids = sample_input_ids()
    mask = _padded_mask(ids)
    batch = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    alone = ours.generate(input_ids=ids[:1, 3:], max_new_tokens=5, do_sample=False)
    assert torch.equal(batch[0, 3:], alone[0])


@pytest.mark.parametrize("projection", [False, True], ids=["flat", "projection"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_training_step_changes_only_the_prefix_and_matches_pefts_gradient(arch, projection):
    ours, ref = _pair(arch, prefix_projection=projection)
    ids = sample_input_ids()
    ours.train(), ref.train()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for model in (ours, ref):
        torch.manual_seed(0)  # the same dropout masks (GPT-2 has dropout in training mode)
        model(input_ids=ids, labels=ids).loss.backward()
    ref_grads = {n.removeprefix("prompt_encoder.default."): p.grad for n, p in ref.named_parameters()
                 if p.requires_grad}
    for name, param in ours.prompt_encoder["default"].named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], atol=FP32_ATOL, rtol=0)
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {f"prompt_encoder.default.{n}" for n, _ in ours.prompt_encoder["default"].named_parameters()}
    assert {id(p) for p in ours.trainable_tensors().values()} == {id(p) for p in ours.parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_projection_round_trip(arch, tmp_path):
    """The files hold the MLP's output (as peft saves it); a checkpoint holds the MLP itself."""
    ours, ref = _pair(arch, prefix_projection=True)
    ids = sample_input_ids()
    expected = _logits(ours, ids)
    ours.save_pretrained(tmp_path / "adapter")
    assert tuple(load_file(tmp_path / "adapter" / "adapter_model.safetensors")["prompt_embeddings"].shape) == \
        (TOKENS, 2 * 2 * ours.peft_config["default"].token_dim)
    torch.testing.assert_close(_logits(load_adapter(tiny_model(arch), tmp_path / "adapter"), ids), expected,
                               atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(tiny_model(arch), tmp_path / "adapter"), ids),
                               expected, atol=FP32_ATOL, rtol=0)
    ref.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(_logits(load_adapter(tiny_model(arch), tmp_path / "peft"), ids), expected,
                               atol=FP32_ATOL, rtol=0)
    with pytest.raises(LorakitError, match="prefix_projection"):
        load_adapter(tiny_model(arch), tmp_path / "adapter", is_trainable=True)

    ours.save_checkpoint_files(tmp_path / "ckpt")
    resumed = get_peft_model(tiny_model(arch), PrefixTuningConfig(num_virtual_tokens=TOKENS, prefix_projection=True))
    resumed.load_checkpoint_files(tmp_path / "ckpt")
    for name, param in ours.trainable_tensors().items():
        assert torch.equal(resumed.trainable_tensors()[name], param), name  # the MLP, exactly
    torch.testing.assert_close(_logits(load_adapter(tiny_model(arch), tmp_path / "ckpt"), ids), expected,
                               atol=FP32_ATOL, rtol=0)  # a checkpoint is also a usable adapter


def test_bad_adapter_files_are_refused_naming_the_tensor(tmp_path):
    ours, _ = _pair("llama")
    ours.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    good = load_file(weights)["prompt_embeddings"]
    save_file({"prompt_embeddings": good[:, :-1].contiguous()}, weights)
    with pytest.raises(LorakitError, match=r"'prompt_embeddings' has shape \(4, 63\)"):
        load_adapter(tiny_model("llama"), tmp_path)
    bad = good.clone()
    bad[0, 0] = float("nan")
    save_file({"prompt_embeddings": bad}, weights)
    with pytest.raises(LorakitError, match="'prompt_embeddings' holds non-finite values"):
        load_adapter(tiny_model("llama"), tmp_path)
    with pytest.raises(LorakitError, match="num_layers is 2 but the model needs 12"):  # made for another model
        load_adapter(_gpt2_with_layers(12), tmp_path)


@pytest.mark.parametrize("options,message", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
    ({"task_type": "SEQ_2_SEQ_LM"}, "task_type must be 'CAUSAL_LM'"),
    ({"init_weights": "gaussian"}, "init_weights must be null or 'zero'"),
    ({"num_transformer_submodules": 2}, "num_transformer_submodules must be 1"),
    ({"prefix_projection": "yes"}, "prefix_projection must be true or false"),
    ({"num_virtual_token": 8}, "did you mean 'num_virtual_tokens'"),
])
def test_invalid_config_values_are_one_line_errors(options, message):
    with pytest.raises(LorakitError, match=message) as err:
        PrefixTuningConfig(**options)
    assert "\n" not in str(err.value)


def test_a_token_dim_the_model_cannot_take_is_refused_when_adapting():
    with pytest.raises(LorakitError, match="token_dim is 32 but the model needs 16"):
        get_peft_model(tiny_model("llama"), PrefixTuningConfig(num_virtual_tokens=2, token_dim=32))


def test_merging_is_refused_and_zero_init_is_pefts():
    ours, ref = _pair("llama", init_weights="zero")
    assert not ours.prompt_encoder["default"].embedding.weight.any()
    torch.testing.assert_close(_logits(ours, sample_input_ids()), _logits(ref, sample_input_ids()), atol=FP32_ATOL,
                               rtol=0)
    for merge in (ours.merge_adapter, ours.merge_and_unload):
        with pytest.raises(LorakitError, match="prefix tuning cannot be merged into the weights"):
            merge()
    assert ours.unload() is ours.model


def test_gradient_checkpointing_is_refused_in_training():
    """transformers drops the cache under gradient checkpointing, so the prefix would be lost."""
    ours, _ = _pair("llama")
    ours.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = sample_input_ids()
    _logits(ours, ids)  # evaluation does not checkpoint
    with pytest.raises(LorakitError, match="gradient checkpointing"):
        ours.train()(input_ids=ids, labels=ids)
