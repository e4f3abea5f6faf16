"""The training recipe: one readable loop on accelerate's ``Accelerator``.

    load base + tokenizer -> build datasets -> plan the batches of every step -> inject adapters
    -> AdamW + warmup schedule -> [resume] -> for each step: grad_accum micro-batches, clip,
    step, (AdaLoRA allocation), log, eval every N, checkpoint every N -> final adapter, model
    card, metrics.jsonl, loss.png

The same code runs in one process and under ``accelerate launch`` / ``torchrun`` (DDP). The
loss of a step is the mean over every labelled token of the step (all micro-batches, all
processes): each micro-batch contributes sum(token losses) / tokens-in-step, so gradient
accumulation gives the same update as one big batch.

Reproducibility: batches are a pure function of (seed, epoch) (``StepPlan``); a checkpoint
stores adapter, optimizer, scheduler and RNG states, so ``resume: true`` continues with the
same per-step losses an uninterrupted run has. Ctrl-C saves a checkpoint of the last finished
step (the RNG state captured at that step's end) and re-raises KeyboardInterrupt.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit._faults import fault_point
from lorakit.adapters import get_method
from lorakit.config import TrainingConfig, config_to_yaml
from lorakit.errors import LorakitError
from lorakit.hardware import probe_host, resolve_precision
from lorakit.training import checkpoint as ckpt
from lorakit.training.compile import compile_blocks
from lorakit.training.distributed import (average_replicated_gradients, check_fsdp_method, refuse_accelerate_fsdp,
                                          shard_frozen_base)
from lorakit.training.evaluate import count_tokens
from lorakit.training.metrics import PLOT_NAME, MetricsLog, plot_losses
from lorakit.training.objectives import Objective, add_into, check_rows, evaluate_objective
from lorakit.training.optim import make_optimizer
from lorakit.training.plan import StepPlan
from lorakit.training.schedule import make_scheduler

# Config entries a resumed run must share with the checkpoint (others, e.g. max_steps, may change).
_RESUME_MUST_MATCH = ("model", "method", "lora", "data", "train.batch_size", "train.grad_accum", "train.seed",
                      "train.lr", "train.scheduler", "train.warmup_ratio", "train.weight_decay",
                      "train.loraplus_lr_ratio", "train.precision", "train.objective", "train.beta",
                      "train.label_smoothing", "train.simpo_gamma", "train.cpo_alpha", "train.desirable_weight",
                      "train.undesirable_weight")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, for the steps this call ran
    train_loss: float | None = None                         # mean of the last final_loss_window steps
    final_loss_window: int = 0
    eval_loss: float | None = None
    eval_ppl: float | None = None
    eval_metrics: dict = field(default_factory=dict)        # the final evaluation's metrics (objective's names)
    initial_eval_loss: float | None = None
    tokens_seen: int = 0
    elapsed_s: float = 0.0                                  # time spent in training steps
    tokens_per_s: float = 0.0
    interrupted: bool = False
    trainable_params: int = 0
    total_params: int = 0


# --- building blocks -------------------------------------------------------------------------

def load_base(config: TrainingConfig, device=None, precision: str | None = None, tokenizer=None):
    """(frozen base model, tokenizer); bf16 precision holds the base weights in bf16.
    ``precision`` is the resolved one (fp32 | bf16); by default train.precision resolved here.
    ``tokenizer``: one already loaded for this model (not loaded again)."""
    from lorakit.models.load import load_model

    precision = precision or resolve_precision(config.train.precision)
    quantize = config.lora if get_method(config.method).quantized_base else None  # QLoRA: streamed, quantized
    return load_model(config.model, dtype=precision, device=device or "cpu", tokenizer=tokenizer, quantize=quantize,
                      compact_memory=compact_memory(config))


def compact_memory(config: TrainingConfig) -> bool:
    """train.compact_memory resolved: auto is on for a quantized base (QLoRA), off otherwise."""
    setting = config.train.compact_memory
    return get_method(config.method).quantized_base if setting == "auto" else setting


def inject_adapters(model, config: TrainingConfig, total_steps: int):
    """Adapt ``model`` with the configured method (its parameters trainable, the rest frozen).
    A method that schedules over the run (``set_total_steps``: AdaLoRA) gets the step count."""
    from lorakit.models.inject import get_peft_model

    method = get_method(config.method)
    adapter_config = config.lora
    if not isinstance(adapter_config, method.config_class):
        raise LorakitError(f"method '{config.method}' needs a {method.config_class.__name__} in 'lora', "
                           f"got {type(adapter_config).__name__}")
    if method.set_total_steps is not None:
        method.set_total_steps(adapter_config, total_steps)
    return get_peft_model(model, adapter_config)


def _log(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        from tqdm import tqdm

        tqdm.write(f"lorakit: {message}")


@contextmanager
def _defer_sigint():
    """Hold Ctrl-C while the parameters are being updated, so a checkpoint never captures a
    half-applied optimizer step; the KeyboardInterrupt is raised right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _check_resume_config(saved: dict, current: dict, where: Path) -> None:
    from lorakit.config import TrainArgs

    for key in _RESUME_MUST_MATCH:
        before, now = _lookup(saved, key), _lookup(current, key)
        if before is None and key.startswith("train."):  # a key added since the checkpoint: its default then
            before = getattr(TrainArgs(), key.partition(".")[2], None)
        if before != now:
            raise LorakitError(f"cannot resume from {where}: '{key}' was {before!r} there and is {now!r} now; "
                               f"restore it or train into a new output_dir")


