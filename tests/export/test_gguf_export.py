"""GGUF export (issue 12): the merged model read back by transformers' GGUF loader gives the
merged model's logits within the quantization's error, the tokenizer (chat template, EOS) comes
back equal, the adapter GGUF holds the adapter's factors under llama.cpp's names, and what cannot
be written is refused with one line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny_models import tiny_model  # noqa: E402

from lorakit import LoraConfig, get_peft_model  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.export.gguf_layout import rope_permute, rope_unpermute  # noqa: E402
from lorakit.export.run import export  # noqa: E402

# max |logit difference| / max |logit| that each weight type may cause (measured on these tiny
# models: f16 ~5e-4, q8_0 ~1.2e-2, q4_0 ~0.15; on the built-in model see lorakit.inference.verify)
RELATIVE_TOLERANCE = {"f16": 2e-3, "q8_0": 3e-2, "q4_0": 2.5e-1}
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
         "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def save_base(directory: Path, tokenizer, arch: str, tied: bool) -> Path:
    """A 2-layer random model of ``arch`` (GQA, head dim 16) with the real SmolLM2 tokenizer."""
    config_class, model_class = ARCHS[arch]
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_adapter(base: Path, directory: Path, **lora) -> Path:
    """A LoRA adapter on ``base`` with a non-zero update on q, k, v, o and up."""
    lora.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


def merged_logits(adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from lorakit.inference.generate import load_for_inference

    model, _ = load_for_inference(adapter)
    with torch.no_grad():
        return model.merge_and_unload()(ids).logits


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("gguf-export")
    made = {}
    for arch, tied in (("llama", True), ("llama", False), ("mistral", False), ("qwen2", True)):
        base = save_base(root / f"{arch}-{tied}", smol_tokenizer, arch, tied)
        made[arch, tied] = save_adapter(base, root / f"{arch}-{tied}-adapter")
    return made


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("Hello world, the kettle boils water in two minutes.").input_ids])


@pytest.mark.parametrize("arch,tied,quant", [("llama", True, "f16"), ("mistral", False, "q8_0"),
                                             ("qwen2", True, "q4_0")])
def test_exported_model_reads_back_with_the_merged_logits(adapters, smol_tokenizer, tmp_path, arch, tied, quant):
    adapter = adapters[arch, tied]
    result = export(adapter, tmp_path / "model.gguf", quant=quant)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = _ids(smol_tokenizer)
    with torch.no_grad():
        got = back(ids).logits
    want = merged_logits(adapter, ids)
    relative = float((got - want).abs().max() / want.abs().max())
    assert relative < RELATIVE_TOLERANCE[quant], f"{arch} {quant}: relative logit error {relative:.2e}"
    assert back.config.tie_word_embeddings == tied
    assert result.modelfile.read_text().startswith("# written by lorakit export\nFROM ./model.gguf\n")
    if quant == "f16":  # the tokenizer is written the same way whatever the weights' type
        tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
        assert tokenizer.chat_template == smol_tokenizer.chat_template
        assert tokenizer.eos_token == smol_tokenizer.eos_token
        text = "<|im_start|>user\nHow long does the kettle take?<|im_end|>\n"
        assert tokenizer(text).input_ids == smol_tokenizer(text).input_ids


def test_f16_export_is_tighter_than_q8_0_which_is_tighter_than_q4_0(adapters, smol_tokenizer, tmp_path):
    """The quantization's error is what it says: each step down in bits costs accuracy."""
    adapter = adapters["llama", False]
    ids = _ids(smol_tokenizer)
    want = merged_logits(adapter, ids)
    errors = {}
    for quant in ("f16", "q8_0", "q4_0"):
        export(adapter, tmp_path / quant / "model.gguf", quant=quant)
        back = AutoModelForCausalLM.from_pretrained(str(tmp_path / quant), gguf_file="model.gguf",
                                                    dtype=torch.float32).eval()
        with torch.no_grad():
            errors[quant] = float((back(ids).logits - want).abs().max())
    assert errors["f16"] < errors["q8_0"] < errors["q4_0"], errors


