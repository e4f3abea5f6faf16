"""The verdict of an estimate, what to change when a run does not fit, and the printed report."""

from __future__ import annotations

from lorakit._memory import compact_allocation_available
from lorakit.estimate.run import Estimate, _compact_allocator, qlora_counts, train_peak

_MIB, _GIB = 2**20, 2**30


def _fits(peak: int, estimate: Estimate) -> bool:
    return peak * estimate.processes <= estimate.available


def suggest(sized, estimate: Estimate, memory) -> list[str]:
    """Changes that make the run fit, cheapest first (each checked with the same arithmetic):
    gradient checkpointing; compact allocation (train.compact_memory); a smaller micro-batch with
    more accumulation (same global batch); QLoRA for a LoRA run (compact unless the run sets
    compact_memory false). ``memory``: ``run._memory``."""
    args = sized.config.train
    compact = _compact_allocator(sized)
    can_compact = compact_allocation_available() and args.compact_memory is not False  # not where the user said no
    tried: list[tuple[str, float, bool, object, bool]] = []
    if not args.grad_checkpointing:
        tried.append(("train.grad_checkpointing=true", 1.0, True, None, compact))
    if not compact and can_compact:
        tried.append(("train.compact_memory=true", 1.0, args.grad_checkpointing, None, True))
    for checkpointing in sorted({args.grad_checkpointing, True}):
        size = args.batch_size // 2
        while size >= 1:
            extra = " train.grad_checkpointing=true" if checkpointing and not args.grad_checkpointing else ""
            tried.append((f"train.batch_size={size} train.grad_accum={args.grad_accum * args.batch_size // size}"
                          f"{extra}", size / args.batch_size, checkpointing, None, compact))
            size //= 2
    quantized = qlora_counts(sized)
    if quantized is not None:
        # under auto a quantized base allocates compactly
        tried.append(("method=qlora", 1.0, args.grad_checkpointing, quantized, can_compact))
        if not args.grad_checkpointing:
            tried.append(("method=qlora train.grad_checkpointing=true", 1.0, True, quantized, can_compact))
    found: list[str] = []
    for label, factor, checkpointing, params, compact_here in tried:
        parts, load, _, _ = memory(sized, factor, checkpointing, params, compact_here)
        if _fits(max(train_peak(parts), load), estimate) and not any(label.startswith(f) for f in found):
            found.append(label)
        if len(found) == 3:
            break
    return found


def verdict(estimate: Estimate) -> str:
    """"fits" or "does not fit (...), try: a, or b" as one line."""
    need = f"{estimate.peak / _GIB:.1f} GiB" + (f" x {estimate.processes} processes" if estimate.processes > 1 else "")
    if estimate.fits:
        return f"fits ({need} of {estimate.available / _GIB:.1f} GiB available)"
    line = f"does not fit ({need} predicted, {estimate.available / _GIB:.1f} GiB available)"
    if estimate.suggestions:
        return f"{line}, try: {', or '.join(estimate.suggestions)}"
    return (f"{line}; nothing lorakit can change fits: use a smaller model, fewer target modules, a shorter "
            f"data.max_seq_len, or a machine with more memory")


_NOTES = {
    "runtime": "this process now: Python, torch, tokenizer, data (measured)",
    "weights": "frozen base as held",
    "adapter": "trainable parameters, fp32",
    "gradients": "fp32, one per trainable parameter",
    "optimizer": "AdamW: two fp32 moments per trainable parameter",
    "head": "output head + loss over the labelled positions",
    "backward": "one decoder layer's gradients in flight",
    "allocator": "freed by the step but kept by the allocator (measured share)",
}


def _mib(size: float) -> str:
    return f"{size / _MIB:10.1f} MiB"


def format_report(estimate: Estimate, title: str) -> str:
    """The text ``lorakit estimate`` prints."""
    params, shapes = estimate.params, estimate.shapes
    dtypes = ", ".join(f"{name} {count:,}" for name, count in sorted(params.frozen_by_dtype.items()))
    lines = [title,
             f"largest micro-batch: {shapes.rows} x {shapes.width} tokens ({shapes.labelled} labelled); "
             f"mean {shapes.mean_tokens:.0f} tokens",
             f"parameters: trainable {params.trainable:,} (float32), frozen {params.frozen:,} ({dtypes})",
             "memory per process:"]
    for name, size in estimate.parts.items():
        note = _NOTES.get(name, "")
        if name == "activations":
            other = estimate.activations_plain if estimate.grad_checkpointing else estimate.activations_checkpointed
            note = (f"kept for backward; {'without' if estimate.grad_checkpointing else 'with'} "
                    f"grad_checkpointing: {other / _MIB:.1f} MiB")
        lines.append(f"  {name:<12}{_mib(size)}   {note}")
    lines += [f"  {'train peak':<12}{_mib(estimate.train_peak)}   the sum, less gradients overlapping activations",
              f"  {'load peak':<12}{_mib(estimate.load_peak)}   runtime + checkpoint files mapped + converted copies",
              f"predicted peak RSS: {estimate.peak / _GIB:.2f} GiB per process"]
    if estimate.seconds_per_step is not None:
        lines.append(f"predicted time: {estimate.seconds_per_step:.2f} s per optimizer step "
                     f"(rates calibrated on this host)")
    lines.append(f"verdict: {verdict(estimate)}")
    return "\n".join(lines)
