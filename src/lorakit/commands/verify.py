"""lorakit verify --adapter DIR [--merged DIR] [--export F.gguf] [--server URL]: do all forms agree?"""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("verify", help="check that adapter, merged model, GGUF export and server agree",
                                   description="Greedy answers to the same prompts (the adapter's eval data, "
                                               "else built-in ones) through base + adapter, the merged model, "
                                               "an exported GGUF and a running server; a table of agreement; "
                                               "exit 1 when a stage disagrees beyond its quantization.")
    parser.add_argument("--adapter", required=True, metavar="DIR")
    parser.add_argument("--model", metavar="M", help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--merged", metavar="DIR", help="a merged model directory (default: merge in memory)")
    parser.add_argument("--export", metavar="FILE.gguf", help="an exported GGUF to read back")
    parser.add_argument("--server", metavar="URL", help="a running lorakit serve (e.g. http://127.0.0.1:8000)")
    parser.add_argument("--server-model", metavar="NAME", help="the adapter's model name on the server "
                                                               "(default: the adapter directory's name)")
    parser.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    parser.add_argument("--prompts", type=int, default=5, help="how many prompts (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorakit.inference.verify import report_table, verify

    results, prompts, source = verify(args.adapter, merged=args.merged, export=args.export, server=args.server,
                              server_model=args.server_model, model=args.model, max_new_tokens=args.max_new_tokens,
                              limit=args.prompts, api_key=args.api_key)
    print(f"{len(prompts)} prompts from {source}, greedy, {args.max_new_tokens} new tokens")
    print(report_table(results, prompts))
    failed = [r.stage for r in results[1:] if r.failure]
    if failed:
        print(f"verify: FAILED at {', '.join(failed)}")
        return 1
    print(f"verify: all {len(results)} stages agree on {len(prompts)} prompts")
    return 0
