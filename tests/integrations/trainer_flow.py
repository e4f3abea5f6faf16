"""Shared pieces of the Trainer / TRL integration tests: a tiny random Llama with tied input and
output embeddings (what made Trainer's full-model save fail), lorakit adapters on it, data, and
the run every test makes: 4 optimizer steps with a checkpoint every 2, then ``save_model``.

``main`` runs the whole flow with transformers' Trainer and TRL's SFTTrainer (``test_no_peft``
runs it in a process where peft cannot be imported); ``python trainer_flow.py ddp OUT [CHECKPOINT]``
under torchrun is one process of a DDP run (``test_trainer_ddp``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from lorakit import LoraConfig, get_peft_model

STEPS, SAVE_EVERY = 4, 2
VOCAB = 128
TARGETS = ["q_proj", "v_proj"]
# lora_dropout 0 and fp32: a resumed run must equal an uninterrupted one exactly
ADAPTERS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0),
    "dora": dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_dora=True),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                            modules_to_save=["down_proj"]),
}


def tied_llama(vocab_size: int = VOCAB, pad: int = 0, bos: int = 1, eos: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama (hidden 32) whose lm_head shares embed_tokens' weight."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def adapted_llama(kind: str = "lora", **base):
    """``tied_llama`` with a lorakit adapter of ``kind`` (ADAPTERS); the same weights every call."""
    model = tied_llama(**base)
    torch.manual_seed(1)  # lora_A's random init
    return get_peft_model(model, LoraConfig(**ADAPTERS[kind]))


def token_dataset(rows: int = 16, length: int = 12) -> Dataset:
    """Random token rows, labels = input ids (Trainer's default collator stacks them)."""
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(2))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def run_args(output_dir: Path, args_class=TrainingArguments, **extra):
    """4 steps of batch 2 in fp32 on the CPU, a checkpoint every 2 steps, no reporting."""
    values = dict(output_dir=str(output_dir), max_steps=STEPS, save_strategy="steps", save_steps=SAVE_EVERY,
                  per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                  bf16=False, seed=3, disable_tqdm=True)
    values.update(extra)
    return args_class(**values)


def adapter_values(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their file names, detached copies."""
    return {key: value.detach().clone() for key, value in model.adapter_state_dict().items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def chat_dataset(rows: int = 16) -> Dataset:
    """Short two-turn chats in the ``messages`` format SFTTrainer applies a chat template to."""
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                            {"role": "assistant", "content": f"It is {2 * i}."}]}
                              for i in range(rows)])


def main(out: Path, tokenizer_dir: str) -> None:
    """Trainer: train with checkpoints, save, resume from checkpoint-2 to the same adapter;
    SFTTrainer: train with checkpoints and save. Asserts the adapter files are where they belong."""
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from lorakit.integrations.transformers import Trainer
    from lorakit.integrations.trl import SFTTrainer

    first = adapted_llama()
    trainer = Trainer(model=first, args=run_args(out / "trainer"), train_dataset=token_dataset())
    trainer.train()
    trainer.save_model()
    resumed = adapted_llama()
    Trainer(model=resumed, args=run_args(out / "resumed"), train_dataset=token_dataset()).train(
        resume_from_checkpoint=str(out / "trainer" / "checkpoint-2"))
    assert max_difference(adapter_values(first), adapter_values(resumed)) == 0.0

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = adapted_llama(vocab_size=len(tokenizer), pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id,
                          eos=tokenizer.eos_token_id)
    trainer = SFTTrainer(model=model, args=run_args(out / "sft", SFTConfig, max_length=64),
                         train_dataset=chat_dataset(), processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    for directory in ("trainer", "trainer/checkpoint-2", "sft", "sft/checkpoint-2"):
        assert (out / directory / "adapter_model.safetensors").is_file(), directory


def ddp_main(out: Path, resume_from: str | None) -> None:
    """One process of a DDP run (under torchrun): 4 steps of batch 1 per process, checkpoints,
    save_model; rank 0 writes the final adapter to ``out/final_adapter.pt``."""
    import torch.distributed as dist

    from lorakit.integrations.transformers import Trainer

    model = adapted_llama()
    trainer = Trainer(model=model, args=run_args(out, per_device_train_batch_size=1), train_dataset=token_dataset())
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    if dist.get_rank() == 0:
        torch.save(adapter_values(model), out / "final_adapter.pt")


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        ddp_main(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        main(Path(sys.argv[1]), sys.argv[2])
