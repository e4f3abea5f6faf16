"""DPO training speed and peak memory: lorakit against TRL's DPOTrainer + peft, in one run.

Built-in model (SmolLM2-135M-Instruct, fp32), LoRA r=16, alpha=32 on every linear layer of every
block, DPO beta=0.1, batch 4 pairs, AdamW lr 5e-5, constant schedule, reference = the same model
with the adapter off (both sides), reference log-probs computed every step (TRL's default; pass
--precompute for both sides to precompute them). Data: the first --rows pairs of
examples/data/docstring_pref_train.jsonl, tokenized once by lorakit (chat template, prompt
masked) and given to both sides as the same token ids (TRL gets prompt_ids / chosen_ids /
rejected_ids), so both train on exactly the same tokens.

    python benchmarks/dpo_speed.py [--warmup 2] [--steps 8] [--repeats 2] [--rows 64] [--precompute]
    python benchmarks/dpo_speed.py --tiny     # smoke: a tiny random Llama, 2 + 2 steps (no figures)

Each side runs in its own fresh subprocess (neither inherits the other's heap); with --repeats R
the sides alternate (A B, B A, ...) and the fastest median step counts (memory: the lowest peak),
which damps the noise of a shared machine. Step time: the median over the timed steps of the
wall time of one optimizer step (policy + reference forwards, backward, AdamW); lorakit's from
its metrics.jsonl (elapsed_s per step), TRL's from a TrainerCallback around each step. Peak
memory (CPU, Linux): the process's peak resident set size (VmHWM) over the whole run (model,
data, training); "train peak" subtracts the resident size just before training started.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "docstring_pref_train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, RANK, LR, BETA, MAX_LEN = 4, 16, 5e-5, 0.1, 192


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _model_dir(tiny: bool, work: Path) -> str:
    """The built-in model's cached transformers directory, or a tiny random Llama saved with its tokenizer."""
    from lorakit.models.load import builtin_gguf_path, gguf_to_transformers_dir

    builtin = gguf_to_transformers_dir(builtin_gguf_path("smollm2-135m-instruct"))
    if not tiny:
        return str(builtin)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(builtin)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(work / "tiny")
    tokenizer.save_pretrained(work / "tiny")
    return str(work / "tiny")


def _data(work: Path, rows: int) -> Path:
    path = work / "pairs.jsonl"
    path.write_text("".join(DATA.read_text().splitlines(keepends=True)[:rows]))
    return path


def _lorakit_config(model_dir: str, data: Path, out: Path, steps: int, precompute: bool):
    from lorakit.config import TrainingConfig

    return TrainingConfig.from_dict({
        "model": model_dir, "lora": {"r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0, "target_modules": TARGETS},
        "data": {"train": str(data), "max_seq_len": MAX_LEN, "group_by_length": False},
        "train": {"objective": "dpo", "beta": BETA, "max_steps": steps, "batch_size": BATCH, "lr": LR,
                  "scheduler": "constant", "precision": "fp32", "seed": 0, "compile": False,
                  "precompute_ref_log_probs": precompute},
        "output_dir": str(out)})


def _run_lorakit(model_dir: str, data: Path, work: Path, steps: int,
                 precompute: bool) -> tuple[list[float], list[float]]:
    from lorakit.training import train

    result = train(_lorakit_config(model_dir, data, work / "lorakit", steps, precompute), progress=False)
    rows = [json.loads(line) for line in (work / "lorakit" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [row["elapsed_s"] for row in rows if "loss" in row]
    times = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]
    return times, [result.losses[s] for s in sorted(result.losses)]


def _trl_rows(samples: list[dict]) -> list[dict]:
    """lorakit's pairs as prompt_ids / chosen_ids / rejected_ids (answer up to its last labelled token)."""
    def split(ids, labels):
        marked = [i for i, label in enumerate(labels) if label != -100]
        return ids[: marked[0]], ids[marked[0]: marked[-1] + 1]

    rows = []
    for s in samples:
        prompt, chosen = split(s["chosen_ids"], s["chosen_labels"])
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen,
                     "rejected_ids": split(s["rejected_ids"], s["rejected_labels"])[1]})
    return rows


