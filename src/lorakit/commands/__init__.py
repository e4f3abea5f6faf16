"""``lorakit`` subcommands, one module each with ``register(subparsers)`` (see lorakit/cli.py)."""