def test_rope_permutation_round_trips_and_interleaves_the_halves():
    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of dim 8
    permuted = rope_permute(weight, heads=2)
    # head 0: rows (0, 4, 1, 5, 2, 6, 3, 7) — dimension j paired with j + d/2
    assert permuted[:8, 0].tolist() == weight[[0, 4, 1, 5, 2, 6, 3, 7], 0].tolist()
    assert np.array_equal(rope_unpermute(permuted, heads=2), weight)


def _adapter_tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True, "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"v_proj": 3}}])
def test_adapter_gguf_holds_the_adapters_update_under_llama_cpp_names(adapters, tmp_path, extra):
    """alpha / r · B A of every module in the file equals the adapter's s · B A (B's q/k rows in
    llama.cpp's order); for a plain adapter A and B are stored exactly as trained."""
    from safetensors.torch import load_file

    base = adapters["llama", False].parent / "llama-False"
    adapter = save_adapter(base, tmp_path / "adapter", **extra)
    export(adapter, tmp_path / "out" / "adapter.gguf", fmt="gguf-adapter")
    fields, tensors = _adapter_tensors(tmp_path / "out" / "adapter.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = fields["adapter.lora.alpha"]
    saved = load_file(adapter / "adapter_model.safetensors")
    config = LoraConfig(r=4, lora_alpha=8, **extra)
    names = {"q_proj": ("attn_q", 4), "k_proj": ("attn_k", 2), "v_proj": ("attn_v", None),
             "o_proj": ("attn_output", None), "up_proj": ("ffn_up", None)}
    checked = 0
    for layer in range(2):
        for module, (gguf_module, heads) in names.items():
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            A, B = saved[f"{key}.lora_A.weight"].numpy(), saved[f"{key}.lora_B.weight"].numpy()
            a, b = tensors[f"blk.{layer}.{gguf_module}.weight.lora_a"], tensors[f"blk.{layer}.{gguf_module}.weight.lora_b"]
            if heads:
                b = rope_unpermute(b, heads)
            r = A.shape[0]
            rank_alpha = config.alpha_pattern.get(module, config.lora_alpha)
            scaling = rank_alpha / (r ** 0.5 if config.use_rslora else r)
            np.testing.assert_allclose((alpha / r) * b @ a, scaling * B @ A, rtol=1e-5, atol=1e-7)
            if not extra:
                assert np.array_equal(a, A) and np.array_equal(b, B)
            checked += 1
    assert checked == 10 and len(tensors) == 20


def _error_line(capsys) -> str:
    """The last stderr line (progress bars of the loading before it are not part of the error)."""
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert lines and lines[-1].startswith("error: ")
    return lines[-1]


def test_refusals_are_one_line_and_write_nothing(adapters, smol_tokenizer, tmp_path, capsys):
    base = adapters["llama", False].parent / "llama-False"
    dora = save_adapter(base, tmp_path / "dora", use_dora=True)
    assert main(["export", "--adapter", str(dora), "--format", "gguf-adapter", "--output",
                 str(tmp_path / "d" / "a.gguf")]) == 2
    assert "DoRA" in _error_line(capsys) and not (tmp_path / "d" / "a.gguf").exists()

    gpt2 = tiny_model("gpt2")
    gpt2.save_pretrained(tmp_path / "gpt2")
    smol_tokenizer.save_pretrained(tmp_path / "gpt2")
    gpt2_adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"),
                                  LoraConfig(r=2, target_modules=["c_attn"]))
    gpt2_adapter.save_pretrained(tmp_path / "gpt2-adapter")
    assert main(["export", "--adapter", str(tmp_path / "gpt2-adapter"), "--output", str(tmp_path / "g.gguf")]) == 2
    err = _error_line(capsys)
    assert "GGUF export supports" in err and "GPT2LMHeadModel" in err and not (tmp_path / "g.gguf").exists()

    existing = tmp_path / "keep.gguf"
    existing.write_bytes(b"precious")
    assert main(["export", "--adapter", str(adapters["llama", True]), "--output", str(existing)]) == 2
    assert existing.read_bytes() == b"precious" and "existing file" in _error_line(capsys)
