"""lorakit estimate CONFIG.yaml [key=value ...]"""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimate", help="predict a training run's memory and step time before loading any weight",
        description="Parameters (trainable, frozen, by dtype), memory by part, predicted peak RSS and seconds "
                    "per step of the run CONFIG.yaml describes (same overrides as lorakit train), from the "
                    "model's config and the data, and whether it fits in this host's free memory.")
    parser.add_argument("config", metavar="CONFIG.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--no-timing", action="store_true", help="skip the step-time calibration")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args) -> int:
    import dataclasses
    import json

    from lorakit.config import load_config
    from lorakit.estimate import estimate, format_report, verdict

    config = load_config(args.config, args.overrides)
    result = estimate(config, timing=not args.no_timing)
    if args.json:
        data = {"params": dataclasses.asdict(result.params), "batch": dataclasses.asdict(result.shapes),
                "memory": result.parts, "activations_plain": result.activations_plain,
                "activations_checkpointed": result.activations_checkpointed, "load_peak": result.load_peak,
                "train_peak": result.train_peak, "peak": result.peak, "available": result.available,
                "processes": result.processes, "seconds_per_step": result.seconds_per_step, "fits": result.fits,
                "suggestions": result.suggestions, "verdict": verdict(result)}
        print(json.dumps(data, indent=2))
    else:
        print(format_report(result, f"lorakit estimate: {config.method} on {config.model}"))
    return 0 if result.fits else 1
