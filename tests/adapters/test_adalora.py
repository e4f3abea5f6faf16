"""AdaLoRA against the real peft (forward, gradients, files, rank allocation) on tiny random
Llama and GPT-2 models, plus the schedule and regulariser against hand-written formulas."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import FP32_ATOL
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import PeftModel
from peft import get_peft_model as peft_get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import ARCHS, VOCAB, sample_input_ids, tiny_model

from lorakit import LorakitError, get_peft_model, load_adapter
from lorakit.adapters import get_method
from lorakit.adapters.adalora import AdaLoraConfig, AdaLoraLayer
from lorakit.adapters.adalora.functional import budget_schedule, orthogonality_penalty

ARCH_NAMES = ["llama", "gpt2"]
SCHEDULE = dict(init_r=6, target_r=3, tinit=3, tfinal=4, deltaT=2, total_step=20)


def _config(cls, arch, **extra):
    # task_type matters for peft: only PeftModelForCausalLM adds AdaLoRA's regulariser to the loss
    kwargs = dict(init_r=4, target_r=2, total_step=20, lora_alpha=8, target_modules=ARCHS[arch][1],
                  task_type="CAUSAL_LM")
    return cls(**{**kwargs, **extra})


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@torch.no_grad()
def _randomise(model, seed=0, std=0.3):
    """Non-trivial adapter weights (peft's init has Λ = 0, an identity adapter)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def _training_mode(model):
    """The wrapper in training mode (it adds the regulariser then), the network without dropout."""
    model.train()
    model.model.eval()
    return model


def _peft_names(peft_model):
    return {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters()}


def _batches(steps, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (4, 16), generator=generator) for _ in range(steps)]


# --- tier 1: the same weights give the same numbers as peft ---------------------------------

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_same_weights_same_logits_loss_and_gradients_as_peft(arch):
    ids = sample_input_ids()
    ours = _training_mode(get_peft_model(tiny_model(arch), _config(AdaLoraConfig, arch)))
    _randomise(ours)
    theirs = peft_get_peft_model(tiny_model(arch), _config(PeftAdaLoraConfig, arch))
    result = set_peft_model_state_dict(theirs, ours.adapter_state_dict())
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]

    out_ours, out_theirs = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, atol=FP32_ATOL, rtol=0)
    cross_entropy = ours.model(input_ids=ids, labels=ids).loss
    assert out_ours.loss - cross_entropy > 0.1  # the orthogonality penalty is in both losses
    with torch.no_grad():  # evaluation losses stay pure language-model losses (peft adds it there too)
        assert torch.equal(ours.eval()(input_ids=ids, labels=ids).loss, cross_entropy)
    assert not torch.allclose(out_ours.logits, _logits(tiny_model(arch), ids), atol=1e-3)

    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_params = _peft_names(theirs)
    trainable = [(n, p) for n, p in ours.model.named_parameters() if p.requires_grad]
    assert {n.rsplit(".", 2)[-2] for n, _ in trainable} == {"lora_A", "lora_E", "lora_B"}
    for name, param in trainable:
        torch.testing.assert_close(param.grad, theirs_params[name].grad, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_lorakit_files_load_in_peft_with_same_logits(arch, tmp_path):
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model(arch), _config(AdaLoraConfig, arch))
    _randomise(ours)
    ours.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(ours.adapter_state_dict())
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert type(theirs.base_model).__name__ == "AdaLoraModel"
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_peft_files_load_in_lorakit_with_same_logits(arch, tmp_path):
    ids = sample_input_ids()
    theirs = peft_get_peft_model(tiny_model(arch), _config(PeftAdaLoraConfig, arch))
    _randomise(theirs, seed=5)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_model(arch), tmp_path)
    assert isinstance(ours.peft_config["default"], AdaLoraConfig)
    assert all(isinstance(m, AdaLoraLayer) for _, m in ours.adapter_layers())
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs.eval(), ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_merge_unmerge_restores_weights_and_merged_logits_match(arch):
    ids = sample_input_ids()
    model = get_peft_model(tiny_model(arch), _config(AdaLoraConfig, arch))
    _randomise(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    unmerged = _logits(model, ids)
    model.merge_adapter()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    torch.testing.assert_close(_logits(model, ids), unmerged, atol=FP32_ATOL, rtol=0)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in before:
            torch.testing.assert_close(param, before[name], atol=1e-6, rtol=0)
    plain = copy.deepcopy(model).merge_and_unload()
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, ids), unmerged, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_default_init_and_disabled_adapter_equal_base(arch):
    ids = sample_input_ids()
    base = _logits(tiny_model(arch), ids)
    model = get_peft_model(tiny_model(arch), _config(AdaLoraConfig, arch))
    assert torch.equal(_logits(model, ids), base)  # Λ = 0 at init, as in peft
    _randomise(model)
    assert not torch.allclose(_logits(model, ids), base, atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), base)


# --- rank allocation: a short training run, mirrored step by step into peft's allocator -------

