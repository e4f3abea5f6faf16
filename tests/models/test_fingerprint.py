"""Base fingerprints: a saved adapter records its base model in the safetensors metadata (peft
still loads the file), loading it on another base warns in the library and is refused by
lorakit merge and the server unless --force, and QLoRA / PiSSA adapters record the base as it
was loaded, not its quantized or residual copy."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import _COMMON, FP32_ATOL, sample_input_ids, tiny_model

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from lorakit_tiny import REPO, SUPPORT_TRAIN, save_tiny_llama, write_chat_subset  # noqa: E402

from lorakit import (LoraConfig, LorakitError, PrefixTuningConfig, QLoraConfig, get_peft_model,  # noqa: E402
                     load_adapter)
from lorakit.cli import main  # noqa: E402
from lorakit.inference import MultiAdapterModel  # noqa: E402
from lorakit.models.fingerprint import (BaseMismatchWarning, BaseRecord, adapter_base, base_record,  # noqa: E402
                                        compute_record, require_same_base)

TARGETS = ["q_proj", "v_proj"]


def _save_lora(model, directory: Path, config=None) -> Path:
    lora = get_peft_model(model, config or LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    lora.save_pretrained(directory)
    return directory


def _mismatch_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, BaseMismatchWarning)]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last


# --- what is recorded -------------------------------------------------------------------------
def test_fingerprint_is_in_the_metadata_and_peft_loads_the_file_unchanged(tmp_path):
    from peft import PeftModel

    directory = _save_lora(tiny_model("llama"), tmp_path / "a")
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    fresh = compute_record(tiny_model("llama"))
    assert metadata["lorakit.base.fingerprint"] == fresh.fingerprint
    assert metadata["lorakit.base.architecture"] == "LlamaForCausalLM (llama)"
    assert metadata["lorakit.base.shapes"].startswith("21 tensors, 26784 values, sha256 ")
    assert BaseRecord.from_metadata(metadata) == fresh

    ids = sample_input_ids()
    ours = load_adapter(tiny_model("llama"), directory).eval()
    theirs = PeftModel.from_pretrained(tiny_model("llama"), directory).eval()
    with torch.no_grad():
        expected, got = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        base = tiny_model("llama")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=0)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter does something


def test_what_differs_is_named_architecture_shapes_config_or_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = compute_record(tiny_model("llama"))
    qwen2 = compute_record(tiny_model("qwen2"))
    assert qwen2.difference(llama) == "architecture Qwen2ForCausalLM (qwen2), not LlamaForCausalLM (llama)"
    wide = compute_record(LlamaForCausalLM(LlamaConfig(**dict(_COMMON, intermediate_size=48))))
    assert wide.difference(llama).startswith("parameter shapes differ (21 tensors, 23712 values")
    torch.manual_seed(0)
    rope = compute_record(LlamaForCausalLM(LlamaConfig(**_COMMON, rope_theta=500000.0)))
    assert rope.difference(llama).startswith("config differs")
    other = compute_record(tiny_model("llama", seed=1)).difference(llama)
    assert other.startswith("same shapes but other weights (relative distance 1.")
    assert llama.difference(compute_record(tiny_model("llama"))) is None


def test_fp32_bf16_and_fp16_loads_of_one_checkpoint_are_the_same_base():
    """bf16 rounding first: fp32 and bf16 give one fingerprint; fp16 may round twice and is
    accepted by the sketch (at most one bf16 ulp per value)."""
    fp32 = compute_record(tiny_model("llama"))
    bf16 = compute_record(tiny_model("llama").to(torch.bfloat16))
    fp16 = compute_record(tiny_model("llama").to(torch.float16))
    assert bf16.fingerprint == fp32.fingerprint
    assert fp16.fingerprint != fp32.fingerprint  # double rounding moved some values here...
    assert fp16.difference(fp32) is None and fp32.difference(fp16) is None  # ...within the tolerance
    # a small fine-tune-like change (1% of every weight, rms) is other weights
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 + 0.01 * torch.randn(param.shape, generator=generator))
    assert compute_record(model).difference(fp32).startswith("same shapes but other weights")


# --- the library warns --------------------------------------------------------------------------
def test_load_adapter_warns_on_another_base_and_not_on_its_own(tmp_path):
    directory = _save_lora(tiny_model("llama"), tmp_path / "a")
    _, same = _mismatch_warnings(lambda: load_adapter(tiny_model("llama"), directory))
    _, bf16 = _mismatch_warnings(lambda: load_adapter(tiny_model("llama").to(torch.bfloat16), directory))
    model, other = _mismatch_warnings(lambda: load_adapter(tiny_model("llama", seed=1), directory))
    assert same == [] and bf16 == []
    assert other == [f"{directory}: adapter trained on another base model: same shapes but other weights "
                     f"(relative distance {other[0].rsplit(' ', 1)[-1]}"]
    assert "\n" not in other[0] and model.active_adapter == "default"  # loaded all the same


def test_a_peft_made_adapter_without_fingerprint_loads_silently(tmp_path):
    import peft

    peft_model = peft.get_peft_model(tiny_model("llama", seed=1), peft.LoraConfig(r=4, target_modules=TARGETS))
    peft_model.save_pretrained(tmp_path / "peft")
    assert adapter_base(tmp_path / "peft") is None
    _, caught = _mismatch_warnings(lambda: load_adapter(tiny_model("llama"), tmp_path / "peft"))
    assert caught == []
    require_same_base(tmp_path / "peft", tiny_model("llama"))  # nothing to refuse


def test_qlora_and_pissa_adapters_record_the_base_as_loaded(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lorakit.adapters.qlora import quantize_base

    original = compute_record(tiny_model("llama"))
    _save_lora(tiny_model("llama"), tmp_path / "qlora",
               QLoraConfig(r=4, target_modules=TARGETS, compute_dtype="float32", init_lora_weights=False))
    pissa = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    pissa.save_pretrained(tmp_path / "pissa")
    prequantized = quantize_base(tiny_model("llama"), compute_dtype="float32")  # the user quantizes first
    _save_lora(prequantized, tmp_path / "prequantized")
    for name in ("qlora", "pissa", "prequantized"):
        assert adapter_base(tmp_path / name) == original, name
        _, caught = _mismatch_warnings(lambda: load_adapter(tiny_model("llama"), tmp_path / name))
        assert caught == [], name
    # what they would record without keeping the record: the quantized / residual weights differ
    q_layer = pissa.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q_layer.base_layer.weight, tiny_model("llama").model.layers[0].self_attn.q_proj.weight)
    assert compute_record(quantize_base(tiny_model("llama"), compute_dtype="float32")).difference(original)


def test_prefix_adapter_records_its_base_and_warns_on_another(tmp_path):
    model = get_peft_model(tiny_model("llama"), PrefixTuningConfig(num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "prefix")
    assert adapter_base(tmp_path / "prefix") == compute_record(tiny_model("llama"))
    _, caught = _mismatch_warnings(lambda: load_adapter(tiny_model("llama", seed=1), tmp_path / "prefix"))
    assert len(caught) == 1 and "other weights" in caught[0]


def test_merge_and_unload_forgets_the_record_of_the_old_weights():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    before = base_record(model.model)
    merged = model.merge_and_unload()
    assert base_record(merged).difference(before).startswith("same shapes but other weights")


# --- lorakit merge and the server refuse ----------------------------------------------------------
@pytest.fixture(scope="module")
def bases(tmp_path_factory, smol_tokenizer):
    """(base dir, other base dir of the same shapes, adapter dir trained on base)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fingerprint")
    base = save_tiny_llama(root / "base", smol_tokenizer, seed=0)
    other = save_tiny_llama(root / "other", smol_tokenizer, seed=1)
    adapter = _save_lora(AutoModelForCausalLM.from_pretrained(base), root / "adapters" / "a")
    return base, other, adapter


