"""Tiny random causal LMs of several architectures, built from configs in code (no download).

Each entry: architecture name -> (factory, LoRA targets typical for it). Sizes are chosen so
a forward pass takes milliseconds while keeping the real module structure (GQA, fused qkv,
GPT-2's Conv1D, Gemma's scaled embeddings, Phi-3's fused gate_up).
"""

from __future__ import annotations

import torch
from transformers import (GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

FP32_ATOL = 1e-5  # one tolerance for fp32 comparisons, used by every equivalence test
VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**_COMMON))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**_COMMON))


def _mistral():
    return MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=None))


def _gemma():
    return GemmaForCausalLM(GemmaConfig(**_COMMON, head_dim=8))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _phi3():
    cfg = dict(_COMMON, num_key_value_heads=4)
    return Phi3ForCausalLM(Phi3Config(**cfg))


ARCHS = {
    "llama": (_llama, ["q_proj", "v_proj"]),
    "qwen2": (_qwen2, ["q_proj", "k_proj", "v_proj"]),
    "mistral": (_mistral, ["q_proj", "v_proj", "down_proj"]),
    "gemma": (_gemma, ["q_proj", "o_proj", "up_proj"]),
    "gpt2": (_gpt2, ["c_attn", "c_fc"]),
    "phi3": (_phi3, ["qkv_proj", "gate_up_proj"]),
}


def tiny_model(arch: str, seed: int = 0):
    """A fresh tiny model in eval mode with deterministic random weights."""
    torch.manual_seed(seed)
    factory, _ = ARCHS[arch]
    return factory().eval()


def sample_input_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)
