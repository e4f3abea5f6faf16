"""The contract every registered method and LoRA variant keeps (DESIGN.md, testing tier 2).

One row per method and per variant, each with its own config (the qlora row on a really
quantized base). Every row passes the same checks, through the ``AdaptedModel`` protocol only:
the registry resolves the config to the row's method; the initial adaptation equals the base
(where the method starts as the identity: not prefix tuning); disabling it gives the base; one
training step changes only the parameters the method declares trainable (and all of them get
a gradient); merging (where the method merges) keeps the outputs and unmerging restores the
weights; save -> load gives the same logits, and peft loads the files where peft has the method.

Adding a method = one row in ROWS. A registered method without a row fails
``test_every_registered_method_has_a_row``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import PeftModel
from tiny_models import FP32_ATOL, sample_input_ids, tiny_model

import lorakit
from lorakit import LoraConfig, get_peft_model, load_adapter
from lorakit.adapters import ADAPTER_METHODS, AdaptedModel, method_for_config, method_for_directory
from lorakit.adapters.adalora import AdaLoraConfig
from lorakit.adapters.bottleneck import BottleneckConfig
from lorakit.adapters.dora import DORA
from lorakit.adapters.full import FullConfig
from lorakit.adapters.lora import LoraLayer
from lorakit.adapters.lora.variants import PLAIN
from lorakit.adapters.prompt import PromptConfig
from lorakit.adapters.prefix import PrefixTuningConfig
from lorakit.adapters.qlora import QLoraConfig, is_quantized, quantize_base
from lorakit.errors import LorakitError

ARCH_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


@dataclass(frozen=True)
class Row:
    """method: the registry name the config must resolve to. config(targets) -> the row's config.
    base(arch) -> the model the adaptation starts from and must equal when disabled (a quantized
    base for qlora). variant: the LoRA layer strategy each adapter must hold (None: not LoRA).
    identity_init: the untrained adaptation computes the base (LoRA's B = 0); False for prefix
    tuning, whose random initial prefix already changes the attention.
    disabled_is_base: False for PiSSA, whose frozen weight is the residual once initialised.
    merges / restores: merge keeps the outputs / unmerge restores the weights bit-near.
    peft_reads: peft loads the saved files with the same logits. atol: the row's tolerance.
    trains: False for a method with nothing to train (the prompt baseline)."""

    method: str
    config: Callable[[list[str]], object]
    base: Callable[[str], torch.nn.Module] = tiny_model
    variant: object = None
    identity_init: bool = True
    disabled_is_base: bool = True
    merges: bool = True
    restores: bool = True
    peft_reads: bool = True
    trains: bool = True
    atol: float = FP32_ATOL


def _quantized_tiny(arch: str):
    return quantize_base(tiny_model(arch), "nf4", compute_dtype="float32")


ROWS = {
    "lora": Row("lora", lambda t: LoraConfig(r=4, target_modules=t), variant=PLAIN),
    "rslora": Row("lora", lambda t: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=t), variant=PLAIN),
    "dora": Row("lora", lambda t: LoraConfig(r=4, use_dora=True, target_modules=t), variant=DORA),
    "pissa": Row("lora", lambda t: LoraConfig(r=4, init_lora_weights="pissa", target_modules=t), variant=PLAIN,
                 disabled_is_base=False),
    # a real NF4 base: the config quantizes it (prepare_base); merging dequantizes, so no exact restore;
    # peft's CPU 4-bit loading is not the reference here (test_qlora.py checks the plain-LoRA files)
    "qlora": Row("qlora", lambda t: QLoraConfig(r=4, target_modules=t, compute_dtype="float32"),
                 base=_quantized_tiny, variant=PLAIN, restores=False, peft_reads=False, atol=1e-4),
    "adalora": Row("adalora", lambda t: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=t)),
    # full fine-tuning changes the base itself: nothing to disable or merge; files are a transformers dir
    "full": Row("full", lambda t: FullConfig(), disabled_is_base=False, merges=False, peft_reads=False),
    "full-part": Row("full", lambda t: FullConfig(trainable_modules=t), disabled_is_base=False, merges=False,
                     peft_reads=False),
    "prompt": Row("prompt", lambda t: PromptConfig(num_examples=0), merges=False, peft_reads=False, trains=False),
    # bottleneck adapters sit where their placement puts them (not on the row's LoRA targets);
    # non-linear, so never merged; a lorakit-only file type that peft cannot read
    "adapter": Row("adapter", lambda t: BottleneckConfig(reduction_factor=4), variant=None, merges=False,
                   peft_reads=False),
    # no target modules: every attention layer gets the prefix; nothing to merge
    "prefix": Row("prefix", lambda t: PrefixTuningConfig(num_virtual_tokens=4), identity_init=False, merges=False),
    "prefix_projection": Row("prefix", lambda t: PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True),
                             identity_init=False, merges=False),
}
CASES = [(row, arch) for row in ROWS for arch in ARCH_TARGETS]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adapted(row_name: str, arch: str, trained: bool = True):
    """The row's adapted model; ``trained``: every trainable tensor moved off its init, as after
    training (an identity init such as LoRA's B = 0 would hide a wrong forward or file)."""
    row = ROWS[row_name]
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(arch), row.config(ARCH_TARGETS[arch]))
    if trained:
        torch.manual_seed(1)
        with torch.no_grad():
            for param in model.trainable_tensors().values():
                param.add_(torch.randn_like(param) * 0.1)
    return model


def model_config(model):
    """The config the adapted model was built from (each wrapper keeps it under its own name)."""
    return model.peft_config["default"] if hasattr(model, "peft_config") else model.method_config


def test_every_registered_method_has_a_row():
    covered = {row.method for row in ROWS.values()}
    assert set(ADAPTER_METHODS) <= covered, f"add a row to ROWS for: {sorted(set(ADAPTER_METHODS) - covered)}"


@pytest.mark.parametrize("row", list(ROWS))
def test_registry_resolves_the_config_to_its_method(row, tmp_path):
    config = ROWS[row].config(ARCH_TARGETS["llama"])
    method = method_for_config(config)
    assert method.name == ROWS[row].method
    model = _adapted(row, "llama")
    assert isinstance(model, AdaptedModel)
    model.save_pretrained(tmp_path)
    # what was saved is recognised as this method's output (qlora's files are LoRA files, read by lora)
    found = method_for_directory(tmp_path)
    assert found is method or (found.peft_type == method.peft_type and found.attach is not None)
    if method.peft_type is not None:
        assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == method.peft_type


@pytest.mark.parametrize("row,arch", CASES)
def test_layers_hold_the_rows_variant(row, arch):
    expected = ROWS[row].variant
    if expected is None:
        pytest.skip("not a LoRA layer method")
    layers = [m for _, m in _adapted(row, arch).adapter_layers()]
    assert layers and all(isinstance(m, LoraLayer) and m.variants["default"] is expected for m in layers)
    if row == "qlora":
        assert all(is_quantized(m.base_layer) for m in layers)


@pytest.mark.parametrize("row,arch", CASES)
def test_initial_adaptation_equals_base(row, arch):
    if not ROWS[row].identity_init:
        pytest.skip("the method's initial adaptation is not the identity (a random prefix changes the attention)")
    ids = sample_input_ids()
    model = _adapted(row, arch, trained=False)
    torch.testing.assert_close(_logits(model, ids), _logits(ROWS[row].base(arch), ids), atol=ROWS[row].atol, rtol=0)


@pytest.mark.parametrize("row,arch", CASES)
def test_disabled_adaptation_equals_base(row, arch):
    if not ROWS[row].disabled_is_base:
        pytest.skip("the base weights themselves change (PiSSA's residual, full fine-tuning)")
    if not ROWS[row].trains:
        pytest.skip("nothing is trained: the model is the base whether disabled or not")
    ids = sample_input_ids()
    model = _adapted(row, arch)
    base = _logits(ROWS[row].base(arch), ids)
    assert not torch.allclose(_logits(model, ids), base, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), base, atol=ROWS[row].atol, rtol=0)


