"""Training speed: lorakit against transformers + peft, one table from one run (issue 8, "Build 4").

    python benchmarks/speed.py [--sections abc] [--steps 8] [--repeats N] [--real-rows 600]
                               [--threads N] [--json PATH] [--reprobe]

Progress goes to stderr, the table to stdout. Duration, estimated from short runs on a busy
2-core host: (a)+(b) about 6 minutes with the defaults, (c) about 10-20 minutes at 600 rows
(most of it the peer's padded epoch); --sections and --real-rows make a shorter run.

Method. Every measurement runs in a fresh subprocess (``speed.py --side ...``, or the
``lorakit train`` command itself), so no side inherits another's caches, allocator state or
imports; a child reports JSON on the last line of its stdout. The sides are interleaved —
round 1: lorakit, peer, lorakit, peer ... (every variant of a section once), round 2: the same
again — and the *best round* of each side is kept (highest tokens/s for (a)/(b), shortest
wall time for (c)): on a shared machine a burst of load from other programs slows a round
down, never speeds it up, so the best round is the closest to what the code can do, and
interleaving keeps a slow period from landing on one side only. Peak RSS is the child's
``ru_maxrss`` (its own resource usage at exit, as ``os.wait4`` reports it; Linux counts KiB).

(a) Fixed shapes, fp32: the built-in SmolLM2-135M-Instruct, LoRA r=16, alpha=32, dropout 0 on
    q,k,v,o,gate,up,down of every block, batch 4 x 256 random tokens (batch i from seed i), every
    token labelled, AdamW lr 1e-4, --steps steps of which the first 2 are warm-up. lorakit:
    ``lorakit.get_peft_model`` + ``training.evaluate.batch_loss_sum`` / count +
    ``training.optim.make_optimizer``; peer: ``peft.get_peft_model`` + ``model(**batch).loss`` +
    ``torch.optim.AdamW`` with its defaults. Step time = forward + backward + AdamW + zero_grad,
    the median of the measured steps; tokens/s = batch x seq_len / step time.

    Roofline. The useful work of a LoRA step is the frozen base's matmuls, forward and the
    input gradients backward (no weight gradients for a frozen base), plus attention:
        useful FLOPs = 4 * P * N + 6 * B * h * T^2 * d * L
    P = base parameters, each tensor once (embeddings included; a tied head counts once),
    N = B * T tokens; 4 * P * N = 2PN forward + 2PN for the input gradients. Attention per layer:
    forward = 2 matmuls (QK^T, PV) of 2 * B * h * T^2 * d FLOPs each, halved by the causal mask
    = 2 * B * h * T^2 * d; backward input gradients (dQ, dK, dV, dP) = 2 x forward; h heads of
    size d, L layers. Adapter FLOPs are not counted (they are overhead on top of the base).
    fraction of roofline = useful FLOPs / step time / the host's matmul peak for the base's dtype,
    measured in this run: a 2048^3 matmul (best of 6) before the first child and after every
    child, the highest rate kept (load from other programs only lowers it). The host line shows
    lorakit's cached ``probe_host`` figures (what ``precision: auto`` decides with), which are
    one short 1024^3 measurement and can be far below the peak on a busy machine.
    Besides the last step's loss, each side reports the mean token loss (eval mode) on a held-out
    random batch and on 8 held-out rows of real text (stdlib docstrings, prompts masked).

(b) The same in bf16, only where the probe says bf16 is native: lorakit loads the base with
    ``load_model(..., dtype="bf16")`` (adapters stay fp32, as lorakit does); the peer loads the
    model in bf16 and adds peft LoRA as users do (the dtypes each side ends up with are printed).
    The target compares lorakit-bf16 with the peer in fp32, so the peer's fp32 run of (a) is the
    reference (run here too when (a) is not selected). After training both sides compute the
    mean token cross-entropy (fp32) on one fixed held-out random batch; the target asks the
    lorakit-bf16 value to be within 0.02 of the peer-fp32 value. (A random-token loss is ~13,
    where bf16's ~0.4% relative rounding is ~0.05-0.1 absolute; the same difference on the 8
    real-text rows is printed next to it for that reason.)

(c) Real data: question -> docstring pairs from Python's standard library
    (benchmarks/data/make_stdlib_docstrings.py, --real-rows rows, 5% held out), prompts masked,
    one epoch on both sides. lorakit: the whole ``python -m lorakit.cli train CONFIG --no-progress``
    process with lorakit's defaults (packing auto, group_by_length, precision auto), r=16
    alpha=32 on all 7 linear layers, max_seq_len 512, batch 8, lr 2e-4 linear, warmup 0.03,
    max_grad_norm 1, seed 0; its held-out loss is the last eval_loss of its metrics.jsonl. Peer:
    transformers ``Trainer`` + peft in fp32 with Trainer's defaults (padding to the longest sample
    of each batch) on the token ids and labels ``lorakit.data.build_datasets`` makes (packing
    off), then the held-out loss computed by a plain loop (sum of token CE / labelled tokens,
    batches of 8) — the same quantity as lorakit's eval loss, which Trainer.evaluate()'s mean of
    batch means is not. Wall time = spawn to exit of each process, model load included.
    Equal data, not equal step counts: packing puts several samples in a row, so lorakit's
    epoch can have fewer optimizer steps than the peer's.

Targets (issue 8): (a) >= 1.35x the peer's tokens/s and >= 80% of the roofline; (b) >= 2x the
peer's fp32 tokens/s at a held-out loss within 0.02; (c) wall <= 0.4x the peer's, held-out loss
<= peer + 0.02, peak RSS <= 0.7x the peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _speed_sides as sides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXED_LR = 1e-4
REAL = {"max_seq_len": 512, "batch_size": 8, "lr": 2e-4, "warmup_ratio": 0.03, "seed": 0}
TARGETS = {"a_ratio": 1.35, "a_roofline": 0.80, "b_ratio": 2.0, "b_loss": 0.02,
           "c_wall": 0.4, "c_loss": 0.02, "c_rss": 0.7}


class SideFailed(RuntimeError):
    pass


# --- running children -------------------------------------------------------------------------

def _child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:  # for the lorakit command, which does not take --threads
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def spawn(command: list[str], threads: int | None, label: str) -> dict:
    """Run ``command`` to completion: {"stdout", "stderr", "wall_s", "peak_rss_mib"} (wall time
    from spawn to exit; peak RSS from os.wait4, i.e. that process's own ru_maxrss)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=_child_env(threads), text=True)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): no orphan keeps the CPUs busy
            process.kill()
            process.wait()
            raise
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
        raise SideFailed(f"{label} failed (exit {process.returncode}):\n{tail}")
    return {"stdout": stdout, "stderr": stderr, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def _side_json(run: dict, label: str) -> dict:
    lines = run["stdout"].strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise SideFailed(f"{label}: no JSON on the last line of its output") from None


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- sections (a) and (b): fixed shapes -----------------------------------------------------------

def useful_flops(facts: dict, batch_size: int, seq_len: int) -> tuple[float, float]:
    """(dense, attention) useful FLOPs of one LoRA training step; see the module docstring."""
    dense = 4 * facts["base_params"] * batch_size * seq_len
    attention_forward = 2 * (2 * batch_size * facts["heads"] * seq_len**2 * facts["head_dim"]) / 2
    return dense, 3 * attention_forward * facts["layers"]


def fixed_variants(sections: str, bf16: bool) -> list[tuple[str, str]]:
    """(impl, precision) pairs to run, in round order. (b) compares with the peer in fp32, so it
    brings that variant along when (a) is not selected."""
    variants = [("lorakit", "fp32"), ("peer", "fp32")] if "a" in sections else []
    if "b" in sections and bf16:
        variants += [("lorakit", "bf16"), ("peer", "bf16")]
        if ("peer", "fp32") not in variants:
            variants.append(("peer", "fp32"))
    return variants


class PeakMeter:
    """The host's matmul peak per dtype for the roofline: an (n, n) @ (n, n) matmul, best of
    ``repeats`` after a warm-up, measured in this process at the start and again after every
    fixed-shape child, keeping the highest rate. Load from other programs only lowers a rate, so
    the maximum over the run is the best estimate of what the CPU can do (the cached
    ``probe_host`` figure in the host line is one short 1024^3 measurement, often taken under load)."""

    def __init__(self, dtypes: list[str], n: int = 2048, repeats: int = 6):
        self.dtypes, self.n, self.repeats = dtypes, n, repeats
        self.best: dict[str, float] = {}
        self.count = 0

    def measure(self) -> None:
        import torch

        from lorakit.hardware import matmul_gflops

        for name in self.dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            self.best[name] = max(self.best.get(name, 0.0), matmul_gflops(dtype, self.n, self.repeats))
        self.count += 1

    def summary(self) -> dict:
        return {"gflops": dict(self.best), "measurements": self.count, "n": self.n, "repeats": self.repeats}


def run_fixed(args, variants: list[tuple[str, str]], repeats: int, peaks: PeakMeter, work: Path) -> dict:
    """{(impl, precision): best round's result} over ``repeats`` interleaved rounds; ``peaks``
    is measured between the children. Besides the random held-out batch, each side also reports
    its loss on 8 held-out rows of real text (stdlib docstrings), where losses are of the size
    real training sees (a random-token loss is ~13, which magnifies bf16 rounding)."""
    text = work / "fixed-text"
    build_real_data(200, text, "--eval-size", "8")
    rounds: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
    peaks.measure()
    for i in range(repeats):
        for impl, precision in variants:
            label = f"round {i + 1}/{repeats}: {impl} {precision}"
            command = [sys.executable, __file__, "--side", "fixed", "--impl", impl, "--precision", precision,
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--seq-len", str(args.seq_len), "--eval", str(text / "eval.jsonl")] \
                + (["--threads", str(args.threads)] if args.threads else [])
            _progress(f"{label} ...")
            run = spawn(command, args.threads, label)
            result = _side_json(run, label)
            rounds[(impl, precision)].append(result)
            peaks.measure()
            _progress(f"  {result['step_s']:.2f} s/step, {result['tokens_per_s']:.1f} tokens/s, "
                      f"{run['wall_s']:.0f} s in all; matmul peak so far "
                      + ", ".join(f"{k} {v:.0f}" for k, v in peaks.best.items()) + " GFLOP/s")
    return {v: max(results, key=lambda r: r["tokens_per_s"]) for v, results in rounds.items()}


def _with_roofline(result: dict, args, peak_gflops: float) -> dict:
    dense, attention = useful_flops(result, args.batch_size, args.seq_len)
    return dict(result, useful_gflop=(dense + attention) / 1e9, dense_gflop=dense / 1e9,
                attention_gflop=attention / 1e9, peak_gflops=peak_gflops,
                roofline=(dense + attention) / result["step_s"] / (peak_gflops * 1e9))


# --- section (c): real data ---------------------------------------------------------------------

def build_real_data(rows: int, out_dir: Path, *extra: str) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / "data" / "make_stdlib_docstrings.py"),
               "--out-dir", str(out_dir), "--max-rows", str(rows), *extra]
    spawn(command, None, "make_stdlib_docstrings.py")
    meta = json.loads((out_dir / "meta.json").read_text())
    return {"train_rows": meta["train_rows"], "eval_rows": meta["eval_rows"],
            "python": ".".join(map(str, meta["version_info"])), "answer_chars": meta["train"].get("answer_chars")}


def lorakit_config(data_dir: Path, out_dir: Path) -> dict:
    r = REAL
    return {"model": sides.MODEL, "method": "lora",
            "lora": {**sides.LORA, "target_modules": list(sides.TARGETS)},
            "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"),
                     "max_seq_len": r["max_seq_len"]},
            "train": {"epochs": 1, "batch_size": r["batch_size"], "lr": r["lr"], "scheduler": "linear",
                      "warmup_ratio": r["warmup_ratio"], "max_grad_norm": 1.0, "seed": r["seed"]},
            "output_dir": str(out_dir)}


