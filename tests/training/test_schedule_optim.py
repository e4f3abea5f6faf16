"""Learning-rate schedules (equal to transformers' at every step) and LoRA+ parameter groups."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

from lorakit import LoraConfig, get_peft_model
from lorakit.training.optim import make_optimizer, param_groups
from lorakit.training.schedule import lr_multiplier, make_scheduler, warmup_steps

REFERENCE = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup,
             "constant": lambda opt, w, total: get_constant_schedule_with_warmup(opt, w)}


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.3])
def test_schedule_matches_transformers_every_step(kind, warmup_ratio):
    total = 20
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    ours = make_scheduler(ours_opt, total, warmup_ratio, kind)
    ref = REFERENCE[kind](ref_opt, warmup_steps(total, warmup_ratio), total)
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ours_opt.step(), ref_opt.step(), ours.step(), ref.step()


def test_schedule_shape():
    assert lr_multiplier(0, 10, 2, "linear") == 0.0 and lr_multiplier(1, 10, 2, "linear") == 0.5
    assert lr_multiplier(2, 10, 2, "linear") == 1.0 and lr_multiplier(6, 10, 2, "linear") == 0.5
    assert lr_multiplier(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(9, 10, 0, "cosine") < 0.05 and lr_multiplier(9, 10, 0, "constant") == 1.0


def _model(arch="llama", targets=("q_proj", "v_proj"), **extra):
    return get_peft_model(tiny_model(arch), LoraConfig(r=4, target_modules=list(targets), **extra))


def test_loraplus_gives_B_ratio_times_the_lr_of_A():
    model = _model("gpt2", ["c_attn", "c_fc"], bias="lora_only")  # GPT-2's adapted layers have biases
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=16)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    named = dict(model.named_parameters())
    b_params = {id(p) for n, p in named.items() if ".lora_B." in n}
    a_params = {id(p) for n, p in named.items() if ".lora_A." in n}
    assert b_params and ids["lora_B"] == b_params and ids["decay"] == a_params
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3) and groups["decay"]["lr"] == pytest.approx(1e-3)
    assert groups["no_decay"]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups["no_decay"]["params"])
    # the ratio holds along the schedule: every group is scaled by the same multiplier
    optimizer = make_optimizer(model, 1e-3, 0.1, loraplus_lr_ratio=16)
    scheduler = make_scheduler(optimizer, 10, 0.2, "cosine")
    for _ in range(5):
        optimizer.step(), scheduler.step()
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["lora_B"] == pytest.approx(16 * lrs["decay"])


def test_without_loraplus_all_matrices_share_one_group():
    model = _model()
    groups = param_groups(model, lr=1e-3, weight_decay=0.0, loraplus_lr_ratio=None)
    assert [g["name"] for g in groups] == ["decay"]
    assert sum(p.numel() for p in groups[0]["params"]) == model.get_nb_trainable_parameters()[0]