def _resume_dir(resume, output_dir: Path, accelerator) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        found = ckpt.latest_checkpoint(output_dir)
        if found is None:
            _log(accelerator, f"resume: no checkpoint in {output_dir / ckpt.CHECKPOINTS}; starting from step 0")
        return found
    path = Path(str(resume))
    if not (path / ckpt.STATE_NAME).is_file():
        raise LorakitError(f"train.resume: '{resume}' is not a checkpoint directory (no {ckpt.STATE_NAME})")
    return path


# --- one optimizer step ----------------------------------------------------------------------

@dataclass
class _Run:
    """What one training run holds between its stages: built by ``_setup``, advanced by
    ``_optimizer_step``, logged / evaluated / saved by ``_after_step``, closed by ``_finish``."""

    config: TrainingConfig
    accelerator: Any
    model: Any                  # the adapter model (unwrapped): saving, evaluation, parameters
    ddp_model: Any              # what forward / backward run through (DDP-wrapped with several processes)
    optimizer: Any
    scheduler: Any
    plan: StepPlan
    eval_batches: list[dict]
    stats: Any
    metrics: MetricsLog
    result: TrainResult
    config_dict: dict           # recorded in checkpoints, compared on resume
    objective: Objective = None  # what the loop minimises (training.objectives)
    tokenizer: Any = None       # saved with the output when the method publishes a whole model
    rng_after_step: dict | None = None
    window_sums: dict = field(default_factory=dict)    # the objective's figures and totals since the last
    window_totals: dict = field(default_factory=dict)  # metrics row
    run_tokens: int = 0         # tokens trained on by this call (not by the run being resumed)
    fsdp: bool = False          # frozen base sharded (training.distributed); adapters replicated

    @property
    def total(self) -> int:
        return self.plan.total_steps

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _forward_backward(model, micro_batches: list[dict], totals: dict, accelerator,
                      objective: Objective) -> tuple[dict, int]:
    """Forward/backward over this process's micro-batches, each contributing its share of the
    step loss (``objective.loss``). Returns (this process's summed figures, tokens)."""
    sums, tokens = {}, 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):  # all-reduce once per step
            share, figures = objective.loss(model, batch, totals, accelerator.device)
            # DDP averages gradients over processes, hence × num_processes.
            accelerator.backward(share * accelerator.num_processes)
        fault_point("step")
        add_into(sums, figures)
        tokens += count_tokens(batch)
    return sums, tokens


def _reduce_sum(accelerator, *values: float) -> list[float]:
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def _reduce_dict(accelerator, values: dict) -> dict:
    keys = sorted(values)
    return dict(zip(keys, _reduce_sum(accelerator, *(values[k] for k in keys))))


def _evaluate(run: "_Run") -> dict:
    """The objective's metrics on the eval batches: each process's share summed over processes,
    or, under FSDP (every process must run the same forwards), all batches on every process and
    nothing to sum."""
    if run.fsdp:
        def reduce(values):
            return values
    else:
        def reduce(values):
            return _reduce_dict(run.accelerator, values)
    return evaluate_objective(run.objective, run.model, run.eval_batches, run.accelerator.device, reduce)


def _eval_row(step: int, figures: dict) -> dict:
    return {"step": step, **{f"eval_{key}": value for key, value in figures.items()}}