def _lorakit_real(data_dir: Path, work: Path, threads: int | None, label: str) -> dict:
    import yaml

    out_dir = work / f"lorakit-out-{time.monotonic_ns()}"
    config_path = work / "speed_real.yaml"
    config_path.write_text(yaml.safe_dump(lorakit_config(data_dir, out_dir), sort_keys=False))
    run = spawn([sys.executable, "-m", "lorakit.cli", "train", str(config_path), "--no-progress"], threads, label)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [row for row in rows if "eval_loss" in row]
    if not evals:
        raise SideFailed(f"{label}: no eval_loss row in metrics.jsonl")
    log = run["stdout"] + run["stderr"]
    # "lorakit: precision auto -> bf16 (host: ...)", "lorakit: packing auto -> on": the first word after "->"
    chosen = {key: line.split("->", 1)[1].split()[0] for line in log.splitlines()
              for key in ("precision", "packing") if f"{key} auto ->" in line}
    return {"wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"], "heldout_loss": evals[-1]["eval_loss"],
            "initial_heldout_loss": evals[0]["eval_loss"] if evals[0].get("step") == 0 else None,
            "train_steps": max(row.get("step", 0) for row in rows),
            "train_loss": next((row["loss"] for row in reversed(rows) if "loss" in row), None),
            "train_s": next((row["elapsed_s"] for row in reversed(rows) if "elapsed_s" in row), None),
            "precision": chosen.get("precision", "?"), "packing": chosen.get("packing", "?")}


