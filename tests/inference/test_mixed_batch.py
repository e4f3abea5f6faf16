"""Mixed-adapter batches: each row equals that row run alone with its adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FP32_ATOL
from tiny_models import ARCHS, sample_input_ids, tiny_model

from lorakit import LoraConfig, LorakitError, get_peft_model
from lorakit.inference import MultiAdapterModel

RANKS = {"a": 2, "b": 4, "c": 8, "d": 3}


def _save_adapters(arch, root):
    """Four random (non-zero) adapters of different ranks, saved in peft layout."""
    dirs = {}
    for i, (name, r) in enumerate(RANKS.items()):
        torch.manual_seed(100 + i)
        targets = ARCHS[arch][1] if i % 2 == 0 else ARCHS[arch][1][:1]  # different target sets too
        model = get_peft_model(tiny_model(arch), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                            init_lora_weights=False))
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(params=["llama", "gpt2"])
def multi(request, tmp_path):
    dirs = _save_adapters(request.param, tmp_path)
    model = MultiAdapterModel(tiny_model(request.param))
    for name, directory in dirs.items():
        model.add_adapter(name, directory)
    return model


ROWS = ["a", "b", "c", "d", None, "b"]


def _alone(multi, ids, name):
    multi.set_adapter(name)
    with torch.no_grad():
        return multi(input_ids=ids).logits


def test_mixed_rows_equal_each_row_alone(multi):
    ids = sample_input_ids(batch=len(ROWS), length=10)
    with torch.no_grad():
        mixed = multi(input_ids=ids, adapter_names=ROWS).logits
    base = None
    for b, name in enumerate(ROWS):
        alone = _alone(multi, ids[b:b + 1], name)
        torch.testing.assert_close(mixed[b:b + 1], alone, atol=FP32_ATOL, rtol=0)
        if name is None:
            base = alone
    for b, name in enumerate(ROWS):  # the adapters really differ from the base and each other
        if name is not None:
            assert not torch.allclose(mixed[b:b + 1], _alone(multi, ids[b:b + 1], None), atol=1e-3)
    assert not torch.allclose(_alone(multi, ids[:1], "a"), _alone(multi, ids[:1], "c"), atol=1e-3)
    assert base is not None


def test_mixed_generate_equals_single_generate(multi):
    ids = sample_input_ids(batch=4, length=6, seed=3)
    names = ["d", None, "a", "c"]
    out = multi.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                         max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    for b, name in enumerate(names):
        multi.set_adapter(name)
        alone = multi.generate(input_ids=ids[b:b + 1], attention_mask=torch.ones_like(ids[b:b + 1]),
                               max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out[b], alone[0])


def test_set_disable_delete(multi):
    ids = sample_input_ids(batch=1)
    base = _alone(multi, ids, None)
    multi.set_adapter("c")
    with multi.disable_adapter(), torch.no_grad():
        assert torch.equal(multi(input_ids=ids).logits, base)
    multi.delete_adapter("b")
    assert multi.adapter_names == ["a", "c", "d"]
    with pytest.raises(LorakitError, match="row adapter 'b' is not loaded"):
        multi(input_ids=ids, adapter_names=["b"])
    with torch.no_grad():  # stacks rebuilt after the delete: "c" still right
        torch.testing.assert_close(multi(input_ids=ids, adapter_names=["c"]).logits, _alone(multi, ids, "c"),
                                   atol=FP32_ATOL, rtol=0)


def test_trained_biases_refused(multi):
    """DoRA and modules_to_save mix (test_mixed_kinds.py); a trained bias is one shared tensor."""
    multi.lora.peft_config["a"].bias = "all"
    with pytest.raises(LorakitError, match="trains biases"):
        multi(input_ids=sample_input_ids(batch=1), adapter_names=["a"])


def test_adapter_for_another_shape_or_base_rejected(tmp_path):
    wide = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    wide.save_pretrained(tmp_path / "ok")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import _COMMON
    other = LlamaForCausalLM(LlamaConfig(**dict(_COMMON, hidden_size=48))).eval()
    with pytest.raises(LorakitError, match="adapter trained on another base model: parameter shapes differ"):
        MultiAdapterModel(other).add_adapter("x", tmp_path / "ok")  # by the base fingerprint
    with pytest.raises(LorakitError, match="has shape"):
        MultiAdapterModel(other, check_base=False).add_adapter("x", tmp_path / "ok")
    named = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"],
                                                           base_model_name_or_path="meta-llama/Llama-3.2-1B"))
    named.save_pretrained(tmp_path / "named")
    weights = tmp_path / "named" / "adapter_model.safetensors"  # as peft saves it: no fingerprint, names compared
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    multi = MultiAdapterModel(tiny_model("llama"), base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(LorakitError, match="trained on base model 'meta-llama/Llama-3.2-1B'"):
        multi.add_adapter("x", tmp_path / "named")
    with pytest.raises(LorakitError, match="not valid"):
        multi.add_adapter("../x", tmp_path / "ok")