def _describe(figures: dict) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in figures.items() if value is not None)


def _start_or_resume(run: _Run) -> int:
    """Restore the checkpoint ``train.resume`` names (returns its step), or start a fresh log
    with an evaluation of the untrained adapter (= the base model) and return 0."""
    config, accelerator, out = run.config, run.accelerator, Path(run.config.output_dir)
    if run.main and ckpt.remove_partial_writes(out):
        _log(accelerator, f"removed half-written files of an interrupted run in {out}")
    resume_from = _resume_dir(config.train.resume, out, accelerator)
    if resume_from is not None and not get_method(config.method).resumable:
        # AdaLoRA's allocator state (importance averages, masks) is not in checkpoints yet
        raise LorakitError(f"train.resume is not supported for method '{config.method}' yet (its rank "
                           f"allocator state is not checkpointed); start the run again without resume")
    if resume_from is not None:
        state = ckpt.read_state(resume_from)
        _check_resume_config(state["config"], run.config_dict, resume_from)
        ckpt.load_checkpoint(resume_from, run.model, run.optimizer, run.scheduler, accelerator.process_index, state)
        run.result.tokens_seen, run.result.initial_eval_loss = state["tokens_seen"], state.get("initial_eval_loss")
        if state.get("total_steps") != run.total:
            _log(accelerator, f"resume: the run now has {run.total} steps (was {state.get('total_steps')}); "
                              f"the lr schedule is stretched accordingly")
        if run.main:
            run.metrics.truncate_after(state["global_step"])
        _log(accelerator, f"resumed from {resume_from} at step {state['global_step']}")
        return state["global_step"]
    if ckpt.latest_checkpoint(out) is not None:
        _log(accelerator, f"note: {out / ckpt.CHECKPOINTS} holds checkpoints of an earlier run; this run starts "
                          f"from step 0 (set train.resume=true to continue instead)")
    if run.main:
        run.metrics.path.unlink(missing_ok=True)
    if run.eval_batches:
        first = _evaluate(run)
        run.result.initial_eval_loss = first["loss"]
        if run.main:
            run.metrics.append(_eval_row(0, first))
        _log(accelerator, f"eval before training: {_describe(first)}")
    return 0


# --- setting up a run ----------------------------------------------------------------------

def enable_grad_checkpointing(model) -> None:
    """Gradient checkpointing (non-reentrant) on every decoder layer of ``model`` (an AdaptedModel)."""
    lm = model.model  # recent transformers rename gradient_checkpointing_enable
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check_fits(config: TrainingConfig, train_samples: list[dict], accelerator) -> None:
    """Refuse, before any weight loads, a run that ``lorakit estimate`` predicts cannot fit in
    this host's memory (one line with what to change); ``train.skip_estimate`` skips the check."""
    from lorakit.estimate import estimate, verdict

    if config.train.skip_estimate:
        return
    if accelerator.device.type != "cpu":  # the estimate sizes host memory (RSS), not an accelerator's
        _log(accelerator, f"estimate: sizes CPU runs only; not checked on {accelerator.device.type}")
        return
    try:
        predicted = estimate(config, samples=train_samples, timing=False)
    except LorakitError:
        raise
    except Exception as err:  # noqa: BLE001 - an architecture the sizing cannot trace must not stop training
        _log(accelerator, f"estimate: could not size this run ({type(err).__name__}: {str(err).splitlines()[0]}); "
                          f"training without the memory check (train.skip_estimate: true skips it)")
        return
    if not predicted.fits:
        raise LorakitError(f"this run will not fit in memory: {verdict(predicted)} (lorakit estimate shows the "
                           f"parts; train.skip_estimate=true runs it anyway)")
    _log(accelerator, f"estimate: {verdict(predicted)}")


