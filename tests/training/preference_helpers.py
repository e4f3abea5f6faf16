"""Shared by the preference tests: random token pairs, the same batch in lorakit's and TRL's layouts,
lorakit and peft models holding the same adapter weights, and TRL trainers around the peft one."""

from __future__ import annotations

import copy
import random

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model as peft_get_peft_model
from peft.utils import set_peft_model_state_dict
from tiny_models import ARCHS, VOCAB, tiny_model

from lorakit import LoraConfig, get_peft_model
from lorakit.data import IGNORE_INDEX

PAD = 0


def random_examples(count: int, seed: int, kto: bool = False) -> list[dict]:
    """TRL's tokenized rows: prompt_ids + chosen_ids / rejected_ids (or completion_ids + label)."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]

    if kto:
        return [{"prompt_ids": ids(2, 6), "completion_ids": ids(1, 6), "label": i % 3 != 1} for i in range(count)]
    return [{"prompt_ids": ids(2, 6), "chosen_ids": ids(1, 6), "rejected_ids": ids(1, 6)} for _ in range(count)]


def _labelled(prompt, answer):
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def lorakit_samples(examples: list[dict]) -> list[dict]:
    """The same rows as lorakit samples (pairs, or KTO rows with TRL's in-batch KL rotation)."""
    if "chosen_ids" in examples[0]:
        samples = []
        for e in examples:
            chosen = _labelled(e["prompt_ids"], e["chosen_ids"])
            rejected = _labelled(e["prompt_ids"], e["rejected_ids"])
            samples.append({"chosen_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
                            "rejected_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]})
        return samples
    samples = []
    for i, e in enumerate(examples):
        own = _labelled(e["prompt_ids"], e["completion_ids"])
        kl = _labelled(e["prompt_ids"], examples[i - 1]["completion_ids"])
        samples.append({"input_ids": own["input_ids"], "labels": own["labels"], "desirable": e["label"],
                        "kl_input_ids": kl["input_ids"], "kl_labels": kl["labels"]})
    return samples


def trl_kto_examples(examples: list[dict]) -> list[dict]:
    """KTO rows with TRL's KL completions: rotated by one within the batch."""
    return [dict(e, KL_completion_ids=examples[i - 1]["completion_ids"]) for i, e in enumerate(examples)]


def adapter_config(arch: str, cls, **extra):
    return cls(r=4, lora_alpha=8, target_modules=ARCHS[arch][1], init_lora_weights=False, lora_dropout=0.0, **extra)


def twin_models(arch: str, **extra):
    """(lorakit model, the same tiny base for TRL, peft config): TRL gets the base and a
    peft_config, so that its reference is the adapter switched off (given a PeftModel, TRL keeps
    a copy of the adapter as the reference instead); ``same_adapter`` then copies our weights."""
    base = tiny_model(arch)
    torch.manual_seed(3)
    ours = get_peft_model(copy.deepcopy(base), adapter_config(arch, LoraConfig, **extra))
    disable_dropout(ours)
    return ours, copy.deepcopy(base), adapter_config(arch, PeftLoraConfig, **extra)


def disable_dropout(model) -> None:
    """As TRL's trainers do to their model by default (disable_dropout=True): GPT-2 has dropout 0.1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def same_adapter(trainer, ours):
    """Put lorakit's adapter weights into the peft model a TRL trainer built; returns that model."""
    theirs = trainer.model
    assert list(theirs.peft_config) == ["default"]  # no "ref" adapter: the reference is the base
    result = set_peft_model_state_dict(theirs, ours.adapter_state_dict())
    assert not result.unexpected_keys
    return theirs


def peft_twin(arch: str, ours, **extra):
    """A peft model on a fresh copy of the tiny base with lorakit's adapter weights."""
    theirs = peft_get_peft_model(tiny_model(arch), adapter_config(arch, PeftLoraConfig, **extra))
    set_peft_model_state_dict(theirs, ours.adapter_state_dict())
    return theirs


def lora_grads(ours, theirs) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, lorakit grad, peft grad) of every trainable adapter tensor."""
    grads_theirs = {n.replace(".default", "").removeprefix("base_model.model."): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    return [(n, p.grad, grads_theirs[n.replace(".default", "")])
            for n, p in ours.model.named_parameters() if p.requires_grad]


def assert_grads_close(ours, theirs, rel: float = 1e-4) -> None:
    pairs = lora_grads(ours, theirs)
    assert pairs and all(g is not None for _, g, _ in pairs)
    for name, mine, ref in pairs:
        scale = ref.abs().max().clamp(min=1e-8)
        assert float((mine - ref).abs().max() / scale) < rel, name
    assert any(float(g.abs().max()) > 0 for _, g, _ in pairs)  # the loss reaches the adapters


def text_dataset(kto: bool = False):
    """A small text dataset for constructing a TRL trainer (its own tokenization is not used)."""
    from datasets import Dataset

    if kto:
        return Dataset.from_list([{"prompt": "a b", "completion": "c", "label": i % 2 == 0} for i in range(4)])
    return Dataset.from_list([{"prompt": "a b", "chosen": "c", "rejected": "d"} for _ in range(4)])
