"""``lorakit verify``: the same prompts, greedy, through every form a trained adapter takes, and
a table of where they agree.

Stages (each compared with the first):

    adapter  base + adapter, unmerged (the reference)
    merged   the merged model: ``--merged DIR`` (a ``lorakit merge`` output, loaded from disk with
             its own tokenizer) or, without it, the adapter merged in memory
    gguf     ``--export F.gguf`` read back by an independent reader (transformers' GGUF loader,
             which dequantizes to fp32), with the tokenizer stored in the file
    server   ``--server URL``: a running ``lorakit serve`` (or any OpenAI-compatible server)
             answering /v1/chat/completions at temperature 0 for model ``--server-model``

Per stage: token sequences identical on how many prompts, the largest |Δ logit| over the prompt
positions (not for the server, which returns text: its replies are compared as text), and
whether the chat template, EOS token and stop ids (generation_config) equal the reference's.
A stage fails when its tokenizer metadata differs, when its answers differ, or when its
next-token distributions move more than its tolerance, a mean KL over the prompt positions:
1e-6 nats in fp32, the GGUF's by quantization (``GGUF_TOLERANCE``); q8_0 and q4_0 answers may
diverge without failing, as their rounding flips near-tied tokens.

Prompts: the user turns of the adapter's eval data (``training_config.yaml``'s data.eval, chat
or instruction rows), else a few built-in questions.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import LorakitError

BUILTIN_PROMPTS = ["What is the capital of France?", "Give me one tip for writing clear code.",
                   "Explain what a kettle does in one sentence.", "Name three primary colors."]
FP32_TOLERANCE = 1e-6
# mean KL (nats) a correct export of each weight type stays under. Measured on the quickstart
# adapter of the built-in 135M model (5 eval prompts): f16 2.7e-6, q8_0 2.6e-3, q4_0 0.47 (4 bits
# cost a model this small a lot); the same f16 export with q/k rows left unpermuted (a layout
# bug) measures 1.11. The bounds sit between: they flag broken exports, not lossy ones.
GGUF_TOLERANCE = {"F32": 1e-6, "F16": 1e-4, "BF16": 1e-3, "Q8_0": 0.05, "Q4_0": 0.75}
EXACT_ANSWERS = {"F32", "F16"}


@dataclass
class StageResult:
    stage: str
    answers: list[str]
    tokens: list[list[int]] | None = None
    max_logit_diff: float | None = None
    kl: float | None = None
    tolerance: float | None = None  # on the mean KL (nats)
    exact_required: bool = True
    metadata_problems: list[str] = field(default_factory=list)
    same_answers: int = 0
    failure: str | None = None


def verification_prompts(adapter: str | Path, limit: int = 5) -> tuple[list[list[dict]], str]:
    """(chat prompts (message lists ending with a user turn), where they came from): the
    adapter's eval data (its path as training recorded it: relative to the working directory,
    else to the adapter's parent), else the built-in questions."""
    import yaml

    config_file = Path(adapter) / "training_config.yaml"
    eval_file = None
    if config_file.is_file():
        data = (yaml.safe_load(config_file.read_text()) or {}).get("data") or {}
        recorded = data.get("eval")
        if isinstance(recorded, str) and recorded.endswith(".jsonl"):
            eval_file = next((p for p in (Path(recorded), Path(adapter).resolve().parent / recorded) if p.is_file()),
                             None)
    prompts = []
    if eval_file is not None:
        for line in eval_file.read_text(encoding="utf-8").splitlines():
            prompt = _prompt_of_row(json.loads(line)) if line.strip() else None
            if prompt:
                prompts.append(prompt)
            if len(prompts) == limit:
                break
    if prompts:
        return prompts, str(eval_file)
    return [[{"role": "user", "content": text}] for text in BUILTIN_PROMPTS[:limit]], "built-in questions"


def _prompt_of_row(row) -> list[dict] | None:
    if not isinstance(row, dict):
        return None
    messages = row.get("messages") or row.get("conversations")
    if isinstance(messages, list) and messages:
        last_user = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                        default=None)
        return None if last_user is None else messages[:last_user + 1]
    text = row.get("instruction") or row.get("prompt")
    if isinstance(text, str) and text:
        extra = row.get("input")
        return [{"role": "user", "content": f"{text}\n\n{extra}" if isinstance(extra, str) and extra else text}]
    return None


@torch.no_grad()
def run_model_stage(model, tokenizer, prompts, max_new_tokens: int):
    """(answers, token lists, prompt logits) of greedy generation for each prompt."""
    from lorakit.inference.generate import build_prompt

    answers, tokens, logits = [], [], []
    for prompt in prompts:
        text, templated = build_prompt(tokenizer, prompt)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)["input_ids"]
        logits.append(model(input_ids=ids).logits[0].float())
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        tokens.append(new)
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers, tokens, logits


def metadata_differences(reference_tokenizer, tokenizer, reference_stops, stops) -> list[str]:
    problems = []
    if (reference_tokenizer.chat_template or None) != (getattr(tokenizer, "chat_template", None) or None):
        problems.append("chat template differs" if getattr(tokenizer, "chat_template", None)
                        else "chat template missing")
    if reference_tokenizer.eos_token != tokenizer.eos_token:
        problems.append(f"EOS {tokenizer.eos_token!r} instead of {reference_tokenizer.eos_token!r}")
    if stops is not None and set(stops) != set(reference_stops):
        problems.append(f"stop ids {sorted(stops)} instead of {sorted(reference_stops)}")
    return problems