def _peer_real(data_dir: Path, threads: int | None, label: str) -> dict:
    command = [sys.executable, __file__, "--side", "trainer", "--train", str(data_dir / "train.jsonl"),
               "--eval", str(data_dir / "eval.jsonl")] + (["--threads", str(threads)] if threads else [])
    run = spawn(command, threads, label)
    return dict(_side_json(run, label), wall_s=run["wall_s"], peak_rss_mib=run["peak_rss_mib"])


def run_real(args, repeats: int, work: Path) -> dict:
    _progress(f"(c) building the data set ({args.real_rows} rows) ...")
    data = build_real_data(args.real_rows, work / "data")
    rounds = {"lorakit": [], "peer": []}
    for i in range(repeats):
        for side in ("lorakit", "peer"):
            label = f"(c) round {i + 1}/{repeats}: {side}"
            _progress(f"{label} ...")
            result = _lorakit_real(work / "data", work, args.threads, label) if side == "lorakit" \
                else _peer_real(work / "data", args.threads, label)
            rounds[side].append(result)
            _progress(f"  {result['wall_s']:.0f} s, {result['train_steps']} steps, "
                      f"held-out loss {result['heldout_loss']:.4f}")
    best = {side: min(results, key=lambda r: r["wall_s"]) for side, results in rounds.items()}
    return {"data": data, **best}


