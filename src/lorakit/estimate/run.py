"""``estimate(config)``: parameters, memory by part, peak RSS and seconds per step of a run,
before it loads any weight.

Memory of one training process at its peak (bytes):

    load   = runtime + file + converted + largest             (while from_pretrained runs)
    load   = runtime + quantized weights + largest in flight  (QLoRA: streamed, models.stream_load)
    train  = runtime + weights + adapter + gradients + optimizer + activations + head + backward + allocator
             - min(gradients, activations)   (backward turns activations into gradients layer by layer)

- runtime: this process now (Python, torch, transformers, tokenizer, tokenized data): measured.
- file: the checkpoint's safetensors bytes, mapped while loading (a load in the file's dtype
  keeps the mapped pages as the weights, no copy); converted: the weights again in the run's
  dtype when it differs from the file's; largest: one tensor in flight during conversion.
  A quantized base (QLoRA) streams in instead: load = runtime + 4-bit weights + the largest
  dense tensor in flight (read in the file's dtype, converted).
- weights: the frozen base as held (``sizing.count_parameters``: 4-bit layers at their
  bitsandbytes size); adapter, gradients: the trainable parameters, fp32; optimizer: AdamW's
  two fp32 moments per trainable parameter.
  With ``train.fsdp`` over N processes: 1/N of the base plus one gathered decoder layer.
- activations: what autograd keeps for backward at the largest micro-batch
  (``activations.trace_activations``; with ``grad_checkpointing`` its checkpointed size); head:
  the loss head over the batch's labelled positions (``activations.head_bytes``); backward: one
  decoder layer's gradients in flight (the largest layer's activations again).
- allocator: memory a step frees that the allocator keeps mapped (temporaries of forward and
  backward, fragmentation): ALLOCATOR_SHARE of the step's dynamic memory (activations, head,
  backward), measured with glibc malloc on the built-in model, LoRA and QLoRA at 4 x 256 tokens
  (benchmarks/estimate_accuracy.py: the measured peak RSS exceeded the sum of the other parts by
  0.32 and 0.35 of that dynamic memory). A run with train.compact_memory (auto: QLoRA) allocates
  compactly (``lorakit._memory.use_compact_allocation``: allocations of 1 MiB and more are
  mappings of their own, unmapped when freed): its share is COMPACT_ALLOCATOR_SHARE, and each
  step pays for mapping fresh pages (``estimate.timing``).

predicted peak = max(load, train); it fits when peak x processes on this host <= the memory
the host can still give plus this process's own (already counted in runtime).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit._memory import available_bytes, compact_allocation_available, rss_bytes
from lorakit.errors import LorakitError
from lorakit.estimate.activations import ActivationTrace, head_bytes, trace_activations
from lorakit.estimate.shapes import BatchShapes, batch_shapes
from lorakit.adapters.qlora.base import quantization_targets
from lorakit.adapters.qlora.streamed import CHUNK_VALUES
from lorakit.estimate.sizing import ParameterCounts, count_parameters, sizing_model
from lorakit.estimate.timing import StepWork, host_rates


ALLOCATOR_SHARE = 0.33  # see "allocator" in the module docstring
# A run with train.compact_memory (auto: QLoRA) allocates compactly (see "allocator"): little is
# kept mapped, but every large tensor is fresh memory. Measured on the built-in model, QLoRA r=16
# on all 7 linears, fp32 compute, 4 x 256 and 4 x 512 tokens: peak RSS exceeded the other parts by
# 0.13 and 0.03 of the dynamic memory; a step allocated 4.9x and 4.5x the bytes autograd keeps
# (torch profiler, profile_memory).
COMPACT_ALLOCATOR_SHARE = 0.08
COMPACT_ALLOCATED_PER_KEPT = 4.7


@dataclass
class Estimate:
    """What ``estimate`` predicts for one training process (bytes, seconds); see the module docstring."""

    params: ParameterCounts
    shapes: BatchShapes
    parts: dict[str, int]              # train-time memory by part
    activations_plain: int             # activation bytes without gradient checkpointing
    activations_checkpointed: int      # ... and with it
    load_peak: int
    train_peak: int
    seconds_per_step: float | None
    processes: int                     # training processes on this host
    available: int                     # what this host can give them (MemAvailable + this process)
    grad_checkpointing: bool
    suggestions: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.load_peak, self.train_peak)

    @property
    def fits(self) -> bool:
        return self.peak * self.processes <= self.available


@dataclass
class _Sized:
    """The parts of an estimate that do not depend on batch size or checkpointing."""

    config: object
    model_config: object
    adapted: object
    params: ParameterCounts
    trace: ActivationTrace
    shapes: BatchShapes
    fused_head: bool
    sliced_head: bool
    head_trains: bool
    head_element: int
    runtime: int
    file_bytes: int
    file_dtype_bytes: int
    base_element: int
    world: int


def _model_files(source: str) -> tuple[int, int | None]:
    """(bytes of the safetensors files of a local model directory, element size of their first
    floating tensor), or (0, None) when the source is not a local directory."""
    path = Path(source)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return 0, None
    from safetensors import safe_open

    element = None
    with safe_open(str(files[0]), framework="pt") as handle:
        for key in handle.keys():
            sliced = handle.get_slice(key)
            dtype = sliced.get_dtype()
            if dtype in ("F32", "BF16", "F16"):
                element = 4 if dtype == "F32" else 2
                break
    return sum(f.stat().st_size for f in files), element


def _base_dtype(config) -> torch.dtype:
    from lorakit.hardware import resolve_precision

    if hasattr(config.lora, "quantization"):  # the 4-bit base computes in compute_dtype
        from lorakit.adapters.qlora.base import resolve_compute_dtype

        return resolve_compute_dtype(config.lora.compute_dtype)
    return torch.bfloat16 if resolve_precision(config.train.precision) == "bf16" else torch.float32


def _packings(setting) -> list[bool]:
    # "auto" is decided on the loaded model (packing exact or not): size both, keep the larger
    return [setting] if isinstance(setting, bool) else [True, False]


def _shapes(config, samples: list[dict]) -> BatchShapes:
    data, args = config.data, config.train
    candidates = [batch_shapes(samples, args.batch_size, packing, data.max_seq_len, args.seed, data.group_by_length)
                  for packing in _packings(data.packing)]
    return max(candidates, key=lambda s: s.rows * s.width)


def _size(config, samples: list[dict], world: int) -> _Sized:
    from transformers import AutoConfig

    from lorakit.models.load import resolve_model_source
    from lorakit.training.evaluate import _plain_head_model

    source, _ = resolve_model_source(str(config.model))
    try:
        model_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise LorakitError(f"estimate: cannot read the config of model '{config.model}' "
                           f"({str(err).splitlines()[0]})") from None
    base_dtype = _base_dtype(config)
    shapes = _shapes(config, samples)
    args = config.train
    steps = args.max_steps or math.ceil(shapes.micro_batches * args.epochs / (args.grad_accum * world))
    adapted = sizing_model(model_config, config.lora, base_dtype, total_steps=max(steps, 1))  # AdaLoRA's schedule
    params = count_parameters(adapted, config.lora)
    traced = adapted
    if getattr(config.lora, "use_dora", False):
        # DoRA's combine tests its magnitudes' values (data fake tensors do not have); it keeps what
        # LoRA keeps plus (out,) vectors (adapters/dora/functional.py), so LoRA's trace stands in
        plain = dataclasses.replace(config.lora, use_dora=False)
        traced = sizing_model(model_config, plain, base_dtype, total_steps=max(steps, 1))
    trace = trace_activations(traced, shapes.rows, shapes.width)
    head = adapted.model.get_output_embeddings()
    quantized_head = hasattr(config.lora, "quantization") and id(getattr(head, "weight", None)) in \
        quantization_targets(adapted.model, config.lora)
    plain_lm = world == 1 and _plain_head_model(adapted) is not None
    fused = plain_lm and type(head) is torch.nn.Linear and not quantized_head
    # a 4-bit head the loop applies itself goes through training.quantized_head_loss
    sliced_head = plain_lm and quantized_head and config.lora.quantization in ("nf4", "fp4") \
        and getattr(model_config, "hidden_size", 1) % 64 == 0
    file_bytes, file_element = _model_files(source)
    if file_element is None:  # no local files (a hub id): the dtype the config says it was saved in
        saved = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
        file_element = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(saved).removeprefix("torch."))
    element = torch.finfo(base_dtype).bits // 8
    return _Sized(config=config, model_config=model_config, adapted=adapted, params=params, trace=trace,
                  shapes=shapes, fused_head=fused, sliced_head=sliced_head, head_trains=bool(head is not None and head.weight.requires_grad),
                  head_element=element, runtime=rss_bytes(), file_bytes=file_bytes,
                  file_dtype_bytes=file_element or element, base_element=element, world=world)


def _load_dtype_element(config) -> int:
    from lorakit.hardware import resolve_precision

    return 2 if resolve_precision(config.train.precision) == "bf16" else 4


def _memory(sized: _Sized, batch_factor: float, checkpointing: bool, params: ParameterCounts | None = None,
            compact: bool | None = None):
    """(train parts, load peak, activations plain, activations checkpointed) for ``sized`` with
    ``batch_factor`` x its batch rows, ``params`` (another method's counts) if given, ``compact``
    allocation if given (else the run's own, ``_compact_allocator``)."""
    params = params or sized.params
    trace, shapes = sized.trace, sized.shapes.scaled(batch_factor)
    plain = round(trace.total * shapes.rows / sized.trace.batch)
    checkpointed = round(trace.with_checkpointing() * shapes.rows / sized.trace.batch)
    config = sized.model_config
    # the head runs on labelled rows only where the loop applies it itself, else at every position
    labelled = shapes.labelled if _plain_lm(sized) else shapes.rows * shapes.width
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    parts = {
        "runtime": sized.runtime,
        "weights": params.frozen_bytes,
        "adapter": params.trainable_bytes,
        "gradients": params.trainable_bytes,
        "optimizer": 2 * params.trainable_bytes,
        "activations": checkpointed if checkpointing else plain,
        "head": head_bytes(labelled, config.vocab_size, hidden, sized.head_element, sized.fused_head,
                           sized.head_trains, quantized=sized.sliced_head),
        "backward": round(trace.largest_layer * shapes.rows / sized.trace.batch),
    }
    if sized.config.train.fsdp and sized.world > 1:
        # FSDP (training.distributed): 1/N of the base held, one decoder layer gathered at a time
        parts["weights"] = params.frozen_bytes // sized.world + params.frozen_bytes // max(len(trace.per_layer), 1)
    compact = _compact_allocator(sized) if compact is None else compact
    share = COMPACT_ALLOCATOR_SHARE if compact else ALLOCATOR_SHARE
    parts["allocator"] = round(share * (parts["activations"] + parts["head"] + parts["backward"]))
    load_element = _load_dtype_element(sized.config)
    largest = params.largest_frozen_bytes * load_element // max(sized.base_element, 1)
    if params.frozen_bytes < params.frozen * load_element:
        # a quantized base streams in (models.stream_load): the 4-bit weights plus the largest
        # dense tensor in flight, read in the file's dtype and converted; a 4-bit linear or table
        # arrives a chunk of rows at a time (adapters.qlora.streamed), never whole
        if getattr(sized.config.lora, "quantization", None) in ("nf4", "fp4"):
            largest = min(largest, CHUNK_VALUES * load_element)
        load = sized.runtime + params.frozen_bytes + largest * (1 + sized.file_dtype_bytes / load_element)
    else:
        # from_pretrained maps the files; a load in another dtype converts them into new tensors
        file_bytes = sized.file_bytes or params.frozen * sized.file_dtype_bytes
        converted = 0 if load_element == sized.file_dtype_bytes else params.frozen * load_element
        load = sized.runtime + file_bytes + converted + largest
    return parts, round(load), plain, checkpointed


def train_peak(parts: dict[str, int]) -> int:
    """The parts' sum, less the overlap of gradients and activations: backward frees each
    layer's activations as it writes that layer's gradients, so both are never whole at once
    (it matters for full fine-tuning, whose gradients are as large as the model)."""
    return sum(parts.values()) - min(parts["gradients"], parts["activations"])


def _plain_lm(sized: _Sized) -> bool:
    from lorakit.training.evaluate import _plain_head_model

    return sized.world == 1 and _plain_head_model(sized.adapted) is not None


def _compact_allocator(sized: _Sized) -> bool:
    """Whether the run allocates compactly (train.compact_memory; auto: a QLoRA base), which
    sets glibc's mmap threshold (a no-op elsewhere)."""
    from lorakit.training.loop import compact_memory

    return compact_memory(sized.config) and compact_allocation_available()


def _seconds(sized: _Sized, params: ParameterCounts, grad_accum: int, checkpointing: bool) -> float:
    """Predicted seconds of one optimizer step (``timing`` module docstring)."""
    config, shapes, trace = sized.model_config, sized.shapes, sized.trace
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = len(trace.per_layer)
    grad_share = trace.grad_layers / max(layers, 1)
    embed = config.vocab_size * hidden
    layer_params = max(params.frozen + params.trainable - embed * (1 if config.tie_word_embeddings else 2), 0)
    tokens, labelled = shapes.mean_tokens, shapes.mean_labelled
    if not _plain_lm(sized):
        labelled = tokens
    recompute = 1 if checkpointing else 0
    linear = 2 * tokens * layer_params * (1 + recompute * grad_share + grad_share)
    linear += 2 * tokens * min(params.trainable, layer_params)  # weight gradients of trained weights (full)
    linear += 2 * labelled * hidden * config.vocab_size * 2     # head forward + its input gradient
    rows = tokens / max(shapes.mean_width, 1)
    attention = 4 * rows * shapes.mean_width ** 2 * heads * head_dim * layers * (1 + recompute * grad_share
                                                                                 + 2 * grad_share)
    kept = trace.total * tokens / (trace.batch * trace.seq)  # bytes autograd keeps at the mean micro-batch
    memory = 3 * kept + 4 * labelled * config.vocab_size * 4
    fresh = COMPACT_ALLOCATED_PER_KEPT * kept if _compact_allocator(sized) else 0.0
    kind = next((k for k in params.frozen_by_dtype if k in ("nf4", "fp4", "int8")), "dense")
    rates = host_rates(hidden, inter, round(tokens), kind, _base_dtype(sized.config), heads,
                       round(shapes.mean_width), head_dim)
    micro = StepWork(linear, attention, memory, fresh).seconds(rates)
    optimizer = 10 * params.trainable_bytes / rates.memory_bytes_per_s
    return grad_accum * micro + optimizer


def _processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def estimate(config, samples: list[dict] | None = None, tokenizer=None, timing: bool = True,
             available: int | None = None) -> Estimate:
    """Estimate the run ``config`` describes (module docstring). ``samples``: its tokenized
    training samples when the caller has them (else the data is read and tokenized here);
    ``timing`` False skips the step-time calibration; ``available`` overrides the host's free
    memory (bytes, for tests and what-if questions)."""
    from lorakit.estimate.report import suggest

    if samples is None:
        from lorakit.data import build_datasets
        from lorakit.models.load import load_tokenizer

        tokenizer = tokenizer or load_tokenizer(config.model)
        samples, _, _ = build_datasets(config.data, tokenizer)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sized = _size(config, samples, world)
    args = config.train
    parts, load, plain, checkpointed = _memory(sized, 1.0, args.grad_checkpointing)
    seconds = _seconds(sized, sized.params, args.grad_accum, args.grad_checkpointing) if timing else None
    if available is None:
        available = available_bytes() + sized.runtime
    result = Estimate(params=sized.params, shapes=sized.shapes, parts=parts, activations_plain=plain,
                      activations_checkpointed=checkpointed, load_peak=load, train_peak=train_peak(parts),
                      seconds_per_step=seconds, processes=_processes(), available=available,
                      grad_checkpointing=args.grad_checkpointing)
    if not result.fits:
        result.suggestions = suggest(sized, result, _memory)
    return result


def qlora_counts(sized: _Sized) -> ParameterCounts | None:
    """The parameter counts of the same run with method qlora (nf4, double quantization), or
    None when the run is not plain LoRA."""
    from lorakit.adapters import LoraConfig, QLoraConfig

    if type(sized.config.lora) is not LoraConfig:
        return None
    data = {f.name: getattr(sized.config.lora, f.name) for f in dataclasses.fields(LoraConfig)}
    return count_parameters(sized.adapted, QLoraConfig(**data))


__all__ = ["Estimate", "estimate"]
