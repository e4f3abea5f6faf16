"""Serving under load: lorakit's continuous batching against peft's mixed batches, over real HTTP.

    python benchmarks/serve_load.py [--clients 1 8 32 128] [--requests-per-client 4] [--max-tokens 64]
    python benchmarks/serve_load.py --tiny --clients 2 --requests-per-client 2 --max-tokens 8   # smoke run
    python benchmarks/serve_load.py --decode-only        # the decode roofline alone (no servers)

The base model (the built-in SmolLM2-135M-Instruct; ``--tiny``: a 2-layer random Llama with its
tokenizer) carries 8 random adapters of mixed kinds: LoRA r8 and r16, rsLoRA, DoRA r8 and r16,
PiSSA (saved converted), AdaLoRA (pruned ranks) and LoRA with ``modules_to_save`` (lm_head).
Each side is a real server on loopback, in its own process, behind lorakit's HTTP layer:

    lorakit   lorakit.server.run.serve (what ``lorakit serve`` runs): continuous batching
    static    the same routes over benchmarks/_serve_sides.StaticEngine: lorakit's engine before
              continuous batching (batch at a time through the same mixed-adapter batcher)
    peer      the same routes over benchmarks/_serve_sides.PeerEngine: peft ``adapter_names``
              mixed batches, batch at a time (DoRA, modules_to_save and AdaLoRA rows as their own
              sub-batches: peft's mixed batch refuses them)

For each N in ``--clients``: N concurrent streaming clients (the official ``openai`` client),
N x ``--requests-per-client`` chat requests over the 8 adapters, arriving as a Poisson process
(``--rate`` per second, default 2 N), bounded by ``--time-limit`` seconds of sending. Reported:
generated tokens/s (usage.completion_tokens / wall time), time to first token p50/p99,
inter-token latency p50/p99 (gaps between streamed chunks), requests lost (errors, truncated
streams), and with ``--check`` requests whose greedy answer differs from that adapter alone.

Decode roofline (in this process): the host's memory bandwidth from a large copy (bytes read +
written / time, best of 5), and lorakit's decode tokens/s at ``--decode-rows`` rows (in the dtype
``lorakit serve --dtype auto`` picks on this host) against the bandwidth limit rows x bandwidth /
(bytes of weights read per step), and against the compute limit: the base's matrix products
alone, each shape at this host's best measured time ((rows, in) x (in, out), weight hot in
cache, the faster of F.linear and oneDNN's prepacked linear, best of 20), with no attention,
norms, adapters or sampling: an upper bound on decode tokens/s. At 32 rows on a 2-core CPU the
compute limit is the lower one: a decode step there is bound by matmul work, not by reading
the weights, and the benchmark prints how far the bandwidth limit lies beyond it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

API_KEY = "serve-load-key"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ADALORA_TARGETS = ["o_proj", "gate_proj"]  # a module holds LoRA-family or AdaLoRA layers, not both
TOPICS = ["the sea", "bread", "a violin", "rain", "mountains", "a library", "trains", "bees", "winter",
          "a lighthouse", "coffee", "the moon", "chess", "a garden", "rivers", "clocks"]


# --- model and adapters -------------------------------------------------------------------
def _tiny_model_dir(root: Path) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.models.load import builtin_gguf_path, gguf_to_transformers_dir

    tokenizer = AutoTokenizer.from_pretrained(gguf_to_transformers_dir(builtin_gguf_path("smollm2-135m-instruct")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return str(root / "model")


def _small(params, scale: float, seed: int) -> None:
    """Random but small changes, so the adapted models still write language-like text."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.mul_(1 + scale * torch.randn(param.shape, generator=generator))


def make_adapters(model_dir: str, root: Path) -> dict[str, str]:
    """8 adapters of mixed kinds over ``model_dir``, saved as lorakit saves them: name -> directory."""
    from lorakit import AdaLoraConfig, LoraConfig, get_peft_model, load_model

    kinds = {"lora-r8": dict(r=8), "lora-r16": dict(r=16), "rslora-r16": dict(r=16, use_rslora=True),
             "dora-r8": dict(r=8, use_dora=True), "dora-r16": dict(r=16, use_dora=True),
             "pissa-r8": dict(r=8, init_lora_weights="pissa"), "mts-r8": dict(r=8, modules_to_save=["lm_head"])}
    dirs = {}
    for i, (name, options) in enumerate(kinds.items()):
        torch.manual_seed(i)
        base, _ = load_model(model_dir)
        options = {"init_lora_weights": False, **options}
        model = get_peft_model(base, LoraConfig(lora_alpha=16, target_modules=LORA_TARGETS, **options), name)
        for _, layer in model.adapter_layers():
            with torch.no_grad():  # random B scaled down; PiSSA starts equal to the base: move it a little
                layer.lora_B[name].weight.mul_(0.05 if options["init_lora_weights"] is False else 1.05)
            if name in layer.lora_magnitude_vector:
                _small([layer.lora_magnitude_vector[name].weight], 0.05, i)
        _small([w.modules_to_save[name].weight for w in model._wrappers()], 0.05, i)
        dirs[name] = _save(model, name, root)
    torch.manual_seed(99)
    base, _ = load_model(model_dir)
    ada = get_peft_model(base, AdaLoraConfig(init_r=8, target_r=4, total_step=10, lora_alpha=16,
                                             init_lora_weights=False, target_modules=ADALORA_TARGETS), "adalora")
    pattern = {}
    for j, (module, layer) in enumerate(ada.adapter_layers()):
        kept = [k < 2 + j % 6 for k in range(8)]  # ranks 2..7, different per layer
        with torch.no_grad():
            layer.lora_E["adalora"].mul_(0.05)
            layer.lora_E["adalora"][~torch.tensor(kept)] = 0
        pattern[f"{module}.lora_E"] = kept
    ada.peft_config["adalora"].rank_pattern = pattern
    dirs["adalora"] = _save(ada, "adalora", root)
    return dirs


