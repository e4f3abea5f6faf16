"""lorakit env: this host as lorakit sees it (the measured probe behind precision: auto) and versions."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("env", help="show the host probe (CPU, measured matmul and memory speed) and versions",
                                   description="CPU capability, threads, measured fp32/bf16 matmul GFLOP/s and memory "
                                               "bandwidth (measured once per machine and cached), the precision "
                                               "'auto' picks here, and library versions.")
    parser.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("lorakit", "torch", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def run(args) -> int:
    import dataclasses
    import json
    import platform

    from lorakit.hardware import probe_host, resolve_precision

    probe = probe_host(refresh=args.refresh)
    info = {**dataclasses.asdict(probe), "bf16_native": probe.bf16_native,
            "precision_auto": resolve_precision("auto", probe), "python": platform.python_version(),
            "versions": _versions()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lines = [
        f"cpu:               {probe.cpu} ({probe.capability}; bf16 instructions: "
        f"{'yes' if probe.bf16_instructions else 'no'})",
        f"threads:           {probe.threads}",
        f"matmul fp32:       {probe.fp32_gflops:.1f} GFLOP/s",
        f"matmul bf16:       {probe.bf16_gflops:.1f} GFLOP/s ({'native' if probe.bf16_native else 'emulated'}, "
        f"{1 / probe.bf16_slowdown:.2f}x fp32)",
        f"memory bandwidth:  {probe.memory_gbps:.1f} GB/s (copy)",
        f"precision auto:    {info['precision_auto']}",
        f"python:            {info['python']}",
    ]
    lines += [f"{name + ':':<19}{value}" for name, value in info["versions"].items()]
    print("\n".join(lines))
    return 0