def _run_trl(model_dir: str, data: Path, work: Path, steps: int, precompute: bool) -> tuple[list[float], list[float]]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lorakit.data import DataConfig, build_datasets

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples, _, _ = build_datasets(DataConfig(train=str(data), max_seq_len=MAX_LEN), tokenizer)
    dataset = Dataset.from_list(_trl_rows(samples))
    times, losses = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = DPOConfig(output_dir=str(work / "trl"), report_to=[], use_cpu=True, per_device_train_batch_size=BATCH,
                     max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch", beta=BETA,
                     save_strategy="no", logging_steps=1, seed=0, bf16=False, max_length=MAX_LEN,
                     precompute_ref_log_probs=precompute, disable_tqdm=True)
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
                         train_dataset=placeholder, processing_class=tokenizer, callbacks=[StepTimer()],
                         peft_config=LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS))
    trainer.train_dataset = dataset  # the same token ids as lorakit's (TRL would tokenize text its own way)
    if precompute:
        trainer.train_dataset = trainer._precompute_ref_logps(dataset, "train", BATCH)
    trainer.train()
    return times, losses


def _child(side: str, warmup: int, steps: int, rows: int, precompute: bool, tiny: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"dpo-speed-{side}-"))
    model_dir, data = _model_dir(tiny, work), _data(work, rows)
    rss_before = _status_kib("VmRSS")
    run = _run_lorakit if side == "lorakit" else _run_trl
    times, losses = run(model_dir, data, work, warmup + steps, precompute)
    peak = _status_kib("VmHWM")
    timed = times[warmup:]
    return {"side": side, "s_per_step": statistics.median(timed) if timed else None, "steps": len(times),
            "peak_rss_mib": round(peak / 1024, 1), "train_peak_mib": round((peak - rss_before) / 1024, 1),
            "losses": losses[: warmup + steps]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--precompute", action="store_true", help="precompute reference log-probs on both sides")
    parser.add_argument("--tiny", action="store_true", help="smoke run on a tiny random Llama (no figures)")
    parser.add_argument("--child", choices=["lorakit", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.warmup, args.steps, args.repeats, args.rows = 2, 2, 1, 16
    if args.child:
        result = _child(args.child, args.warmup, args.steps, args.rows, args.precompute, args.tiny)
        print("RESULT " + json.dumps(result))
        return 0
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        order = ["lorakit", "trl"] if repeat % 2 == 0 else ["trl", "lorakit"]
        for side in order:
            command = [sys.executable, __file__, "--child", side, "--warmup", str(args.warmup), "--steps",
                       str(args.steps), "--rows", str(args.rows)] + (["--precompute"] if args.precompute else []) \
                + (["--tiny"] if args.tiny else [])
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{side} run failed (exit {done.returncode})")
            result = json.loads(lines[-1][len("RESULT "):])
            print(json.dumps(result))
            kept = best.setdefault(side, result)
            if result["s_per_step"] is not None and result["s_per_step"] < (kept["s_per_step"] or float("inf")):
                kept["s_per_step"] = result["s_per_step"]
            kept["peak_rss_mib"] = min(kept["peak_rss_mib"], result["peak_rss_mib"])
            kept["train_peak_mib"] = min(kept["train_peak_mib"], result["train_peak_mib"])
    ours, theirs = best["lorakit"], best["trl"]
    print(f"\n{'side':<10}{'s/step':>10}{'peak RSS MiB':>15}{'train peak MiB':>16}")
    for row in (ours, theirs):
        print(f"{row['side']:<10}{row['s_per_step']:>10.3f}{row['peak_rss_mib']:>15.1f}{row['train_peak_mib']:>16.1f}")
    print(f"lorakit / TRL: time {ours['s_per_step'] / theirs['s_per_step']:.2f}x, "
          f"peak RSS {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x"
          + ("  (tiny smoke run: not a measurement)" if args.tiny else ""))
    first = [round(x, 4) for x in ours["losses"][:2]], [round(x, 4) for x in theirs["losses"][:2]]
    print(f"first losses (step 1 is ln 2 on both sides; later steps see other pairs): lorakit {first[0]}, "
          f"TRL {first[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
