"""lorakit train CONFIG.yaml [key=value ...]"""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train adapters from a YAML config",
        description="Train adapters as CONFIG.yaml says; key=value overrides use dotted keys "
                    "(e.g. train.lr=1e-4 lora.r=8 data.max_seq_len=512 train.resume=true).")
    parser.add_argument("config", metavar="CONFIG.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    import os

    from lorakit._io import check_directory_path
    from lorakit.config import load_config
    from lorakit.training import train

    config = load_config(args.config, args.overrides)
    check_directory_path(config.output_dir, "output_dir")  # one line now, not NotADirectoryError after loading
    result = train(config, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # one summary line under torchrun / accelerate launch
        return 0
    parts = [f"trained {result.global_step} steps"]
    if result.train_loss is not None:
        parts.append(f"final train loss {result.train_loss:.4f}")
    if result.eval_loss is not None:
        before = f" (before: {result.initial_eval_loss:.4f})" if result.initial_eval_loss is not None else ""
        parts.append(f"eval loss {result.eval_loss:.4f}{before}")
    print(f"{', '.join(parts)}; adapter in {result.output_dir}")
    return 0