def test_merge_refuses_another_base_in_one_line_and_force_merges(bases, tmp_path, capsys):
    base, other, adapter = bases
    argv = ["merge", "--adapter", str(adapter), "--model", str(other), "--output", str(tmp_path / "merged")]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"error: {adapter}: adapter trained on another base model ('{base}', not '{other}'): "
                          f"same shapes but other weights") and err.endswith("; pass --force to use it anyway")
    assert not (tmp_path / "merged").exists()
    assert main(argv + ["--force"]) == 0 and (tmp_path / "merged" / "config.json").is_file()
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "own")]) == 0  # its own base


def test_server_refuses_another_base_at_start_and_at_run_time_unless_forced(bases):
    from starlette.testclient import TestClient

    from lorakit.server.run import build_app

    base, other, adapter = bases
    with pytest.raises(LorakitError, match=r"adapter trained on another base model .*same shapes but other weights.*"
                                           r"lorakit serve --force"):
        build_app(str(other), {"a": str(adapter)})
    app, engine = build_app(str(other), {"a": str(adapter)}, force=True)
    engine.close()
    assert engine.multi.adapter_names == ["a"]

    app, engine = build_app(str(other), adapter_root=adapter.parent, served_model_name="base")
    try:
        response = TestClient(app).post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"})
        assert response.status_code == 400 and "same shapes but other weights" in response.json()["error"]["message"]
    finally:
        engine.close()
    app, engine = build_app(str(base), {"a": str(adapter)})  # its own base: loads
    engine.close()
    assert engine.multi.adapter_names == ["a"]