def _model_and_data(config: TrainingConfig, accelerator):
    """(adapter model, step plan, eval batches, data stats): base loaded in the resolved
    precision, data built, packing decided on the base, adapters injected."""
    from accelerate.utils import set_seed

    from lorakit.data import build_datasets, make_batches
    from lorakit.data.batching import resolve_packing
    from lorakit.data.preference import make_preference_batches
    from lorakit.training.preference import frozen_reference_copy, prepare_objective

    from lorakit.models.load import load_tokenizer

    args, data, world = config.train, config.data, accelerator.num_processes
    set_seed(args.seed)
    # the data first, with the tokenizer alone: a bad row is reported before minutes of loading
    tokenizer = load_tokenizer(config.model)
    method = get_method(config.method)
    context = method.context_for(config.lora, data)
    train_samples, eval_samples, stats = build_datasets(data, tokenizer, eval_context=context)
    _log(accelerator, str(stats))
    preference = args.objective != "sft"
    check_rows(args.objective, stats.format, data.train)
    if preference:  # the estimate traces SFT batches; preference rows are not sized yet
        _log(accelerator, "estimate: sizes SFT runs; not checked for train.objective " + args.objective)
    else:
        _check_fits(config, train_samples, accelerator)
    precision = resolve_precision(args.precision)
    if args.precision == "auto":
        _log(accelerator, f"precision auto -> {precision} (host: {probe_host().summary()})")
    base, _ = load_base(config, precision=precision, tokenizer=tokenizer)
    # packing is exact or not by architecture (adapters act per token), so the base decides it;
    # an explicit true that is not exact fails in resolve_packing with the reason
    if preference and data.packing is True:
        raise LorakitError(f"data.packing is not supported with train.objective {args.objective} yet "
                           f"(each answer is scored on its own row); set data.packing: false or auto")
    packing = False if preference else resolve_packing(data.packing, base)
    if data.packing == "auto" and not preference:
        _log(accelerator, f"packing auto -> {'on' if packing else 'off (not exact for this architecture)'}")
    batcher = make_preference_batches if preference else make_batches
    plan = StepPlan(train_samples, args.batch_size, args.grad_accum, tokenizer.pad_token_id, packing,
                    data.max_seq_len, args.seed, args.epochs, args.max_steps, world,
                    group_by_length=data.group_by_length, batcher=batcher)
    set_seed(args.seed)  # adapter init does not depend on how much RNG data loading used
    frozen = frozen_reference_copy(base, args.objective, method.reference)  # before the base trains
    model = inject_adapters(base, config, plan.total_steps).to(accelerator.device)
    if world > 1:
        # each rank its own dropout stream (seed + rank): one seed everywhere would give the ranks
        # correlated masks; checkpoints keep every rank's RNG state (rng_state.pt, one per rank)
        set_seed(args.seed, device_specific=True)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)
    message = compile_blocks(model.model, args.compile, accelerator.device.type)
    if args.compile is not False:
        _log(accelerator, message)
    objective = prepare_objective(args, model, frozen, train_samples + (eval_samples or []), tokenizer.pad_token_id,
                                  accelerator.device, lambda message: _log(accelerator, message))
    eval_batches = [] if not eval_samples else batcher(
        eval_samples, args.batch_size, tokenizer.pad_token_id, packing, data.max_seq_len, shuffle=False, seed=0)
    if not _fsdp(config, world):  # each process its share (FSDP: every process runs every forward)
        eval_batches = eval_batches[accelerator.process_index::world]
    return model, plan, eval_batches, stats, tokenizer, objective


def _setup(config: TrainingConfig) -> _Run:
    from accelerate import Accelerator

    from lorakit._io import check_directory_path

    check_directory_path(config.output_dir, "output_dir")  # before minutes of loading
    args, out = config.train, Path(config.output_dir)
    # Several CPU processes (torchrun / accelerate launch without GPUs) need cpu=True for gloo DDP.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    refuse_accelerate_fsdp()
    if args.fsdp:
        check_fsdp_method(config)  # before minutes of loading
    accelerator = Accelerator(cpu=multi_cpu)
    model, plan, eval_batches, stats, tokenizer, objective = _model_and_data(config, accelerator)
    method = get_method(config.method)
    if method.report is not None:  # QLoRA: what the quantized base holds
        _log(accelerator, method.report(model))
    trainable, all_params = model.get_nb_trainable_parameters()
    _log(accelerator, f"{config.method} on {config.model}: {trainable:,} trainable of {all_params:,} parameters; "
                      f"{plan.total_steps} steps of {args.batch_size} x {args.grad_accum} x "
                      f"{accelerator.num_processes} samples")
    fsdp = _fsdp(config, accelerator.num_processes)
    if fsdp:
        held, whole = shard_frozen_base(model)
        _log(accelerator, f"fsdp: frozen base sharded over {accelerator.num_processes} processes, "
                          f"{held / 2**20:.1f} MiB of {whole / 2**20:.1f} MiB on each; adapters replicated")
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.loraplus_lr_ratio)
    scheduler = make_scheduler(optimizer, plan.total_steps, args.warmup_ratio, args.scheduler)
    if fsdp:  # sharded already: accelerate would wrap it in DDP
        ddp_model, optimizer = model, accelerator.prepare(optimizer)
    else:
        ddp_model, optimizer = accelerator.prepare(model, optimizer)
    return _Run(config=config, accelerator=accelerator, model=model, ddp_model=ddp_model, optimizer=optimizer,
                scheduler=scheduler, plan=plan, eval_batches=eval_batches, stats=stats, metrics=MetricsLog(out),
                result=TrainResult(output_dir=out, global_step=0, trainable_params=trainable, total_params=all_params),
                config_dict=config.to_dict(), tokenizer=tokenizer, objective=objective, fsdp=fsdp)


