"""One ``lorakit compare`` row, in its own process: train the entry's config, then measure.

    python -m lorakit.compare.worker SPEC.json      # writes SPEC's "result" path (JSON)

A fresh process per method keeps peak memory (ru_maxrss: load + train) and timings of one method
from leaking into the next. Measured: trainable parameters, peak RSS, seconds per step, tokens/s,
bytes on disk of what the method publishes, held-out loss before and after, the loss curve,
and, when held-out questions are given, exact-match answers and generation tokens/s.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from lorakit.errors import LorakitError


def published_bytes(method, output_dir: Path) -> int:
    """Bytes of what the method publishes: the adapter files, the model directory's weights and
    config, or the prompt baseline's file (not the model card, metrics or tokenizer)."""
    names = {"adapter": ("adapter_model.safetensors", "adapter_config.json"),
             "model": ("model.safetensors", "config.json", "generation_config.json"),
             "prompt": ("prompt_baseline.json",)}[method.output]
    files = [output_dir / n for n in names] + sorted(output_dir.glob("model-*.safetensors"))
    return sum(p.stat().st_size for p in files if p.is_file())


def loss_curve(output_dir: Path) -> list[list[float]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [[row["step"], row["loss"]] for row in rows if "loss" in row]


def _system_message(config) -> str | None:
    """The first training conversation's system message (the quickstart's questions need it)."""
    from lorakit.data.readers import read_rows

    for _, row in read_rows(config.data.train):
        messages = row.get("messages") if isinstance(row, dict) else None
        if messages and messages[0].get("role") == "system":
            return messages[0].get("content")
        return None
    return None


def answer_questions(config, method, questions: list[dict], max_new_tokens: int = 40) -> dict:
    """Greedy answers to held-out questions with the trained result; exact match = the expected
    answer (without a final period) appears in the reply, as the quickstart counts it."""
    from lorakit.data.build import with_context
    from lorakit.inference.generate import GenerationSettings, generate
    from lorakit.models.inject import load_adapter
    from lorakit.models.load import load_model

    base, tokenizer = load_model(config.model, dtype="float32")
    model = load_adapter(base, config.output_dir).eval()
    context = method.context_for(config.lora, config.data)
    system = _system_message(config)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    correct, new_tokens, seconds, answers = 0, 0, 0.0, []
    for item in questions:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": item["question"]}]
        messages, _ = with_context(messages, context)
        started = time.perf_counter()
        reply = generate(model, tokenizer, messages, settings)
        seconds += time.perf_counter() - started
        new_tokens += len(tokenizer(reply, add_special_tokens=False)["input_ids"])
        correct += item["answer"].rstrip(".") in reply
        answers.append(reply)
    return {"exact_match": correct, "questions": len(questions), "gen_tokens_per_s": new_tokens / max(seconds, 1e-9),
            "answers": answers}


def run(spec: dict) -> dict:
    from lorakit.adapters import get_method
    from lorakit.config import TrainingConfig
    from lorakit.training import train

    config = TrainingConfig.from_dict(spec["config"], where=f"compare entry '{spec['name']}'")
    method = get_method(config.method)
    started = time.perf_counter()
    result = train(config, progress=False)
    row = {
        "name": spec["name"], "method": config.method, "status": "ok", "lr": config.train.lr,
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "steps": result.global_step, "seconds_per_step": result.elapsed_s / max(result.global_step, 1),
        "tokens_per_s": result.tokens_per_s, "train_wall_s": time.perf_counter() - started,
        "eval_loss_before": result.initial_eval_loss, "eval_loss_after": result.eval_loss,
        "disk_bytes": published_bytes(method, Path(result.output_dir)),
        "loss_curve": loss_curve(Path(result.output_dir)),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # load + train
    }
    if spec.get("questions"):
        row.update(answer_questions(config, method, spec["questions"]))
    return row


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    try:
        row = run(spec)
    except LorakitError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    Path(spec["result"]).write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
