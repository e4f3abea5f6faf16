"""lorakit eval [--adapter DIR] --data FILE: loss and perplexity on the response tokens; on a
preference file ({prompt, chosen, rejected} or KTO rows) the preference accuracy instead."""

from __future__ import annotations

from lorakit.commands._common import add_model_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="loss and perplexity of a base model (+ adapter) on a dataset",
                                   description="Mean loss and perplexity over the response (assistant / output) "
                                               "tokens of FILE; without --adapter for the bare base model.")
    add_model_args(parser)
    parser.add_argument("--data", required=True, metavar="FILE", help="a dataset file any lorakit format")
    parser.add_argument("--format", default="auto", help="data format (default: auto)")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="default: 1024")
    parser.add_argument("--batch-size", type=int, default=8, help="default: 8")
    parser.add_argument("--train-on-prompt", action="store_true", help="score every token, not only responses")
    parser.add_argument("--beta", type=float, default=0.1,
                        help="preference files: β of the implicit rewards β·(log π - log π_ref) (default: 0.1)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import json

    from lorakit.data import DataConfig, build_datasets, make_batches
    from lorakit.data.config import PREFERENCE_FORMATS
    from lorakit.inference.generate import load_for_inference
    from lorakit.training.evaluate import evaluate_loss

    data_config = DataConfig(train=args.data, format=args.format, max_seq_len=args.max_seq_len,
                             train_on_prompt=args.train_on_prompt)
    model, tokenizer = load_for_inference(args.adapter, args.model, args.dtype)
    samples, _, stats = build_datasets(data_config, tokenizer)
    if stats.format in PREFERENCE_FORMATS:
        from lorakit.commands.eval_preference import report_preference

        return report_preference(args, model, tokenizer, samples, stats)
    batches = make_batches(samples, args.batch_size, tokenizer.pad_token_id, packing=False,
                           max_seq_len=args.max_seq_len, shuffle=False, seed=0)
    result = evaluate_loss(model, batches)
    what = f"adapter {args.adapter}" if args.adapter else f"base model {model.name_or_path}"
    print(f"{what} on {args.data}: loss {result['loss']:.4f}, perplexity {result['ppl']:.3f} "
          f"({result['tokens']} response tokens, {stats.train_samples} samples)")
    print(json.dumps({"loss": result["loss"], "ppl": result["ppl"], "tokens": result["tokens"],
                      "samples": stats.train_samples}))
    return 0
