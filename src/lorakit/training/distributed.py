"""FSDP for adapter training: the frozen base sharded across processes, the adapters replicated.

With ``train.fsdp: true`` under ``torchrun`` / ``accelerate launch`` (N processes), every decoder
layer and then the whole model go through torch's FSDP2 ``fully_shard``: each process keeps 1/N
of every frozen base weight and all-gathers a layer's weights just for its forward and backward.
The trainable parameters (LoRA A/B, DoRA magnitudes, biases set trainable) are left out of the
sharding (``ignored_params``): they are a few MB, so every process holds them whole, and after
the backward pass of a step their gradients are averaged over processes here, as DDP would
(the loss is scaled for that average, see ``loop._forward_backward``). So the optimizer,
clipping, checkpoints and the final adapter files are exactly those of a one-process run, and
the main process writes them from its own tensors without a gather.

Why not accelerate's FSDP plugin: accelerate enables FSDP only on accelerator devices (its CPU
processes are always plain DDP), so the plugin cannot shard a CPU run and could not be proven
here; ``fully_shard`` is what the plugin calls for FSDP2, on every device, and this module calls
it the same way on CPUs and GPUs.

Not supported, each a one-line error: QLoRA (bitsandbytes keeps 4-bit weights in uint8 storage
with a quantization state that FSDP2's DTensor conversion does not carry) and full fine-tuning
(it trains the base itself, which this sharding holds frozen; use DDP).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lorakit.errors import LorakitError


def check_fsdp_method(config) -> None:
    """One-line errors for the methods FSDP cannot carry (module docstring)."""
    if hasattr(config.lora, "quantization"):
        raise LorakitError("train.fsdp cannot shard a QLoRA base: bitsandbytes' 4-bit weights (uint8 storage "
                           "with a quantization state) do not survive FSDP2's sharding; use method lora with "
                           "train.fsdp, or qlora without it (DDP)")
    if config.method == "full":
        raise LorakitError("train.fsdp shards the frozen base and replicates the trained parameters; method full "
                           "trains every weight, so use it without train.fsdp (DDP)")


def refuse_accelerate_fsdp() -> None:
    """accelerate's own FSDP (``distributed_type: FSDP``) would shard the adapters too, which the
    main-process save and the checkpoints do not expect: one line pointing at ``train.fsdp``."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise LorakitError("accelerate's FSDP mode (distributed_type: FSDP) is not how lorakit shards; launch with a "
                           "plain multi-process config (MULTI_GPU / MULTI_CPU) and set train.fsdp: true")


def _decoder_layers(lm: nn.Module) -> nn.ModuleList:
    count = getattr(lm.config, "num_hidden_layers", None) or getattr(lm.config, "n_layer", None)
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise LorakitError(f"train.fsdp: no list of {count} decoder layers found in {type(lm).__name__}")


def shard_frozen_base(model: nn.Module) -> tuple[int, int]:
    """FSDP2 over ``model`` (an adapted model, on its device, before the optimizer exists), in
    place: one unit per decoder layer plus the root (embedding, final norm, head); trainable
    parameters ignored (replicated). Returns (bytes of frozen weights this process now holds,
    bytes of the whole frozen base)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    trainable = {p for p in model.parameters() if p.requires_grad}
    for layer in _decoder_layers(model.model):
        fully_shard(layer, ignored_params={p for p in layer.parameters() if p in trainable})
    fully_shard(model, ignored_params=trainable)
    held = whole = 0
    for param in model.parameters():
        if not param.requires_grad:
            local = param.to_local() if isinstance(param, DTensor) else param
            held += local.numel() * local.element_size()
            whole += param.numel() * param.element_size()
    return held, whole


def average_replicated_gradients(model: nn.Module, world: int) -> None:
    """All-reduce the gradients of the replicated (trainable) parameters and divide by the
    number of processes: DDP's average, for the parameters FSDP leaves alone. One flat
    buffer, so one collective per step."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)  # sum (gloo has no average)
    flat /= world
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()
