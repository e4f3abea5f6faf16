"""Preference training end to end on a tiny Llama (real SmolLM2 tokenizer and chat template):
10 DPO steps equal TRL's DPOTrainer + peft step by step; the reference is the base model with
the adapter off (a frozen copy for full fine-tuning); precomputed reference log-probs give the
same losses; an interrupted DPO run resumes with identical losses; every method trains."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lorakit_tiny import step_losses, tiny_llama_dir  # noqa: F401 (fixture)
from preference_helpers import same_adapter, text_dataset

from lorakit.config import TrainingConfig
from lorakit.data import IGNORE_INDEX, build_datasets
from lorakit.data.preference import collate_pairs
from lorakit.training import loop, train
from lorakit.training.checkpoint import latest_checkpoint
from lorakit.training.logprobs import sequence_logps
from lorakit.training.preference import Reference

TARGETS = ["q_proj", "v_proj", "up_proj"]


def write_pairs(path, count: int = 6):
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": f"I think it is {i * 3 + 1}, or maybe not."} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model_dir, tmp_path, name, method="lora", lora=None, objective="dpo", **train_args):
    data = write_pairs(tmp_path / "pairs.jsonl")
    args = {"max_steps": 4, "batch_size": 3, "lr": 1e-2, "seed": 5, "precision": "fp32", "objective": objective,
            "scheduler": "constant"}
    args.update(train_args)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS} if lora is None else lora
    return TrainingConfig.from_dict({"model": str(model_dir), "method": method, "lora": lora,
                                     "data": {"train": str(data), "max_seq_len": 96}, "train": args,
                                     "output_dir": str(tmp_path / name)})


PEFT_LORA = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "lora_dropout": 0.0}


def _ours_and_start(config):
    """lorakit's run of ``config``, and the adapter it started from (the same seed before
    injection as in the run), the tokenizer and lorakit's tokenized samples."""
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    ours = train(config, progress=False)
    base = loop.load_base(config, precision="fp32")[0]
    set_seed(config.train.seed)
    start = loop.inject_adapters(base, config, 10)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    samples, _, _ = build_datasets(config.data, tokenizer)
    return ours, start, tokenizer, samples


def _trl_args(tmp_path) -> dict:
    """The TRL trainer arguments that match ``_config(..., max_steps=10, batch_size=6)``."""
    return dict(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, per_device_train_batch_size=6,
                max_steps=10, learning_rate=1e-2, lr_scheduler_type="constant", optim="adamw_torch",
                max_grad_norm=1.0, weight_decay=0.0, save_strategy="no", logging_steps=1, seed=5, bf16=False)


def _trl_losses(trainer, rows, start) -> list[float]:
    """Train a TRL trainer on lorakit's tokens (``rows``: TRL tokenizes text rows its own way)
    from lorakit's starting adapter; its loss at every step. It must learn."""
    from datasets import Dataset

    trainer.train_dataset = Dataset.from_list(rows)
    same_adapter(trainer, start)
    losses, compute_loss = [], trainer.compute_loss

    def recording(*a, **kw):
        loss = compute_loss(*a, **kw)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording
    trainer.train()
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.01
    return losses


def _assert_same_losses(ours, trl_losses) -> None:
    for step, expected in enumerate(trl_losses, start=1):
        assert ours.losses[step] == pytest.approx(expected, abs=1e-4, rel=0), step


def _split_at_labels(ids, labels):
    """(prompt, completion): the tokens before the first label, and from it to the last label.
    TRL scores every token after the prompt, lorakit the labelled ones (the template's trailing
    newline is not): the tokens after the last label cannot change earlier log-probs of a causal
    LM, so they are cut."""
    marked = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    return ids[: marked[0]], ids[marked[0]: marked[-1] + 1]


def _trl_rows(samples):
    """lorakit's tokenized pairs as TRL's prompt_ids / chosen_ids / rejected_ids."""
    rows = []
    for s in samples:
        prompt, chosen = _split_at_labels(s["chosen_ids"], s["chosen_labels"])
        _, rejected = _split_at_labels(s["rejected_ids"], s["rejected_labels"])
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


def test_ten_dpo_steps_equal_trl_dpo_trainer_with_peft(tiny_llama_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    config = _config(tiny_llama_dir, tmp_path, "ours", max_steps=10, batch_size=6, lora=dict(PEFT_LORA))
    ours, start, tokenizer, samples = _ours_and_start(config)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                         args=DPOConfig(**_trl_args(tmp_path), beta=0.1), train_dataset=text_dataset(),
                         processing_class=tokenizer, peft_config=PeftLoraConfig(**PEFT_LORA))
    trl_losses = _trl_losses(trainer, _trl_rows(samples), start)
    assert trl_losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the start
    _assert_same_losses(ours, trl_losses)


