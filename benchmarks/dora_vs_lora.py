"""Training step time and peak memory of DoRA against LoRA, lorakit against peft, in one run.

Built-in model (SmolLM2-135M-Instruct, fp32, via lorakit.load_model), adapters on every linear
layer ("all-linear"), r=16, alpha=32, batch 4 x 256 tokens, AdamW(lr=1e-4); each step is
forward + backward + optimizer step + zero_grad. Four configurations:

  lorakit LoRA   lorakit DoRA   peft LoRA   peft DoRA

    python benchmarks/dora_vs_lora.py [--warmup 2] [--steps 5] [--threads N] [--repeats R]

Each configuration runs in its own fresh subprocess (so one cannot inherit another's heap).
Step time: median of the timed steps; with --repeats R the configurations run R times in
alternating order (A B C D, D C B A, ...) and the fastest median counts, which damps the noise
of a shared machine (memory: the lowest peak). Peak memory (CPU, Linux): the process's peak resident
set size (VmHWM). After the model is loaded and the adapters injected, the subprocess resets
the high-water mark (``echo 5 > /proc/self/clear_refs``) and reads VmRSS; after the steps it
reads VmHWM. "peak RSS" is that high-water mark (weights + activations + gradients + optimizer
state + allocator slack + the Python/torch runtime); "train peak" is VmHWM minus the RSS before
the first step, i.e. what training itself adds on top of the loaded model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = [("lorakit", False), ("lorakit", True), ("peft", False), ("peft", True)]
BATCH, SEQ, RANK = 4, 256, 16


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _run_one(library: str, use_dora: bool, warmup: int, steps: int) -> dict:
    import torch

    from lorakit import load_model

    torch.manual_seed(0)
    model, _ = load_model("smollm2-135m-instruct")
    kwargs = dict(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", use_dora=use_dora)
    if library == "lorakit":
        from lorakit import LoraConfig, get_peft_model
    else:
        from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(**kwargs))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS high-water mark
        f.write("5")
    rss_before = _status_kib("VmRSS")
    times, losses = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if step >= warmup:
            times.append(elapsed)
    peak = _status_kib("VmHWM")
    return {"library": library, "dora": use_dora, "step_s": statistics.median(times), "times": times,
            "peak_rss_mib": peak / 1024, "train_peak_mib": (peak - rss_before) / 1024,
            "trainable": sum(p.numel() for p in params), "loss_first": losses[0], "loss_last": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()

    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        library, dora = args.one.split(":")
        print("RESULT " + json.dumps(_run_one(library, dora == "dora", args.warmup, args.steps)))
        return

    runs: dict[tuple, list] = {}
    order = []
    for r in range(args.repeats):
        order += CONFIGS if r % 2 == 0 else CONFIGS[::-1]
    for library, use_dora in order:
        command = [sys.executable, __file__, "--one", f"{library}:{'dora' if use_dora else 'lora'}",
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{library} {'DoRA' if use_dora else 'LoRA'} failed:\n{out.stderr[-3000:]}")
        runs.setdefault((library, use_dora), []).append(json.loads(line[0][len("RESULT "):]))
        print(f"  done: {library} {'DoRA' if use_dora else 'LoRA'}", file=sys.stderr)
    results = []
    for key in CONFIGS:
        best = dict(min(runs[key], key=lambda r: r["step_s"]))
        best["peak_rss_mib"] = min(r["peak_rss_mib"] for r in runs[key])
        best["train_peak_mib"] = min(r["train_peak_mib"] for r in runs[key])
        best["times"] = [t for r in runs[key] for t in r["times"]]
        results.append(best)

    base = {r["library"]: r for r in results if not r["dora"]}
    print(f"\nSmolLM2-135M fp32, all-linear r={RANK}, batch {BATCH}x{SEQ}, AdamW; "
          f"median of {args.steps} steps after {args.warmup} warmup, best of {args.repeats} runs; "
          f"threads={args.threads or 'default'}\n")
    header = (f"{'config':<14}{'step s':>8}{'vs own LoRA':>13}{'peak RSS MiB':>14}{'vs own LoRA':>13}"
              f"{'train peak MiB':>16}{'vs own LoRA':>13}{'trainable':>11}{'loss first->last':>20}")
    print(header)
    print("-" * len(header))
    for r in results:
        ref = base[r["library"]]
        name = f"{r['library']} {'DoRA' if r['dora'] else 'LoRA'}"
        print(f"{name:<14}{r['step_s']:>8.2f}{r['step_s'] / ref['step_s']:>12.2f}x"
              f"{r['peak_rss_mib']:>14.0f}{r['peak_rss_mib'] / ref['peak_rss_mib']:>12.2f}x"
              f"{r['train_peak_mib']:>16.0f}{r['train_peak_mib'] / ref['train_peak_mib']:>12.2f}x"
              f"{r['trainable']:>11,}{r['loss_first']:>10.3f}->{r['loss_last']:.3f}")
    ours, theirs = {r["dora"]: r for r in results if r["library"] == "lorakit"}, \
        {r["dora"]: r for r in results if r["library"] == "peft"}
    print(f"\nlorakit vs peft: LoRA step {ours[False]['step_s'] / theirs[False]['step_s']:.2f}x, "
          f"DoRA step {ours[True]['step_s'] / theirs[True]['step_s']:.2f}x; "
          f"DoRA train peak {ours[True]['train_peak_mib'] / theirs[True]['train_peak_mib']:.2f}x")
    print("step times (s): " + "; ".join(f"{r['library']} {'DoRA' if r['dora'] else 'LoRA'} "
                                         + " ".join(f"{t:.2f}" for t in r["times"]) for r in results))


if __name__ == "__main__":
    main()
