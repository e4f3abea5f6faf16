"""The reference model of preference objectives, and reference log-probs computed ahead.

DPO, IPO and KTO compare the trained policy π_θ with a fixed reference π_ref. With adapters the
reference costs no memory: it is the same model with its adapters switched off
(``AdaptedModel.disable_adapter``), run without gradients, so log π_ref(y|x) is the base model's
own. Full fine-tuning changes the base weights themselves, so its reference is a frozen copy of
the base taken before training (the method's registry entry declares which: ``reference``).

The reference runs in eval mode (no dropout): its log-probs are a function of the batch alone,
so computing them once before training (``precompute_ref_log_probs``: one pass over the data
instead of one reference forward per step) gives the same values as every step.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch

from lorakit.data import batch_to_device
from lorakit.data.preference import collate_for
from lorakit.training.logprobs import sequence_logps


def disable_dropout(model) -> int:
    """Set every dropout of ``model`` to p = 0 (as TRL's trainers do by default, disable_dropout):
    the policy's log-probs must be comparable with the reference's, which run without dropout.
    Returns how many dropout modules were switched off."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            count += 1
    return count


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Reference:
    """log π_ref of rows. ``model``: the adapted model (adapters disabled for the reference), or
    ``frozen``: a separate frozen model that is the reference (full fine-tuning; or a bare base
    model, which is its own reference)."""

    def __init__(self, model=None, frozen=None):
        if (model is None) == (frozen is None):
            raise ValueError("give the adapted model or a frozen reference model, not both")
        self.model, self.frozen = model, frozen
        if frozen is not None:
            frozen.requires_grad_(False)

    @torch.no_grad()
    def logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 Σ log π_ref over each row's labelled tokens."""
        model = self.frozen if self.frozen is not None else self.model
        switch_off = self.model.disable_adapter() if self.frozen is None else nullcontext()
        with _eval_mode(model), switch_off:
            return sequence_logps(model, input_ids, attention_mask, labels)[0]


def precompute_reference(reference: Reference, samples: list[dict], batch_size: int, pad_token_id: int,
                         device) -> None:
    """Store each sample's reference log-probs in it (pairs: ``ref_logps`` = (chosen, rejected);
    KTO rows: ``ref_logps`` and ``ref_kl_logps``), batch_size samples per forward."""
    collate_fn = collate_for(samples)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start: start + batch_size]
        batch = batch_to_device(collate_fn(chunk, pad_token_id), device)
        logps = reference.logps(batch["input_ids"], batch["attention_mask"], batch["labels"]).tolist()
        if "chosen_ids" in chunk[0]:
            n = len(chunk)
            for i, sample in enumerate(chunk):
                sample["ref_logps"] = (logps[i], logps[n + i])
            continue
        kl = reference.logps(batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]).tolist()
        for sample, own, mismatched in zip(chunk, logps, kl):
            sample["ref_logps"], sample["ref_kl_logps"] = own, mismatched


def frozen_reference_copy(base, objective: str, reference_kind: str):
    """A frozen copy of ``base`` taken before training, when the objective needs a reference and
    the method's registry entry says its adapters cannot be switched off (full fine-tuning); else None."""
    if objective in ("sft", "simpo", "orpo") or reference_kind != "frozen_copy":
        return None
    return copy.deepcopy(base).eval()


def prepare_objective(args, model, frozen, samples: list[dict], pad_token_id: int, device,
                      log: Callable[[str], None]):
    """The objective ``args.objective`` for ``model``: dropout off (preference objectives), its
    reference (``frozen`` or the adapters switched off), and the reference log-probs of
    ``samples`` computed ahead when ``args.precompute_ref_log_probs``."""
    from lorakit.training.objectives import make_objective

    if args.objective == "sft":
        return make_objective(args)
    if disable_dropout(model):
        log(f"dropout off for train.objective {args.objective} (policy and reference log-probs must be "
            f"comparable; TRL's disable_dropout)")
    reference = Reference(frozen=frozen.to(device)) if frozen is not None else Reference(model=model)
    objective = make_objective(args, reference)
    if objective.uses_reference and args.precompute_ref_log_probs:
        started = time.perf_counter()
        precompute_reference(reference, samples, args.batch_size, pad_token_id, device)
        log(f"reference log-probs of {len(samples)} rows computed once in {time.perf_counter() - started:.1f}s "
            f"(precompute_ref_log_probs)")
    return objective