def _kto_rows(samples):
    """lorakit's KTO rows as TRL's prompt_ids / completion_ids / KL_completion_ids / label (the KL
    completion of row i is row i-1's: TRL's rotation within a batch that holds the whole data set)."""
    parts = [_split_at_labels(s["input_ids"], s["labels"]) for s in samples]
    return [{"prompt_ids": parts[i][0], "completion_ids": parts[i][1], "KL_completion_ids": parts[i - 1][1],
             "label": s["desirable"]} for i, s in enumerate(samples)]


def test_ten_kto_steps_equal_trl_kto_trainer_with_peft(tiny_llama_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i + i % 2}.", "label": i % 2 == 0}
            for i in range(6)]
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(tiny_llama_dir, tmp_path, "ours", objective="kto", max_steps=10, batch_size=6, beta=0.5,
                     desirable_weight=1.2, lora=dict(PEFT_LORA))
    config.data.train = str(tmp_path / "kto.jsonl")
    ours, start, tokenizer, samples = _ours_and_start(config)
    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                         args=KTOConfig(**_trl_args(tmp_path), beta=0.5, desirable_weight=1.2),
                         train_dataset=text_dataset(kto=True), processing_class=tokenizer,
                         peft_config=PeftLoraConfig(**PEFT_LORA))
    _assert_same_losses(ours, _trl_losses(trainer, _kto_rows(samples), start))