# --- the command ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="abc", help="which sections to run, e.g. a, ab, c (default abc)")
    parser.add_argument("--steps", type=int, default=8, help="fixed-shape steps per run, first 2 are warm-up")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds per side, best kept (default 2 for (a)/(b), 1 for (c))")
    parser.add_argument("--real-rows", type=int, default=600, help="rows of the real data set, train + held out")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--reprobe", action="store_true", help="measure the host again instead of the cached probe")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="fixed-shape batch (the issue's 4; smaller only for debugging)")
    parser.add_argument("--seq-len", type=int, default=256, help="fixed-shape length (the issue's 256)")
    # a child's role (set by the parent)
    parser.add_argument("--side", choices=["fixed", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["lorakit", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--eval", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if set(args.sections) - set("abc") or not args.sections:
        parser.error("--sections takes letters from 'abc', e.g. --sections ac")
    if args.steps < sides.WARMUP_STEPS + 1:
        parser.error(f"--steps must be >= {sides.WARMUP_STEPS + 1} (the first {sides.WARMUP_STEPS} are warm-up)")
    for name in ("repeats", "real_rows", "threads", "batch_size", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run_side(args) -> int:
    """Child mode: measure one side, print its JSON as the last line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side == "fixed":
        result = sides.fixed_side(args.impl, args.precision, args.steps, args.batch_size, args.seq_len, FIXED_LR,
                                  text_eval=args.eval)
    else:
        result = sides.trainer_side(args.train, args.eval, REAL["max_seq_len"], REAL["batch_size"], REAL["lr"],
                                    REAL["warmup_ratio"], REAL["seed"])
    print(json.dumps(result))
    return 0


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "") or "unknown"


def header(args):
    """(report header, host probe): host line, versions, date."""
    import datetime
    import platform

    import peft
    import torch
    import transformers

    import lorakit
    from lorakit.hardware import probe_host

    if args.threads:
        torch.set_num_threads(args.threads)  # the probe measures with this many threads
    probe = probe_host(refresh=args.reprobe)
    versions = (f"python {platform.python_version()} | torch {torch.__version__} | transformers "
                f"{transformers.__version__} | peft {peft.__version__} | lorakit {lorakit.__version__} "
                f"(commit {_commit()})")
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return {"host": probe.summary(), "versions": versions, "date": date, "bf16_native": probe.bf16_native,
            "fp32_gflops": probe.fp32_gflops, "bf16_gflops": probe.bf16_gflops, "threads": torch.get_num_threads()}


def _fixed_sections(args, head: dict, repeats: int, work: Path) -> tuple[dict, dict | None]:
    """(sections "a"/"b" as selected, the roofline peaks measured during them or None)."""
    from _speed_report import judge_a, judge_b

    variants = fixed_variants(args.sections, head["bf16_native"])
    sections = {}
    if "b" in args.sections and not head["bf16_native"]:
        sections["b"] = {"skipped": "no native bf16 on this host"}
    if not variants:
        return sections, None
    peaks = PeakMeter(sorted({precision for _, precision in variants}, key=["fp32", "bf16"].index))
    try:
        best = run_fixed(args, variants, repeats, peaks, work)
    except SideFailed as err:
        failed = {key: {"failed": str(err)} for key in "ab" if key in args.sections and key not in sections}
        return {**sections, **failed}, peaks.summary()
    best = {(impl, precision): _with_roofline(result, args, peaks.best[precision])
            for (impl, precision), result in best.items()}
    if "a" in args.sections:
        sections["a"] = judge_a(best[("lorakit", "fp32")], best[("peer", "fp32")], TARGETS)
    if ("lorakit", "bf16") in best:
        sections["b"] = judge_b(best[("lorakit", "bf16")], best[("peer", "bf16")], best[("peer", "fp32")], TARGETS)
    return sections, peaks.summary()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:
        return run_side(args)
    from _speed_report import format_report, judge_c

    # SIGTERM (e.g. timeout) unwinds like Ctrl-C: the running child is killed, temp files removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    head = header(args)
    _progress(f"host: {head['host']}")
    options = {"sections": args.sections, "steps": args.steps, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "lr": FIXED_LR, "fixed_repeats": args.repeats or 2,
               "real_repeats": args.repeats or 1, "real_rows": args.real_rows, "threads": args.threads,
               "real_batch_size": REAL["batch_size"], "real": REAL}
    with tempfile.TemporaryDirectory(prefix="lorakit-speed-") as tmp:
        sections, peaks = _fixed_sections(args, head, options["fixed_repeats"], Path(tmp))
        if "c" in args.sections:
            try:
                sections["c"] = judge_c(run_real(args, options["real_repeats"], Path(tmp)), TARGETS)
            except SideFailed as err:
                sections["c"] = {"failed": str(err)}
    report = {"header": head, "options": options, "roofline_peak": peaks, "sections": sections, "targets": TARGETS,
              "elapsed_s": time.perf_counter() - started}
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if any("failed" in section for section in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