def _train_mirrored(arch):
    """Train lorakit's AdaLoRA with AdamW for total_step steps, calling update_and_allocate after
    each optimizer step; after every step copy the weights and gradients into a peft model and
    run peft's allocator on them, checking both keep the same triplets."""
    config = AdaLoraConfig(**SCHEDULE, lora_alpha=16, target_modules="all-linear")
    ours = _training_mode(get_peft_model(tiny_model(arch), config))
    _randomise(ours, std=0.1)
    theirs = peft_get_peft_model(tiny_model(arch), PeftAdaLoraConfig(**SCHEDULE, lora_alpha=16,
                                                                     target_modules="all-linear"))
    theirs_params = _peft_names(theirs)
    trainable = [(n, p) for n, p in ours.model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=2e-2)
    masks_seen = 0
    for step, batch in enumerate(_batches(config.total_step), start=1):
        ours(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, param in trainable:
                theirs_params[name].copy_(param)
                theirs_params[name].grad = param.grad.clone()
        ours.update_and_allocate(step)
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        theirs_pattern = theirs.peft_config["default"].rank_pattern
        if theirs_pattern is not None:
            masks_seen += 1
            assert config.rank_pattern == {k.replace(".default", ""): v for k, v in theirs_pattern.items()}
        for name, param in trainable:
            if ".lora_E." in name:
                assert torch.equal(param, theirs_params[name]), f"step {step}: {name}"
    assert masks_seen >= config.tfinal
    return ours, theirs, config


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # peft warns on its own AdaLoRA files too
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_training_reaches_target_budget_like_peft_and_reloads(arch, tmp_path):
    ours, theirs_trained, config = _train_mirrored(arch)
    layers = dict(ours.adapter_layers())
    ranks = {key: sum(mask) for key, mask in config.rank_pattern.items()}
    assert set(ranks) == {f"{name}.lora_E" for name in layers}
    assert sum(ranks.values()) == config.target_r * len(layers)
    assert len(set(ranks.values())) > 1, ranks  # the budget moved between matrices
    for name, layer in layers.items():
        kept = torch.tensor(config.rank_pattern[f"{name}.lora_E"])
        assert torch.all(layer.lora_E["default"][~kept] == 0)
        assert torch.all(layer.lora_E["default"][kept] != 0)

    ids = sample_input_ids()
    expected = _logits(ours, ids)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == config.rank_pattern
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for key, rank in ranks.items():
        module = "base_model.model." + key.removesuffix(".lora_E")
        assert tensors[f"{module}.lora_A"].shape[0] == rank
        assert tensors[f"{module}.lora_E"].shape == (rank, 1)
        assert tensors[f"{module}.lora_B"].shape[1] == rank

    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=FP32_ATOL, rtol=0)
    reloaded = load_adapter(tiny_model(arch), tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=FP32_ATOL, rtol=0)
    assert {f"{n}.lora_E": m.r["default"] for n, m in reloaded.adapter_layers()} == ranks
    trainable = load_adapter(tiny_model(arch), tmp_path, is_trainable=True)  # pruned: ranks stay fixed
    _training_mode(trainable)(input_ids=ids, labels=ids).loss.backward()
    trainable.update_and_allocate(config.total_step - config.tfinal - 1)
    torch.testing.assert_close(_logits(trainable, ids), expected, atol=FP32_ATOL, rtol=0)
    reloaded.save_pretrained(tmp_path / "again")  # a loaded pruned adapter saves unchanged
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], v) for k, v in tensors.items())

    theirs_trained.save_pretrained(tmp_path / "peft")  # peft's own pruned files load in lorakit
    from_peft = load_adapter(tiny_model(arch), tmp_path / "peft")
    assert from_peft.peft_config["default"].rank_pattern == config.rank_pattern
    torch.testing.assert_close(_logits(from_peft, ids), expected, atol=FP32_ATOL, rtol=0)


def test_update_and_allocate_without_gradients_is_an_error():
    model = get_peft_model(tiny_model("llama"), _config(AdaLoraConfig, "llama"))
    with pytest.raises(LorakitError, match="before optimizer.zero_grad"):
        model.update_and_allocate(1)


# --- the math against hand-written formulas ---------------------------------------------------

def test_budget_schedule_is_cubic_between_tinit_and_total_minus_tfinal():
    args = dict(init_budget=48, target_budget=24, tinit=10, tfinal=20, total_step=110, deltaT=5)
    assert budget_schedule(10, **args) == (48, False)
    assert budget_schedule(35, **args) == (int(24 * (1 - 25 / 80) ** 3 + 24), True)  # 31
    assert budget_schedule(36, **args)[1] is False  # masks only every deltaT steps
    assert budget_schedule(90, **args) == (24, True)
    assert budget_schedule(91, **args) == (24, True)


def test_orthogonality_penalty_is_zero_for_orthonormal_factors():
    q, _ = torch.linalg.qr(torch.randn(16, 4))  # (16, 4) orthonormal columns
    assert orthogonality_penalty([q.T], [q]).abs() < 1e-5
    scaled = 2 * q  # PᵀP = 4I -> ||3I||_F = 3·sqrt(4) = 6
    torch.testing.assert_close(orthogonality_penalty([scaled.T], [scaled]), torch.tensor(6.0))


# --- config ------------------------------------------------------------------------------------

def test_config_validates_and_is_registered():
    assert get_method("adalora").config_class is AdaLoraConfig
    assert AdaLoraConfig.from_dict({"init_r": 8, "target_r": 4, "total_step": 100}).init_r == 8
    with pytest.raises(LorakitError, match="did you mean 'target_r'"):
        AdaLoraConfig(total_step=10, targt_r=4)
    with pytest.raises(LorakitError, match="total_step must be the number of training steps"):
        get_peft_model(tiny_model("llama"), AdaLoraConfig())  # lorakit train fills it in; here it is missing
    with pytest.raises(LorakitError, match="pruning phase"):
        AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(LorakitError, match="must not exceed init_r"):
        AdaLoraConfig(total_step=10, init_r=4, target_r=8)
    with pytest.raises(LorakitError, match="rank_pattern"):
        AdaLoraConfig(total_step=10, init_r=2, target_r=1, rank_pattern={"q_proj.lora_E": [True]})
    with pytest.raises(LorakitError, match="DoRA"):
        AdaLoraConfig(total_step=10, use_dora=True)