def test_a_fingerprint_match_overrides_a_differing_name(tmp_path):
    """Same weights under another name (a local copy of the hub model) is the same base; the
    name check stays for adapters without a fingerprint."""
    named = _save_lora(tiny_model("llama"), tmp_path / "named",
                       LoraConfig(r=4, target_modules=TARGETS, base_model_name_or_path="meta-llama/Llama-3.2-1B"))
    multi = MultiAdapterModel(tiny_model("llama"), base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    multi.add_adapter("x", named)
    assert multi.adapter_names == ["x"]


# --- the built-in model -------------------------------------------------------------------------
@pytest.mark.slow
def test_adapter_trained_on_builtin_model_is_refused_on_a_random_model_of_its_shapes(tmp_path, builtin_model_dir,
                                                                                     capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorakit.config import load_config
    from lorakit.training import train

    config = load_config(REPO / "examples" / "quickstart.yaml", [  # a few steps, no eval: the adapter is the point
        "train.max_steps=2", "train.batch_size=1", "train.warmup_ratio=0", "train.precision=fp32", "data.eval=null",
        f"output_dir={tmp_path / 'out'}"])
    config.data.train = str(write_chat_subset(tmp_path / "train.jsonl", SUPPORT_TRAIN, rows=16))
    train(config, progress=False)
    out = tmp_path / "out"
    assert adapter_base(out).name == "smollm2-135m-instruct"

    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(builtin_model_dir))
    random.save_pretrained(tmp_path / "random")
    AutoTokenizer.from_pretrained(builtin_model_dir).save_pretrained(tmp_path / "random")

    capsys.readouterr()
    assert main(["merge", "--adapter", str(out), "--model", str(tmp_path / "random"),
                 "--output", str(tmp_path / "merged")]) == 2
    err = _one_line_error(capsys)
    assert (f"adapter trained on another base model ('smollm2-135m-instruct', not '{tmp_path / 'random'}'): "
            f"same shapes but other weights") in err and "pass --force" in err
    assert not (tmp_path / "merged").exists()
    assert main(["export", "--adapter", str(out), "--model", str(tmp_path / "random"),
                 "--output", str(tmp_path / "export" / "m.gguf")]) == 2
    assert "pass --force" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "export" / "m.gguf").exists()
    from lorakit.server.run import build_app
    with pytest.raises(LorakitError, match="another base model.*--force"):
        build_app(str(tmp_path / "random"), {"support": str(out)})
    from peft import PeftModel  # the metadata does not stop peft from loading the file
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir), str(out))
    assert main(["adapters", "check", str(out), "--base", "smollm2-135m-instruct"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m-instruct"