def _fsdp(config: TrainingConfig, world: int) -> bool:
    """train.fsdp with more than one process (one process has nothing to shard)."""
    return bool(config.train.fsdp) and world > 1


# --- one optimizer step, and what follows it -------------------------------------------------

def _optimizer_step(run: _Run, step: int) -> dict:
    """Run global step ``step`` (0-based): this process's micro-batches forward/backward, clip,
    AdamW, schedule, AdaLoRA's allocation. Returns the step's figures summed over processes."""
    args, accelerator, objective = run.config.train, run.accelerator, run.objective
    step_batches = run.plan.step_batches(step)
    micro_batches = step_batches[accelerator.process_index::accelerator.num_processes]
    totals = objective.totals(step_batches)  # every process's batches: the normalisers of the whole step
    totals = objective.prepare_step(run.model, micro_batches, totals, accelerator.device,
                                    lambda values: _reduce_dict(accelerator, values))
    sums, tokens = _forward_backward(run.ddp_model, micro_batches, totals, accelerator, objective)
    if run.fsdp:
        average_replicated_gradients(run.model, accelerator.num_processes)
    grad_norm = None
    if args.max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm))
    lr = run.scheduler.get_last_lr()[0]
    with _defer_sigint():
        run.optimizer.step()
        fault_point("optimizer")
        run.scheduler.step()
        run.model.after_optimizer_step(step + 1)  # the method's hook (AdaLoRA reallocates rank)
        run.optimizer.zero_grad(set_to_none=True)
        run.rng_after_step = ckpt.capture_rng()
    sums = _reduce_dict(accelerator, dict(sums, tokens=float(tokens)))
    tokens = sums.pop("tokens")
    return {"sums": sums, "totals": totals, "tokens": int(tokens), "grad_norm": grad_norm, "lr": lr}