@pytest.mark.parametrize("row,arch", CASES)
def test_a_training_step_changes_exactly_the_declared_parameters(row, arch):
    ids = sample_input_ids()
    model = _adapted(row, arch)
    declared = {id(p) for p in model.trainable_tensors().values()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == declared, "requires_grad must be set on exactly the declared tensors"
    assert bool(declared) == ROWS[row].trains == method_for_config(model_config(model)).trains
    if not ROWS[row].trains:
        return
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    torch.optim.SGD(params, lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable_names = {n for n, p in model.named_parameters() if id(p) in declared}
    assert changed == trainable_names


@pytest.mark.parametrize("row,arch", CASES)
def test_merge_keeps_outputs_and_unmerge_restores_weights(row, arch):
    if not ROWS[row].merges:
        pytest.skip("this method does not merge")
    ids = sample_input_ids()
    model = _adapted(row, arch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    unmerged = _logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, ids), unmerged, atol=ROWS[row].atol, rtol=0)
    model.unmerge_adapter()
    if ROWS[row].restores:
        for name, param in model.named_parameters():
            if name in weights:
                torch.testing.assert_close(param, weights[name], atol=ROWS[row].atol, rtol=0)


@pytest.mark.parametrize("row,arch", CASES)
def test_save_load_round_trip_and_peft_reads_the_files(row, arch, tmp_path):
    ids = sample_input_ids()
    model = _adapted(row, arch)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    # loaded on the base the files are for: the original one (PiSSA is saved as LoRA for it)
    reloaded = load_adapter(ROWS[row].base(arch), tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=ROWS[row].atol, rtol=0)
    if ROWS[row].peft_reads:
        peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
        torch.testing.assert_close(_logits(peft_model, ids), expected, atol=ROWS[row].atol, rtol=0)


def test_a_trainable_parameter_outside_the_declared_tables_is_refused_on_save(tmp_path):
    model = _adapted("lora", "llama")
    model.model.model.norm.weight.requires_grad_(True)  # would silently be missing from the file
    with pytest.raises(LorakitError, match="model.norm.weight"):
        model.save_pretrained(tmp_path)


def test_imports_flow_one_way():
    """adapters/ never imports models/, training/, inference/ or server/; the shared leaf modules
    import nothing of lorakit but errors and each other (DESIGN.md: imports flow one way)."""
    root = Path(lorakit.__file__).parent
    upward = re.compile(r"^\s*(from|import) lorakit\.(models|training|inference|server|commands|config)\b", re.M)
    offenders = [str(p.relative_to(root)) for p in (root / "adapters").rglob("*.py") if upward.search(p.read_text())]
    assert offenders == []
    leaf_imports = re.compile(r"^\s*(?:from|import) (lorakit[.\w]*)", re.M)
    allowed = {"lorakit.errors", "lorakit._io", "lorakit._faults", "lorakit._quantized_embedding"}
    for leaf in ("_modules.py", "_dtypes.py", "_file_keys.py", "_quantized.py", "_quantized_embedding.py",
                 "_adapter_files.py", "_io.py", "_fingerprint.py"):
        assert set(leaf_imports.findall((root / leaf).read_text())) <= allowed, leaf
