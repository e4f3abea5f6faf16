"""Helpers for training and CLI tests: a tiny random Llama whose vocabulary is the real
SmolLM2 tokenizer's (saved with it to a directory), small chat datasets, and configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[2]
SUPPORT_TRAIN = REPO / "examples" / "data" / "support_train.jsonl"
SUPPORT_EVAL = REPO / "examples" / "data" / "support_eval.jsonl"


def save_tiny_llama(directory: Path, tokenizer, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 32) with the tokenizer's vocabulary, saved with the tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def write_chat_subset(path: Path, source: Path = SUPPORT_TRAIN, rows: int = 24) -> Path:
    lines = source.read_text().splitlines()[:rows]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def tiny_config_dict(model_dir: Path, data_dir: Path, output_dir: Path, **train) -> dict:
    train_file = write_chat_subset(data_dir / "train.jsonl", rows=24)
    eval_file = write_chat_subset(data_dir / "eval.jsonl", SUPPORT_EVAL, rows=8)
    # fp32 pinned: the default (auto) would pick bf16 on a host with native bf16
    args = {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "seed": 7, "logging_steps": 1, "precision": "fp32"}
    args.update(train)
    return {
        "model": str(model_dir),
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "data": {"train": str(train_file), "eval": str(eval_file), "max_seq_len": 128},
        "train": args,
        "output_dir": str(output_dir),
    }


def step_losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer):
    """Import this fixture into a test module: ``from lorakit_tiny import tiny_llama_dir``."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)