def _record_step(run: _Run, step: int, figures: dict, seconds: float, bar) -> None:
    """Account the finished step ``step`` (1-based) and write a metrics row every logging_steps."""
    result, args = run.result, run.config.train
    result.elapsed_s += seconds
    result.tokens_seen += figures["tokens"]
    summary = run.objective.summarize(figures["sums"], figures["totals"])
    result.losses[step] = summary["loss"]
    add_into(run.window_sums, figures["sums"])
    add_into(run.window_totals, figures["totals"])
    run.run_tokens += figures["tokens"]
    tokens_per_s = run.run_tokens / max(result.elapsed_s, 1e-9)
    shown = {key.rpartition("/")[2]: f"{summary[key]:.3f}" for key in run.objective.bar_keys
             if summary.get(key) is not None}
    bar.set_postfix(loss=f"{result.losses[step]:.4f}", **shown, lr=f"{figures['lr']:.2e}",
                    tok_s=f"{tokens_per_s:.0f}", refresh=False)
    bar.update(1)
    if run.main and (step % args.logging_steps == 0 or step == run.total):
        window = run.objective.summarize(run.window_sums, run.window_totals)
        run.metrics.append({"step": step, "epoch": round(step / run.plan.steps_per_epoch, 4),
                            **window, "lr": figures["lr"],
                            "grad_norm": figures["grad_norm"], "tokens": result.tokens_seen,
                            "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(result.elapsed_s, 3)})
        run.window_sums, run.window_totals = {}, {}


def _save(run: _Run, at_step: int, gather: bool = True) -> None:
    """Checkpoint of step ``at_step`` with every process's RNG state (``gather`` False after
    Ctrl-C, when the other processes may not reach a collective)."""
    from accelerate.utils import gather_object

    world, rng_state = run.accelerator.num_processes, run.rng_after_step
    states = gather_object([rng_state]) if (gather and world > 1) else [rng_state] * world
    if run.main:
        epoch, start = run.plan.position(at_step) if at_step < run.total else (None, None)
        ckpt.save_checkpoint(ckpt.checkpoint_dir(run.result.output_dir, at_step), run.model, run.optimizer,
                             run.scheduler, states, {
                                 "global_step": at_step, "epoch": epoch,
                                 "step_in_epoch": None if start is None else at_step - start,
                                 "total_steps": run.total, "tokens_seen": run.result.tokens_seen,
                                 "initial_eval_loss": run.result.initial_eval_loss, "config": run.config_dict})
    if gather:
        run.accelerator.wait_for_everyone()


def _after_step(run: _Run, step: int) -> None:
    """The schedule after step ``step`` (1-based): evaluate every eval_every, save every save_every."""
    args = run.config.train
    if run.eval_batches and args.eval_every and step % args.eval_every == 0 and step < run.total:
        row = _evaluate(run)
        if run.main:
            run.metrics.append(_eval_row(step, row))
        _log(run.accelerator, f"step {step}: eval {_describe(row)}")
    if args.save_every and step % args.save_every == 0:
        _save(run, step)


# --- the loop ------------------------------------------------------------------------------

def train(config: TrainingConfig, progress: bool = True) -> TrainResult:
    """Train adapters as ``config`` says; write the final adapter, model card, metrics.jsonl
    and loss.png into ``config.output_dir``; return the run's figures."""
    from tqdm import tqdm

    if not get_method(config.method).trains:  # the prompt baseline: evaluated, nothing to train
        from lorakit.training.untrained import evaluate_untrained

        return evaluate_untrained(config)
    run = _setup(config)
    step = _start_or_resume(run)
    run.model.train()
    bar = tqdm(total=run.total, initial=step, disable=not (progress and run.main), unit="step", dynamic_ncols=True)
    run.rng_after_step = ckpt.capture_rng()
    try:
        while step < run.total:
            started = time.perf_counter()
            figures = _optimizer_step(run, step)
            step += 1
            _record_step(run, step, figures, time.perf_counter() - started, bar)
            _after_step(run, step)
    except KeyboardInterrupt:
        bar.close()
        run.optimizer.zero_grad(set_to_none=True)
        _save(run, step, gather=False)
        _log(run.accelerator, f"interrupted: checkpoint of step {step} saved in "
                              f"{ckpt.checkpoint_dir(run.result.output_dir, step)}; continue with train.resume=true")
        raise
    bar.close()
    run.result.tokens_per_s = run.run_tokens / max(run.result.elapsed_s, 1e-9)
    return _finish(run, step)


def _finish(run: _Run, step: int) -> TrainResult:
    """Final eval, adapter files, model card, training config, loss plot."""
    from lorakit._io import write_text_atomic
    from lorakit.training.model_card import write_model_card

    config, model, eval_batches, accelerator = run.config, run.model, run.eval_batches, run.accelerator
    metrics, result, stats = run.metrics, run.result, run.stats
    out = Path(config.output_dir)
    result.global_step = step
    if eval_batches:
        final = _evaluate(run)
        result.eval_loss, result.eval_ppl, result.eval_metrics = final["loss"], final.get("ppl"), final
        if accelerator.is_main_process:
            metrics.append(_eval_row(step, final))
        _log(accelerator, f"eval after training: {_describe(final)}")
    rows = metrics.rows() if accelerator.is_main_process else []
    step_losses = [r["loss"] for r in rows if "loss" in r]
    if step_losses:
        result.final_loss_window = min(10, len(step_losses))
        result.train_loss = sum(step_losses[-result.final_loss_window:]) / result.final_loss_window
    if accelerator.is_main_process:
        model.save_pretrained(out)
        fault_point("final")
        if get_method(config.method).output == "model":  # a complete transformers directory
            run.tokenizer.save_pretrained(out)
        write_text_atomic(out / "training_config.yaml", config_to_yaml(config))
        trainable, total = model.get_nb_trainable_parameters()
        write_model_card(out, config, result, stats, trainable, total)
        plot_losses(rows, out / PLOT_NAME)
        _log(accelerator, f"adapter saved in {out} (README.md, metrics.jsonl, {PLOT_NAME})")
    accelerator.wait_for_everyone()
    return result
