"""The sides of benchmarks/speed.py, each run in a fresh process (``speed.py --side ...``).

A side function returns a JSON-able dict; speed.py prints it as the last line of the child's
stdout. Nothing here prints a table: this module only measures.

- ``fixed_side``: section (a)/(b), fixed-shape steps on random tokens, lorakit or transformers + peft.
- ``trainer_side``: section (c), the peer's whole run: transformers ``Trainer`` + peft over the
  same token ids and labels lorakit builds. (The lorakit side of (c) is the ``lorakit train``
  command itself, started by speed.py; it needs no code here.)
"""

from __future__ import annotations

import resource
import statistics
import time

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
WARMUP_STEPS = 2          # fixed-shape steps excluded from the timing
TRAIN_SEED, EVAL_SEED = 0, 1
IGNORE_INDEX = -100


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _random_batch(vocab: int, batch_size: int, seq_len: int, seed: int):
    """Random tokens, every token labelled (labels = input_ids; the model shifts them)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "use_cache": False}


def _shape_facts(model) -> dict:
    """What the FLOP count needs: base parameters (each tensor once, so a tied head counts once)
    and the attention dimensions."""
    config = model.config
    heads = config.num_attention_heads
    return {"base_params": sum(p.numel() for p in model.parameters()), "layers": config.num_hidden_layers,
            "heads": heads, "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "vocab": config.vocab_size}


def _dtypes(model) -> dict:
    """dtype of the frozen base weights and of the trainable (adapter) weights, as loaded/injected."""
    frozen = {_dtype_name(p.dtype) for p in model.parameters() if not p.requires_grad}
    trainable = {_dtype_name(p.dtype) for p in model.parameters() if p.requires_grad}
    return {"base": "/".join(sorted(frozen)), "adapters": "/".join(sorted(trainable))}


def _load_lorakit(precision: str):
    import lorakit
    from lorakit.models.load import load_model

    base, tokenizer = load_model(MODEL, dtype=precision)
    facts = _shape_facts(base)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=list(TARGETS), **LORA))
    return model, tokenizer, facts


def _load_peer(precision: str):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.models.load import resolve_model_source

    source, _ = resolve_model_source(MODEL)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    facts = _shape_facts(base)
    config = peft.LoraConfig(target_modules=list(TARGETS), task_type="CAUSAL_LM", **LORA)
    return peft.get_peft_model(base, config), _peer_tokenizer(source), facts


def _peer_tokenizer(source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _text_batch(path: str, tokenizer, rows: int = 8) -> dict:
    """The first ``rows`` chat rows of ``path`` as one right-padded batch, prompts masked, tokenized
    by lorakit.data (the same ids and labels on both sides)."""
    from lorakit.data import DataConfig, build_datasets, collate

    samples, _, _ = build_datasets(DataConfig(train=path, max_seq_len=512), tokenizer)
    return collate(samples[:rows], tokenizer.pad_token_id)


def fixed_side(impl: str, precision: str, steps: int, batch_size: int, seq_len: int, lr: float,
               text_eval: str | None = None) -> dict:
    """``steps`` optimizer steps on random (batch_size, seq_len) batches (batch i from seed i),
    then the mean token loss (eval mode, no grad) on a held-out random batch (seed EVAL_SEED +
    10**6) and, given ``text_eval`` (a chat .jsonl), on its first 8 rows of real text.
    Per step: forward, backward, AdamW step, zero_grad; timed with perf_counter."""
    import torch

    torch.manual_seed(TRAIN_SEED)  # adapter init
    model, tokenizer, facts = (_load_lorakit if impl == "lorakit" else _load_peer)(precision)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if impl == "lorakit":
        from lorakit.training.evaluate import batch_loss_sum, loss_sums
        from lorakit.training.optim import make_optimizer

        optimizer = make_optimizer(model, lr, 0.0)

        def step_loss(batch):
            loss_sum, count = batch_loss_sum(model, batch, "cpu")
            return loss_sum / count

        def eval_loss(batch):
            total, count = loss_sums(model, [batch], "cpu")
            return total / count
    else:
        optimizer = torch.optim.AdamW(trainable, lr=lr)  # torch's defaults otherwise

        def step_loss(batch):
            return model(**batch).loss

        @torch.no_grad()
        def eval_loss(batch):
            model.eval()
            try:  # the model's mean over the batch's targets
                return float(model(**batch).loss.float())
            finally:
                model.train()

    times, losses = [], []
    for step in range(steps):
        batch = _random_batch(facts["vocab"], batch_size, seq_len, seed=TRAIN_SEED + step)
        started = time.perf_counter()
        loss = step_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    held_out = eval_loss(_random_batch(facts["vocab"], batch_size, seq_len, seed=EVAL_SEED + 10**6))
    text_loss = eval_loss(_text_batch(text_eval, tokenizer)) if text_eval else None
    measured = times[WARMUP_STEPS:]
    step_s = statistics.median(measured)
    return {"impl": impl, "precision": precision, "step_s": step_s, "step_times": times,
            "tokens_per_s": batch_size * seq_len / step_s, "losses": losses, "last_loss": losses[-1],
            "heldout_loss": float(held_out), "heldout_text_loss": text_loss, "peak_rss_mib": peak_rss_mib(),
            "dtypes": _dtypes(model),
            "torch_threads": torch.get_num_threads(), **facts}


# --- (c): transformers Trainer + peft over lorakit's token ids and labels ----------------------

def _training_arguments(out_dir: str, batch_size: int, lr: float, warmup_ratio: float, seed: int):
    """TrainingArguments with the benchmark's settings and transformers' defaults otherwise.
    transformers 5 folds warmup_ratio into warmup_steps (a float < 1 is a ratio)."""
    import inspect

    from transformers import TrainingArguments

    warmup = {"warmup_ratio": warmup_ratio} if "warmup_ratio" in inspect.signature(TrainingArguments).parameters \
        else {"warmup_steps": warmup_ratio}
    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        num_train_epochs=1, learning_rate=lr, lr_scheduler_type="linear", max_grad_norm=1.0, seed=seed,
        report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=True, **warmup)


def heldout_loss(model, samples: list[dict], collator, batch_size: int) -> tuple[float, int]:
    """(mean token cross-entropy over all labelled eval tokens, their count): per batch the
    model's mean loss x its number of targets, summed, over the total — the same quantity as
    lorakit's eval loss. (Trainer's eval_loss is the mean of per-batch means, which weighs a
    token of a short batch more than one of a long batch.)"""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collator(samples[start:start + batch_size])
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n:
                total += float(model(**batch).loss.float()) * n
                count += n
    return total / max(count, 1), count


def trainer_side(train_path: str, eval_path: str, max_seq_len: int, batch_size: int, lr: float,
                 warmup_ratio: float, seed: int) -> dict:
    """One epoch of transformers Trainer + peft LoRA (fp32), padded to the longest sample of each
    batch, on the samples lorakit.data.build_datasets makes (same ids, same prompt masking), then
    the held-out loss. Timed from inside only for information: speed.py times the whole process."""
    import tempfile

    import peft
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, set_seed

    from lorakit.data import DataConfig, build_datasets
    from lorakit.models.load import resolve_model_source

    started = time.perf_counter()
    source, _ = resolve_model_source(MODEL)
    tokenizer = _peer_tokenizer(source)
    train, evaluation, _ = build_datasets(DataConfig(train=train_path, eval=eval_path, max_seq_len=max_seq_len,
                                                     packing=False), tokenizer)
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=list(TARGETS), task_type="CAUSAL_LM", **LORA))
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    with tempfile.TemporaryDirectory() as out_dir:
        args = _training_arguments(out_dir, batch_size, lr, warmup_ratio, seed)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
        loaded = time.perf_counter()
        result = trainer.train()
        trained = time.perf_counter()
    loss, targets = heldout_loss(model, evaluation, collator, batch_size)
    tokens = sum(len(s["input_ids"]) for s in train)
    return {"train_steps": int(trainer.state.global_step), "train_loss": float(result.training_loss),
            "heldout_loss": loss, "heldout_targets": targets, "train_samples": len(train),
            "train_tokens": tokens, "load_s": loaded - started, "train_s": trained - loaded,
            "eval_s": time.perf_counter() - trained, "peak_rss_mib": peak_rss_mib(),
            "torch_threads": torch.get_num_threads()}
