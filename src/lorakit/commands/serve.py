"""``lorakit serve``: an OpenAI-compatible server for one base model and many LoRA adapters."""

from __future__ import annotations

HELP = "serve a base model and LoRA adapters over an OpenAI-compatible HTTP API"


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help=HELP, description=HELP)
    parser.add_argument("--model", required=True, help="base model: directory, hub id, .gguf file or built-in alias")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter to serve as model NAME (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY, else no auth)")
    parser.add_argument("--adapter-root", default=None, metavar="DIR",
                        help="allow POST /v1/load_lora_adapter for directories under DIR")
    parser.add_argument("--served-model-name", default=None, help="name of the base model in the API (default: --model)")
    parser.add_argument("--dtype", default="auto",
                        help="base model dtype: auto (bfloat16 where this CPU's bf16 matmul is native and faster, "
                             "as measured by 'lorakit env'; else float32), float32, bfloat16, float16")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="most requests decoded together; a request joins the running batch at its next "
                             "step, more wait in arrival order (default: 32)")
    parser.add_argument("--max-kv-mb", type=float, default=1024,
                        help="cap on the KV cache of the running batch, in MiB (default: 1024)")
    parser.add_argument("--prefill-tokens", type=int, default=2048,
                        help="prompt tokens prefilled per step while other requests decode: lower it to shorten "
                             "the gaps in running streams when many requests arrive at once, at the cost of their "
                             "time to first token (the first waiting request always joins; default: 2048)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="when idle, how long to wait for requests arriving together before the first "
                             "step (default: 10)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt accepted, in tokens")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body accepted")
    parser.add_argument("--force", action="store_true",
                        help="load adapters whose recorded base model (fingerprint or name) is not --model")
    parser.add_argument("--max-waiting", type=int, default=1024,
                        help="requests queued for generation before new ones get 503 (default: 1024)")
    parser.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="time a client has to send a request's headers (default: 10)")
    parser.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="time a client has to send a request's body after its headers (default: 30)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorakit.server.protocol import Limits
    from lorakit.server.run import parse_adapter_specs, serve

    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, default_max_tokens=min(256, args.max_tokens),
                    max_waiting=args.max_waiting, header_timeout_s=args.header_timeout,
                    body_timeout_s=args.body_timeout)
    serve(args.model, parse_adapter_specs(args.adapter), host=args.host, port=args.port, api_key=args.api_key,
          adapter_root=args.adapter_root, limits=limits, dtype=args.dtype, device=args.device,
          max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, served_model_name=args.served_model_name,
          force=args.force, max_kv_mb=args.max_kv_mb, prefill_tokens=args.prefill_tokens)
    return 0