def stop_ids(model, tokenizer) -> list[int]:
    """The ids generation stops at: generation_config.eos_token_id (int or list), else the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos]))


def compare(reference: StageResult, result: StageResult, reference_logits, logits) -> StageResult:
    by_tokens = reference.tokens is not None and result.tokens is not None  # a server returns text only
    pairs = zip(reference.tokens, result.tokens) if by_tokens else zip(reference.answers, result.answers)
    result.same_answers = sum(a == b for a, b in pairs)
    if logits is not None and any(a.shape != b.shape for a, b in zip(reference_logits, logits)):
        result.failure = "the prompts tokenize to other lengths (another tokenizer or chat template)"
    elif logits is not None:
        result.max_logit_diff = max(float((a - b).abs().max()) for a, b in zip(reference_logits, logits))
        result.kl = mean_kl(reference_logits, logits)
        if result.tolerance is not None and result.kl > result.tolerance:
            result.failure = (f"next-token distributions differ by a mean KL of {result.kl:.3g}, beyond the "
                              f"tolerance {result.tolerance:g}")
    if result.metadata_problems:
        result.failure = "; ".join(result.metadata_problems)
    elif result.exact_required and result.same_answers < len(reference.answers):
        result.failure = result.failure or (f"{len(reference.answers) - result.same_answers} of "
                                            f"{len(reference.answers)} answers differ")
    return result


def mean_kl(reference_logits, logits) -> float:
    """Mean over prompt positions of KL(p_ref || p) of the next-token distributions (nats):
    0 for identical models, about 1e-5 for an f16 copy; a quantization's error in one number
    (the max |Δlogit| above depends on vocabulary size and on logits nobody samples)."""
    total, count = 0.0, 0
    for a, b in zip(reference_logits, logits):
        log_p, log_q = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        count += a.shape[0]
    return total / max(count, 1)


def gguf_file_type(path: Path) -> str:
    """The weight type of a GGUF (the most common type among its matrices): 'F16', 'Q8_0', ..."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(path))
    kinds = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    return kinds.most_common(1)[0][0] if kinds else "F32"


def verify(adapter: str | Path, merged: str | Path | None = None, export: str | Path | None = None,
           server: str | None = None, server_model: str | None = None, model: str | None = None,
           max_new_tokens: int = 32, limit: int = 5, api_key: str | None = None) -> tuple[list[StageResult], list, str]:
    """Run every stage asked for; (results, prompts, their source). The first result is the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.inference.generate import load_for_inference

    prompts, source = verification_prompts(adapter, limit)
    loaded, tokenizer = load_for_inference(adapter, model, dtype="float32")
    answers, tokens, ref_logits = run_model_stage(loaded, tokenizer, prompts, max_new_tokens)
    reference = StageResult("adapter", answers, tokens)
    reference.same_answers = len(prompts)
    ref_stops = stop_ids(loaded.model, tokenizer)
    results = [reference]

    if merged is not None:
        merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
        merged_tok = AutoTokenizer.from_pretrained(str(merged))
        stops = stop_ids(merged_model, merged_tok)
    else:
        merged_model, merged_tok = copy.deepcopy(loaded).merge_and_unload().eval(), tokenizer
        stops = ref_stops
    answers, tokens, logits = run_model_stage(merged_model, merged_tok, prompts, max_new_tokens)
    result = StageResult("merged", answers, tokens, tolerance=FP32_TOLERANCE,
                         metadata_problems=metadata_differences(tokenizer, merged_tok, ref_stops, stops))
    results.append(compare(reference, result, ref_logits, logits))
    del merged_model

    if export is not None:
        export = Path(export)
        if not export.is_file():
            raise LorakitError(f"--export {export}: no such file")
        kind = gguf_file_type(export)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(export.parent), gguf_file=export.name,
                                                          dtype=torch.float32).eval()
        gguf_tok = AutoTokenizer.from_pretrained(str(export.parent), gguf_file=export.name)
        answers, tokens, logits = run_model_stage(gguf_model, gguf_tok, prompts, max_new_tokens)
        result = StageResult(f"gguf ({kind.lower()})", answers, tokens, tolerance=GGUF_TOLERANCE.get(kind, 0.75),
                             exact_required=kind in EXACT_ANSWERS,
                             metadata_problems=metadata_differences(tokenizer, gguf_tok, ref_stops,
                                                                    stop_ids(gguf_model, gguf_tok)))
        results.append(compare(reference, result, ref_logits, logits))
        del gguf_model

    if server is not None:
        name = server_model or Path(adapter).name
        answers = [_server_answer(server, name, prompt, max_new_tokens, api_key) for prompt in prompts]
        results.append(compare(reference, StageResult("server", answers), None, None))
    return results, prompts, source


def _server_answer(url: str, model: str, messages: list[dict], max_tokens: int, api_key: str | None) -> str:
    import urllib.error
    import urllib.request

    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise LorakitError(f"server stage: {url} answered HTTP {err.code}: {err.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as err:
        raise LorakitError(f"server stage: cannot reach {url} ({err})") from None
    return (reply["choices"][0]["message"]["content"] or "").strip()


def report_table(results: list[StageResult], prompts) -> str:
    """The agreement table ``lorakit verify`` prints."""
    lines = [f"{'stage':<14} {'same answers':>12} {'max |Δlogit|':>13} {'mean KL':>9}  template/EOS/stops  verdict"]
    for r in results:
        diff = "-" if r.max_logit_diff is None else f"{r.max_logit_diff:.2e}"
        kl = "-" if r.kl is None else f"{r.kl:.1e}"
        meta = "n/a" if r.stage in ("adapter", "server") else ("same" if not r.metadata_problems else "DIFFERENT")
        verdict = "reference" if r is results[0] else ("FAIL: " + r.failure if r.failure else "ok")
        lines.append(f"{r.stage:<14} {r.same_answers:>5}/{len(prompts):<6} {diff:>13} {kl:>9}  {meta:<18} {verdict}")
    return "\n".join(lines)
