"""Peak memory of QLoRA on a ~3B model: lorakit (streaming load) against transformers + bitsandbytes + peft.

    python benchmarks/make_big_model.py /data/llama-3b          # once: ~6.4 GB of bf16 shards
    python benchmarks/big_model_memory.py --model /data/llama-3b [--steps 3] [--seq 256] [--json PATH]

Each side runs in a fresh process (``--side``), so neither inherits the other's memory, and its
peak RSS is its own ru_maxrss read by ``os.wait4`` when it exits. Both sides do the same work:
load the model with an NF4 (double-quantized) base computing in fp32, add LoRA r=16 / alpha 32
on all 7 linear layers of every block, and run --steps AdamW steps on one row of --seq random
tokens (every token labelled).

- lorakit: ``load_model(dir, quantize=QLoraConfig(...))`` streams the shards into the 4-bit base
  (``lorakit.models.stream_load``), ``get_peft_model``, ``batch_loss_sum`` + ``make_optimizer``.
  lorakit also quantizes the embedding and the tied head (``quantize_embeddings``, its default);
  ``--dense-embeddings`` keeps them dense as transformers does, for a like-for-like row.
- peer: ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, nf4, double quant, compute fp32))`` + ``peft.get_peft_model`` +
  ``model(**batch).loss`` + ``torch.optim.AdamW``.

The table gives each peak against the weights' sizes: fp32 and bf16 (parameters x 4 / x 2) and
the NF4 base as lorakit holds it (``base_weight_memory``), and the target of issue 11: lorakit's
peak <= 1.5 x NF4 bytes + 1 GiB, and below the peer's peak. Needs about 2x the NF4 size of free
memory for lorakit's side and more for the peer's; several minutes per side on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


def _batch(seq: int, vocab: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 49152), (1, seq), generator=generator)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids), "use_cache": False}


def _checkpoint_params(model_dir: str) -> int:
    """Parameters stored in the checkpoint's safetensors files (a tied head once)."""
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def side_lorakit(model_dir: str, steps: int, seq: int, dense_embeddings: bool, checkpointing: bool) -> dict:
    import torch

    from lorakit import get_peft_model
    from lorakit.adapters import QLoraConfig
    from lorakit.adapters.qlora import base_weight_memory
    from lorakit.models.load import load_model
    from lorakit.training.evaluate import batch_loss_sum
    from lorakit.training.loop import enable_grad_checkpointing
    from lorakit.training.optim import make_optimizer

    def config():
        return QLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, compute_dtype="float32",
                           quantize_embeddings=False if dense_embeddings else None)

    started = time.perf_counter()
    model, _ = load_model(model_dir, dtype="float32", quantize=config())
    loaded_s = time.perf_counter() - started
    model = get_peft_model(model, config())
    if checkpointing:  # what train.grad_checkpointing: true does
        enable_grad_checkpointing(model)
    weights = base_weight_memory(model)
    optimizer = make_optimizer(model, 1e-4, 0.0, None)
    model.train()
    batch = _batch(seq, model.model.config.vocab_size)
    losses = []
    for _ in range(steps):
        loss, count = batch_loss_sum(model, batch, "cpu")
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss) / count)
    return {"load_s": loaded_s, "nf4_bytes": weights.total_bytes, "params": _checkpoint_params(model_dir),
            "losses": losses, "seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}


def side_peer(model_dir: str, steps: int, seq: int, checkpointing: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    started = time.perf_counter()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=torch.float32,
                                                 device_map="cpu")
    loaded_s = time.perf_counter() - started
    if checkpointing:  # peft's QLoRA recipe
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    batch = _batch(seq, model.config.vocab_size)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"load_s": loaded_s, "losses": losses, "seconds": time.perf_counter() - started}


def _host() -> str:
    import platform

    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")


def _child(args, side: str) -> dict:
    command = [sys.executable, __file__, "--side", side, "--model", args.model, "--steps", str(args.steps),
               "--seq", str(args.seq)] + (["--dense-embeddings"] if args.dense_embeddings else []) + \
        (["--no-grad-checkpointing"] if not args.grad_checkpointing else [])
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"side {side} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024  # Linux: KiB
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory (benchmarks/make_big_model.py)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dense-embeddings", action="store_true")
    parser.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false",
                        help="keep every layer's activations (both sides); default: gradient checkpointing on both")
    parser.add_argument("--side", choices=["lorakit", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--sides", default="lorakit,peer")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.side == "lorakit":
        print(json.dumps(side_lorakit(args.model, args.steps, args.seq, args.dense_embeddings, args.grad_checkpointing)))
        return 0
    if args.side == "peer":
        print(json.dumps(side_peer(args.model, args.steps, args.seq, args.grad_checkpointing)))
        return 0
    results = {side: _child(args, side) for side in args.sides.split(",")}
    ours = results["lorakit"]
    params = ours["params"]
    target = 1.5 * ours["nf4_bytes"] + GIB
    lines = [f"host: {_host()}",
             f"model {args.model}: {params / 1e9:.2f}B parameters; {args.steps} steps of 1 x {args.seq} tokens, "
             f"gradient checkpointing {'on' if args.grad_checkpointing else 'off'} (both sides)",
             f"weights: fp32 {4 * params / GIB:.2f} GiB, bf16 {2 * params / GIB:.2f} GiB, "
             f"NF4 (lorakit's base) {ours['nf4_bytes'] / GIB:.2f} GiB; target peak <= {target / GIB:.2f} GiB",
             f"{'side':<10}{'peak RSS':>12}{'load s':>9}{'total s':>9}  losses"]
    for side, r in results.items():
        lines.append(f"{side:<10}{r['peak_rss'] / GIB:>11.2f}G{r['load_s']:>9.1f}{r['seconds']:>9.1f}  "
                     f"{', '.join(f'{x:.3f}' for x in r['losses'])}")
    verdict = ours["peak_rss"] <= target and all(ours["peak_rss"] < r["peak_rss"] for s, r in results.items()
                                                  if s != "lorakit")
    lines.append(f"target {'met' if verdict else 'NOT met'}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