def _save(model, name: str, root: Path) -> str:
    model.save_pretrained(root / name, selected_adapters=[name])
    nested = root / name / name  # peft's layout for a non-default adapter name
    return str(nested if nested.is_dir() else root / name)


# --- host ------------------------------------------------------------------------------------
def memory_bandwidth(megabytes: int = 256) -> float:
    """Bytes/s of a large tensor copy (read + write), best of 5."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


def weight_bytes(model) -> int:
    """Bytes of every distinct parameter tensor (tied weights once): what a decode step reads."""
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel() * param.element_size()
    return total


def _linear_seconds(rows: int, in_features: int, out_features: int, dtype: torch.dtype) -> float:
    """This host's best time for one (rows, in) x (in, out) product, its weight hot in cache: the
    faster of ``F.linear`` (what the model runs) and oneDNN's prepacked linear where the build has
    it (a kernel lorakit does not use: the bound holds for either), best of 20 each."""
    import torch.nn.functional as F

    x, weight = torch.randn(rows, in_features).to(dtype), torch.randn(out_features, in_features).to(dtype)
    calls = [lambda: F.linear(x, weight)]
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        try:  # private ops: a build or dtype they refuse leaves F.linear alone
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            calls.append(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
        except RuntimeError:
            pass
    best = float("inf")
    for call in calls:
        call()
        for _ in range(20):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
    return best


def base_matmul_shapes(model) -> dict[tuple[int, int], int]:
    """(in, out) -> count of the base model's matrix products per token: every nn.Linear and
    GPT-2 Conv1D outside the adapters (tied weights once per use: the head is a product even when
    its weight is the embedding's)."""
    from transformers.pytorch_utils import Conv1D

    shapes: dict[tuple[int, int], int] = {}
    for name, module in model.named_modules():
        if "lora_" in name or "modules_to_save" in name:
            continue
        if isinstance(module, torch.nn.Linear):
            shape = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            shape = tuple(module.weight.shape)
        else:
            continue
        shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def matmul_ceiling(model, rows: int, dtype: torch.dtype) -> tuple[float, float]:
    """(tokens/s, FLOP/s): an upper bound on decode at ``rows`` rows on this host, from the base's
    matrix products alone, each at this host's best measured time for its shape (weights hot in
    cache, no attention, norms, adapters or sampling counted)."""
    shapes = base_matmul_shapes(model)
    seconds = sum(count * _linear_seconds(rows, i, o, dtype) for (i, o), count in shapes.items())
    flops = sum(count * 2 * rows * i * o for (i, o), count in shapes.items())
    return rows / seconds, flops / seconds


def _decode_tokens_per_s(multi, rows: int, adapters: list[str | None], steps: int = 16) -> float:
    from lorakit.inference.batched import GenerationRequest
    from lorakit.inference.continuous import ContinuousBatcher

    batcher = ContinuousBatcher(multi, multi.tokenizer, max_rows=rows)
    prompt = multi.tokenizer("Write two sentences about the sea.")["input_ids"]
    states = [batcher.new_row(GenerationRequest(prompt, adapters[i % len(adapters)], 64, ignore_eos=True))
              for i in range(rows)]
    batcher.step(states)
    for _ in range(3):  # warm-up
        batcher.step()
    start = time.perf_counter()
    for _ in range(steps):
        batcher.step()
    return rows * steps / (time.perf_counter() - start)


def decode_roofline(model_dir: str, dirs: dict[str, str], rows: int, bandwidth: float) -> dict:
    """lorakit's steady decode tokens/s at ``rows`` rows over the 8 adapters (and with every row on
    the base), in the dtype ``lorakit serve`` picks here (--dtype auto), against two limits:
    bandwidth (rows x bandwidth / bytes of weights read per step) and compute (``matmul_ceiling``:
    the base's matrix products alone, each at this host's best time for its shape)."""
    from lorakit.inference import MultiAdapterModel
    from lorakit.server.run import serving_dtype

    dtype = serving_dtype("auto")
    multi = MultiAdapterModel.from_pretrained(model_dir, dirs, dtype=dtype)
    measured = _decode_tokens_per_s(multi, rows, list(dirs))
    base_only = _decode_tokens_per_s(multi, rows, [None])
    weights = weight_bytes(multi.model)
    limit = rows * bandwidth / weights
    compute_limit, rate = matmul_ceiling(multi.model, rows, getattr(torch, dtype))
    return {"rows": rows, "dtype": dtype, "tokens_per_s": measured, "base_only_tokens_per_s": base_only,
            "limit_tokens_per_s": limit, "fraction": measured / limit, "weight_bytes": weights,
            "matmul_flops_per_s": rate, "compute_limit_tokens_per_s": compute_limit,
            "compute_fraction": measured / compute_limit}


# --- servers -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_side(side: str, model_dir: str, dirs: dict[str, str], port: int, max_batch: int) -> None:
    """Run one side's server in this process until killed (the benchmark starts it as a subprocess)."""
    from lorakit.server.protocol import Limits

    limits = Limits(max_tokens=4096, max_waiting=100_000)
    if side == "lorakit":
        from lorakit.server.run import serve

        serve(model_dir, dirs, port=port, api_key=API_KEY, limits=limits, served_model_name="base",
              max_batch=max_batch)
        return
    import uvicorn

    from _serve_sides import PeerEngine, StaticEngine
    from lorakit.server.app import ServerSettings, create_app
    from lorakit.server.transport import uvicorn_config

    engine = (PeerEngine if side == "peer" else StaticEngine)(model_dir, dirs, max_batch=max_batch)
    app = create_app(engine, ServerSettings("base", API_KEY, None, limits))
    uvicorn.Server(uvicorn_config(app, limits, host="127.0.0.1", port=port, log_level="warning")).run()


def start_server(side: str, model_dir: str, dirs: dict[str, str], max_batch: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, __file__, "--serve", side, "--model-dir", model_dir, "--adapters", json.dumps(dirs),
               "--port", str(port), "--max-batch", str(max_batch)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {side} server exited with code {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the {side} server did not start within 600 s")


# --- load ----------------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _one(client, model: str, topic: str, max_tokens: int, sent: float) -> dict:
    chunks, usage, finish = [], None, None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Write two sentences about {topic}."}],
            max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    chunks.append((time.monotonic(), choice.delta.content))
                finish = choice.finish_reason or finish
    except Exception as err:  # a lost request: counted, never raised
        return {"lost": f"{type(err).__name__}: {err}"[:200]}
    if finish is None or usage is None:
        return {"lost": "stream ended without finish_reason or usage"}
    times = [t for t, _ in chunks]
    return {"model": model, "topic": topic, "text": "".join(text for _, text in chunks), "tokens": usage,
            "ttft": (times[0] - sent) if times else None, "itl": [b - a for a, b in zip(times, times[1:])]}


async def run_load(url: str, models: list[str], clients: int, requests: int, rate: float, max_tokens: int,
                   time_limit: float, seed: int = 0) -> dict:
    """``requests`` Poisson arrivals (``rate``/s) over ``models``, at most ``clients`` in flight."""
    import openai

    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(clients)
    plan = [(models[i % len(models)], TOPICS[rng.randrange(len(TOPICS))]) for i in range(requests)]

    async def bounded(model, topic):
        async with gate:
            return await _one(client, model, topic, max_tokens, time.monotonic())

    start = time.monotonic()
    tasks = []
    for model, topic in plan:
        if time.monotonic() - start > time_limit:
            break
        tasks.append(asyncio.create_task(bounded(model, topic)))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    wall = time.monotonic() - start
    await client.close()
    done = [r for r in results if "lost" not in r]
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    itl = [gap for r in done for gap in r["itl"]]
    return {"clients": clients, "sent": len(tasks), "complete": len(done), "lost": len(results) - len(done),
            "lost_reasons": sorted({r["lost"] for r in results if "lost" in r})[:3],
            "tokens_per_s": sum(r["tokens"] for r in done) / wall, "wall_s": wall,
            "ttft_p50": _percentile(ttft, 50), "ttft_p99": _percentile(ttft, 99),
            "itl_p50": _percentile(itl, 50), "itl_p99": _percentile(itl, 99), "answers": done}


def check_greedy(model_dir: str, dirs: dict[str, str], answers: list[dict], max_tokens: int) -> int:
    """Answers that differ from that adapter alone (transformers' generate, greedy, one row)."""
    from lorakit.inference import MultiAdapterModel

    multi = MultiAdapterModel.from_pretrained(model_dir, dirs)
    tokenizer, expected, wrong = multi.tokenizer, {}, 0
    for answer in answers:
        key = (answer["model"], answer["topic"])
        if key not in expected:
            text = tokenizer.apply_chat_template([{"role": "user", "content": f"Write two sentences about {key[1]}."}],
                                                 tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            multi.set_adapter(None if key[0] == "base" else key[0])
            out = multi.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
            expected[key] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        wrong += answer["text"] != expected[key]
    return wrong


def _row(side: str, r: dict) -> str:
    return (f"{side:8} {r['clients']:>4} {r['sent']:>5} {r['complete']:>5} {r['lost']:>4} {r['tokens_per_s']:>9.1f} "
            f"{r['ttft_p50']:>8.3f} {r['ttft_p99']:>8.3f} {1000 * r['itl_p50']:>8.1f} {1000 * r['itl_p99']:>8.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--rate", type=float, default=None, help="arrivals per second (default: 2 x clients)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds of sending per load level")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--decode-rows", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke runs)")
    sides = ["lorakit", "static", "peer"]
    parser.add_argument("--sides", nargs="+", choices=sides, default=sides)
    parser.add_argument("--decode-only", action="store_true", help="only the decode roofline, no servers")
    parser.add_argument("--check", action="store_true", help="compare lorakit's answers with each adapter alone")
    parser.add_argument("--serve", choices=["lorakit", "static", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_side(args.serve, args.model_dir, json.loads(args.adapters), args.port, args.max_batch)
        return 0

    print(f"host: cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}")
    bandwidth = memory_bandwidth()
    print(f"memory bandwidth (copy, read + write): {bandwidth / 1e9:.1f} GB/s")
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    if args.tiny:
        model_dir = _tiny_model_dir(root)
    else:
        from lorakit.models.load import builtin_gguf_path, gguf_to_transformers_dir

        model_dir = str(gguf_to_transformers_dir(builtin_gguf_path("smollm2-135m-instruct")))
    dirs = make_adapters(model_dir, root / "adapters")
    print(f"model {model_dir}; adapters: {', '.join(dirs)}")
    roofline = decode_roofline(model_dir, dirs, args.decode_rows, bandwidth)
    print(f"decode at {roofline['rows']} rows ({roofline['dtype']} base): {roofline['tokens_per_s']:.1f} tokens/s over "
          f"the 8 adapters, {roofline['base_only_tokens_per_s']:.1f} with every row on the base\n"
          f"  bandwidth limit {roofline['limit_tokens_per_s']:.1f} tokens/s ({roofline['weight_bytes'] / 2**20:.0f} MiB "
          f"of weights per step) -> {100 * roofline['fraction']:.1f}% of it\n"
          f"  compute limit {roofline['compute_limit_tokens_per_s']:.1f} tokens/s (the base's matmuls alone, each "
          f"at its best time here: {roofline['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s) -> "
          f"{100 * roofline['compute_fraction']:.1f}% of it; "
          f"the compute limit is {100 * roofline['compute_limit_tokens_per_s'] / roofline['limit_tokens_per_s']:.0f}% "
          f"of the bandwidth limit")
    if args.decode_only:
        return 0

    print(f"\n{'side':8} {'N':>4} {'sent':>5} {'done':>5} {'lost':>4} {'tok/s':>9} {'ttft50':>8} {'ttft99':>8} "
          f"{'itl50ms':>8} {'itl99ms':>8}")
    models = list(dirs)
    results = {}
    for side in args.sides:
        process, url = start_server(side, model_dir, dirs, args.max_batch)
        try:
            for clients in args.clients:
                load = asyncio.run(run_load(url, models, clients, clients * args.requests_per_client,
                                            args.rate or 2.0 * clients, args.max_tokens, args.time_limit))
                results[(side, clients)] = load
                print(_row(side, load), *(["lost:", *load["lost_reasons"]] if load["lost"] else []), flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)
    if args.check and "lorakit" in args.sides:
        largest = max(args.clients)
        wrong = check_greedy(model_dir, dirs, results[("lorakit", largest)]["answers"], args.max_tokens)
        print(f"\ngreedy check at {largest} clients: {wrong} of {results[('lorakit', largest)]['complete']} "
              f"answers differ from that adapter alone")
    for other in [side for side in args.sides if side != "lorakit"] if "lorakit" in args.sides else []:
        for clients in args.clients:
            ours, theirs = results[("lorakit", clients)], results[(other, clients)]
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"] if theirs["tokens_per_s"] else float("inf")
            print(f"N={clients}: lorakit / {other} tokens/s = {ratio:.2f}x; "
                  f"TTFT p99 {ours['ttft_p99']:.3f} s vs {theirs['ttft_p99']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