def test_reference_is_the_base_model_with_the_adapter_off(tiny_llama_dir, tmp_path, smol_tokenizer):
    from lorakit import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _config(tiny_llama_dir, tmp_path, "ref")
    samples, _, _ = build_datasets(config.data, smol_tokenizer)
    batch = collate_pairs(samples, smol_tokenizer.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        own, counts = sequence_logps(base, *args)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                             LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        policy, _ = sequence_logps(adapted, *args)
    reference = Reference(model=adapted).logps(*args)
    torch.testing.assert_close(reference, own, atol=1e-5, rtol=0)
    assert (policy - own).abs().max() > 1e-2                       # the adapter does change the policy
    # log-probs are fp32 sums over the answer tokens only, each a log-probability
    assert reference.dtype == torch.float32 and (counts > 0).all() and (reference < 0).all()
    logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    row_logps = torch.log_softmax(logits[0, :-1].float(), -1).gather(1, batch["input_ids"][0, 1:, None]).squeeze(1)
    mask = batch["labels"][0, 1:] != IGNORE_INDEX
    torch.testing.assert_close(own[0], row_logps[mask].sum(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_reference_log_probs_give_the_same_losses(tiny_llama_dir, tmp_path, objective):
    if objective == "kto":
        rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i + i % 2}.", "label": i % 2 == 0}
                for i in range(6)]
        (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for precompute in (False, True):
        config = _config(tiny_llama_dir, tmp_path, f"{objective}-{precompute}", objective=objective, grad_accum=2,
                         batch_size=2, precompute_ref_log_probs=precompute)
        if objective == "kto":
            config.data.train = str(tmp_path / "kto.jsonl")
        runs[precompute] = train(config, progress=False).losses
    assert len(runs[True]) == 4
    for step, loss in runs[False].items():
        assert runs[True][step] == pytest.approx(loss, abs=1e-5, rel=0)
    assert runs[True][4] != pytest.approx(runs[True][1], abs=1e-4)  # the adapter moved the losses


def test_gradient_accumulation_gives_the_loss_of_one_big_batch(tiny_llama_dir, tmp_path):
    one = train(_config(tiny_llama_dir, tmp_path, "one", objective="orpo", batch_size=6, max_steps=2), progress=False)
    split = train(_config(tiny_llama_dir, tmp_path, "split", objective="orpo", batch_size=2, grad_accum=3,
                          max_steps=2), progress=False)
    for step in (1, 2):
        assert split.losses[step] == pytest.approx(one.losses[step], abs=1e-5, rel=0)


def test_interrupted_dpo_run_resumes_with_identical_losses(tiny_llama_dir, tmp_path, monkeypatch):
    def config(name, **kw):
        return _config(tiny_llama_dir, tmp_path, name, max_steps=5, batch_size=2, grad_accum=2, warmup_ratio=0.2,
                       scheduler="cosine", **kw)

    reference = train(config("whole"), progress=False)
    real_step, calls = loop._forward_backward, []

    def interrupting_step(model, micro_batches, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(model, micro_batches, *args)

    monkeypatch.setattr(loop, "_forward_backward", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        train(config("cut"), progress=False)
    assert latest_checkpoint(tmp_path / "cut").name == "step-000002"
    monkeypatch.setattr(loop, "_forward_backward", real_step)
    resumed = train(config("cut", resume=True), progress=False)
    assert sorted(resumed.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed.losses[step] == pytest.approx(reference.losses[step], abs=1e-6, rel=0)
    assert step_losses(tmp_path / "cut") == pytest.approx(step_losses(tmp_path / "whole"), abs=1e-6)


def test_metrics_rows_carry_trl_reward_names_and_eval_reports_preference_accuracy(tiny_llama_dir, tmp_path, capsys):
    from lorakit.cli import main

    config = _config(tiny_llama_dir, tmp_path, "metrics", max_steps=3, logging_steps=1)
    config.data.eval = config.data.train
    result = train(config, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in r for r in steps)
    first = steps[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0.0
    assert all(r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
               for r in steps)
    evals = [r for r in rows if "eval_loss" in r]
    assert evals[0]["eval_rewards/accuracies"] == 0.0 and "eval_rewards/accuracies" in evals[-1]
    assert result.eval_metrics["rewards/accuracies"] == evals[-1]["eval_rewards/accuracies"]
    # lorakit eval on the held-out preference file: the same figures as the run's final evaluation
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "metrics"), "--data", config.data.eval,
                 "--max-seq-len", "96"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "preference accuracy" in printed[0]
    reported = json.loads(printed[-1])
    assert reported["rewards/accuracies"] == result.eval_metrics["rewards/accuracies"]
    assert reported["loss"] == pytest.approx(result.eval_loss, abs=1e-5)
    assert main(["eval", "--model", str(tiny_llama_dir), "--data", config.data.eval, "--max-seq-len", "96"]) == 0
    base = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert base["rewards/accuracies"] == 0.0 and base["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert base["logps/accuracies"] == evals[0]["eval_logps/accuracies"]


METHODS = {
    "lora": ("lora", None),
    "dora": ("lora", {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "use_dora": True}),
    "full": ("full", {"trainable_modules": ["q_proj", "v_proj"]}),
}


@pytest.mark.parametrize("name,objective", [("lora", "dpo"), ("dora", "dpo"), ("full", "dpo"), ("full", "kto"),
                                            ("dora", "ipo"), ("lora", "kto")])
def test_every_method_starts_at_its_reference_and_learns(tiny_llama_dir, tmp_path, name, objective):
    method, lora = METHODS[name]
    config = _config(tiny_llama_dir, tmp_path, name, method=method, lora=lora, objective=objective, max_steps=4,
                     batch_size=6, lr=2e-2)
    if objective == "kto":
        rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i + i % 2}.", "label": i % 2 == 0}
                for i in range(6)]
        (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config.data.train = str(tmp_path / "kto.jsonl")
    losses = train(config, progress=False).losses
    start = {"dpo": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2, "kto": 0.5}[objective]
    assert losses[1] == pytest.approx(start, abs=1e-5)  # policy = reference before the first update
    assert losses[4] < losses[1]


@pytest.mark.parametrize("method,lora", [
    ("qlora", {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "compute_dtype": "float32"}),
    ("adalora", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "lora_alpha": 8, "target_modules": TARGETS}),
])
def test_qlora_and_adalora_smoke(tiny_llama_dir, tmp_path, method, lora):
    pytest.importorskip("bitsandbytes") if method == "qlora" else None
    config = _config(tiny_llama_dir, tmp_path, method, method=method, lora=lora, max_steps=3, batch_size=6, lr=2e-2)
    result = train(config, progress=False)
    # QLoRA's reference is the same 4-bit base with the adapter off; AdaLoRA starts with Λ = 0
    assert result.losses[1] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(loss) for loss in result.losses.values()) and result.losses[3] != result.losses[1]
    assert (tmp_path / method / "adapter_model.safetensors").is_file()


def _pair_rows(samples):
    """lorakit's pairs in the layout of TRL's CPO / ORPO trainers (their tokenize_row output)."""
    rows = []
    for s in samples:
        first = next(i for i, label in enumerate(s["chosen_labels"]) if label != IGNORE_INDEX)
        row = {"prompt_input_ids": s["chosen_ids"][:first], "prompt_attention_mask": [1] * first}
        for side in ("chosen", "rejected"):
            row.update({f"{side}_input_ids": s[f"{side}_ids"], f"{side}_attention_mask": [1] * len(s[f"{side}_ids"]),
                        f"{side}_labels": s[f"{side}_labels"]})
        rows.append(row)
    return rows


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_ten_orpo_and_simpo_steps_equal_trl_trainers_with_peft(tiny_llama_dir, tmp_path, objective):
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForCausalLM

    knobs = {"orpo": {"beta": 0.2}, "simpo": {"beta": 2.0, "simpo_gamma": 0.6, "cpo_alpha": 1.0}}[objective]
    config = _config(tiny_llama_dir, tmp_path, "ours", objective=objective, max_steps=10, batch_size=6, **knobs,
                     lora=dict(PEFT_LORA))
    ours, start, tokenizer, samples = _ours_and_start(config)
    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        knobs = dict(knobs, loss_type="simpo")
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                      args=Config(**_trl_args(tmp_path), remove_unused_columns=False, **knobs),
                      train_dataset=text_dataset(), processing_class=tokenizer, peft_config=PeftLoraConfig(**PEFT_LORA))
    _assert_same_losses(ours, _trl_losses(trainer, _pair_rows(samples), start))
