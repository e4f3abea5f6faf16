"""``lorakit eval`` on a preference file: how often the model prefers the chosen answer.

The implicit DPO reward of an answer is r = β (log π(y|x) - log π_ref(y|x)) with the reference
the base model (the adapter switched off; for a full fine-tune, the base model it names). Printed
(TRL's names): rewards/accuracies (share of pairs with r_chosen > r_rejected), rewards/margins,
rewards/chosen, rewards/rejected, the DPO loss, and logps/accuracies (share of pairs whose chosen
answer is more likely than the rejected one under the model itself: meaningful for the bare base
model too, whose rewards are all 0). KTO rows get the KTO objective's figures.
"""

from __future__ import annotations

import json


def _reference(args, model):
    from lorakit.adapters.registry import method_for_directory
    from lorakit.inference.generate import adapter_base_model
    from lorakit.models.load import load_model
    from lorakit.training.preference import Reference

    if args.adapter is None:  # the bare base model is its own reference
        return Reference(frozen=model)
    if method_for_directory(args.adapter).reference == "frozen_copy":  # full fine-tuning: load its base
        base, _ = load_model(args.model or adapter_base_model(args.adapter), dtype=args.dtype)
        return Reference(frozen=base.eval())
    return Reference(model=model)


def report_preference(args, model, tokenizer, samples, stats) -> int:
    from lorakit.config import TrainArgs
    from lorakit.data.preference import make_preference_batches
    from lorakit.errors import LorakitError
    from lorakit.training.objectives import evaluate_objective, make_objective

    if not args.beta > 0:
        raise LorakitError(f"--beta must be > 0, got {args.beta}")
    objective = make_objective(TrainArgs(objective="kto" if stats.format == "kto" else "dpo", beta=args.beta),
                               _reference(args, model))
    batches = make_preference_batches(samples, args.batch_size, tokenizer.pad_token_id, False, args.max_seq_len,
                                      shuffle=False, seed=0)
    figures = evaluate_objective(objective, model, batches, "cpu")
    what = f"adapter {args.adapter}" if args.adapter else f"base model {model.name_or_path}"
    rows = "answers" if stats.format == "kto" else "pairs"
    accuracy = figures["rewards/accuracies"]
    line = f"{what} on {args.data}: preference accuracy {accuracy:.3f} (rewards/accuracies, {len(samples)} {rows})"
    if figures.get("logps/accuracies") is not None:
        line += f", chosen more likely in {figures['logps/accuracies']:.3f}"
    print(line + f", margin {figures['rewards/margins'] or 0.0:.4f}, loss {figures['loss']:.4f}")
    print(json.dumps({**figures, "samples": len(samples)}))
    return 0
