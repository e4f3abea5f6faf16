"""A run of a method with nothing to train (``AdapterMethod.trains`` False: the prompt baseline).

Same inputs and outputs as a training run, so ``lorakit compare`` treats it like the others: the
data is built (with the method's ``eval_context`` before each evaluated conversation), the base is
loaded in the resolved precision, the held-out loss measured once, and output_dir gets the
method's file, training_config.yaml, metrics.jsonl (one eval row at step 0) and a model card.
"""

from __future__ import annotations

import time

from lorakit._io import check_directory_path, write_text_atomic
from lorakit.adapters import get_method
from lorakit.config import TrainingConfig, config_to_yaml
from lorakit.errors import LorakitError
from lorakit.hardware import resolve_precision
from lorakit.training.evaluate import evaluate_loss
from lorakit.training.metrics import MetricsLog


def evaluate_untrained(config: TrainingConfig):
    """Evaluate ``config.method`` (which trains nothing) and write its output; a TrainResult
    with global_step 0 and the same loss before and after."""
    from lorakit.data import build_datasets, make_batches
    from lorakit.models.inject import get_peft_model
    from lorakit.models.load import load_model, load_tokenizer
    from lorakit.training.loop import TrainResult
    from lorakit.training.model_card import write_model_card

    out = check_directory_path(config.output_dir, "output_dir")
    method, data, args = get_method(config.method), config.data, config.train
    tokenizer = load_tokenizer(config.model)
    context = method.context_for(config.lora, data)
    _, eval_samples, stats = build_datasets(data, tokenizer, eval_context=context)
    if not eval_samples:
        raise LorakitError(f"method '{config.method}' trains nothing, so it needs held-out data to be measured: "
                           f"set data.eval")
    base, _ = load_model(config.model, dtype=resolve_precision(args.precision), device="cpu", tokenizer=tokenizer)
    model = get_peft_model(base, config.lora)
    model.context = context
    batches = make_batches(eval_samples, args.batch_size, tokenizer.pad_token_id, False, data.max_seq_len,
                           shuffle=False, seed=0)
    started = time.perf_counter()
    figures = evaluate_loss(model, batches)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out)
    metrics.path.unlink(missing_ok=True)
    metrics.append({"step": 0, "eval_loss": figures["loss"], "eval_ppl": figures["ppl"]})
    result = TrainResult(output_dir=out, global_step=0, eval_loss=figures["loss"], eval_ppl=figures["ppl"],
                         initial_eval_loss=figures["loss"], elapsed_s=time.perf_counter() - started)
    model.save_pretrained(out)
    write_text_atomic(out / "training_config.yaml", config_to_yaml(config))
    trainable, total = model.get_nb_trainable_parameters()
    result.trainable_params, result.total_params = trainable, total
    write_model_card(out, config, result, stats, trainable, total)
    print(f"lorakit: {config.method}: eval loss {figures['loss']:.4f} (ppl {figures['ppl']:.2f}) with "
          f"{len(context)} context turns; nothing trained; output in {out}", flush=True)
    return result
