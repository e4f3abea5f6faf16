"""Training throughput: lorakit against transformers + peft, same config, same run.

Both sides train examples/quickstart.yaml (built-in SmolLM2-135M-Instruct, the support data,
the same LoRA targets, rank, lr schedule, seed and dtype) for --steps optimizer steps on the SAME
batches (built once by lorakit.data, in the same order). The peer is the plain loop everyone
writes: ``peft.get_peft_model`` + AdamW + ``model(**batch).loss.backward()``.

Each side runs in a fresh subprocess, so peak memory is each process's own peak resident set
size (``ru_maxrss``: model load + training; CPU, so no allocator stats). tokens/s counts the
non-padding input tokens of the training steps, excluding step 1 (warm-up). The sides alternate
(lorakit, peft, lorakit, peft, ... for --repeats rounds) and the best round of each is reported,
so a burst of load from other programs on a shared machine does not decide the ratio.

    python benchmarks/train_throughput.py [--steps 6] [--repeats 2] [key=value overrides for the config]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "quickstart.yaml"


def _config(steps: int, overrides: list[str], output_dir: str):
    from lorakit.config import load_config

    config = load_config(CONFIG, [f"train.max_steps={steps}", "data.eval=null", f"output_dir={output_dir}",
                                  *overrides])
    config.data.train = str(REPO / config.data.train) if not Path(config.data.train).is_absolute() else config.data.train
    return config


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_lorakit(steps: int, overrides: list[str]) -> dict:
    from lorakit.training import train
    from lorakit.training.metrics import MetricsLog

    with tempfile.TemporaryDirectory() as out:
        config = _config(steps, overrides, out)
        result = train(config, progress=False)
        rows = [r for r in MetricsLog(out).rows() if "loss" in r]
    first, last = rows[0], rows[-1]
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]),
            "losses": [r["loss"] for r in rows], "peak_rss_mib": _peak_rss_mib(), "tokens": result.tokens_seen}


def run_peft(steps: int, overrides: list[str]) -> dict:
    import peft
    import torch
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.data import batch_to_device, build_datasets
    from lorakit.data.batching import resolve_packing
    from lorakit.hardware import resolve_precision
    from lorakit.models.load import resolve_model_source
    from lorakit.training.evaluate import count_tokens
    from lorakit.training.plan import StepPlan
    from lorakit.training.schedule import make_scheduler

    config = _config(steps, overrides, tempfile.mkdtemp())
    args, lora = config.train, config.lora
    set_seed(args.seed)
    source, _ = resolve_model_source(config.model)
    # the precision and packing lorakit resolves for its own side (auto: measured on this host)
    dtype = torch.bfloat16 if resolve_precision(args.precision) == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    samples, _, _ = build_datasets(config.data, tokenizer)
    packing = resolve_packing(config.data.packing, model)
    plan = StepPlan(samples, args.batch_size, args.grad_accum, tokenizer.pad_token_id, packing,
                    config.data.max_seq_len, args.seed, args.epochs, args.max_steps,
                    group_by_length=config.data.group_by_length)
    set_seed(args.seed)
    peft_config = peft.LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                  target_modules=lora.target_modules, layers_to_transform=lora.layers_to_transform,
                                  task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, peft_config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, plan.total_steps, args.warmup_ratio, args.scheduler)  # = transformers'
    losses, elapsed, tokens = [], [], []
    for step in range(plan.total_steps):
        batches = plan.step_batches(step)
        assert len(batches) == 1, "the peer loop here does not accumulate; use train.grad_accum=1"
        started = time.perf_counter()
        loss = model(**batch_to_device(batches[0], "cpu")).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed.append(time.perf_counter() - started)
        tokens.append(count_tokens(batches[0]))
        losses.append(float(loss))
    return {"tokens_per_s": sum(tokens[1:]) / sum(elapsed[1:]), "losses": losses, "peak_rss_mib": _peak_rss_mib(),
            "tokens": sum(tokens)}


def _child(side: str, steps: int, overrides: list[str]) -> dict:
    command = [sys.executable, __file__, "--only", side, "--steps", str(steps), *overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{side} run failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds per side (best is kept)")
    parser.add_argument("--only", choices=["lorakit", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is warm-up)")
    if args.only:
        runner = run_lorakit if args.only == "lorakit" else run_peft
        print(json.dumps(runner(args.steps, args.overrides)))
        return 0

    config = _config(args.steps, args.overrides, "unused")
    import torch

    print(f"config: {CONFIG.relative_to(REPO)} {' '.join(args.overrides)} | model {config.model} | "
          f"{config.method} r={config.lora.r} targets={config.lora.target_modules} | precision {config.train.precision} | "
          f"batch {config.train.batch_size} x max_seq_len {config.data.max_seq_len} "
          f"(packing {config.data.packing}) | {args.steps} steps | seed {config.train.seed} | "
          f"torch threads {torch.get_num_threads()}")
    rounds = {"lorakit": [], "peft": []}
    for i in range(max(1, args.repeats)):
        for side in ("lorakit", "peft"):
            print(f"round {i + 1}: running {side} ...", flush=True)
            rounds[side].append(_child(side, args.steps, args.overrides))
            print(f"  {rounds[side][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    ours, theirs = (max(rounds[side], key=lambda r: r["tokens_per_s"]) for side in ("lorakit", "peft"))
    print()
    print(f"{'':26}{'lorakit':>14}{'transformers+peft':>20}{'ratio':>9}")
    print(f"{'tokens/s (best round)':26}{ours['tokens_per_s']:>14.1f}{theirs['tokens_per_s']:>20.1f}"
          f"{ours['tokens_per_s'] / theirs['tokens_per_s']:>8.2f}x")
    print(f"{'peak RSS (MiB)':26}{ours['peak_rss_mib']:>14.0f}{theirs['peak_rss_mib']:>20.0f}"
          f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:>8.2f}x")
    print(f"{'final loss (step N)':26}{ours['losses'][-1]:>14.4f}{theirs['losses'][-1]:>20.4f}")
    print(f"{'tokens trained':26}{ours['tokens']:>14}{theirs['tokens']:>20}")
    diff = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
    print(f"\nper-step losses, lorakit: {[round(x, 4) for x in ours['losses']]}")
    print(f"per-step losses, peft:    {[round(x, 4) for x in theirs['losses']]}")
    print(f"max per-step loss difference: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
