"""The other sides of benchmarks/serve_load.py, each behind lorakit's own HTTP layer: engines
that offer what lorakit's routes need (server/routes.py) and generate batch at a time (the
requests arriving within ``batch_window_s`` of the first, up to ``max_batch``; a request that
arrives while a batch runs waits for the next one).

``StaticEngine`` is lorakit's engine before continuous batching: each batch runs to its end
through the same mixed-adapter batcher (``generate_batch``).

``PeerEngine`` generates the way a peft user batches many adapters today: left-padded,
``PeftModel.generate`` with
``adapter_names`` (peft's mixed batch), greedy, streamed through a transformers streamer. What
peft's mixed batch refuses runs as its own sub-batch of the same step, with ``set_adapter``:
each DoRA adapter (peft: "Cannot pass adapter_names when DoRA is enabled"), each adapter with
``modules_to_save`` (peft's wrapper then fails every mixed batch with a KeyError for the adapters
without a copy, so it gets its own PeftModel over its own copy of the base) and AdaLoRA (another
peft type, so another PeftModel too).
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.inference.batched import RowState, eos_token_ids, result_of
from lorakit.server.engine import Job


class _RowsStreamer:
    """transformers' streamer protocol: ``put`` gets the prompt once, then (B,) tokens per step."""

    def __init__(self, rows: list[RowState], tokenizer, eos_ids: set[int]):
        self.rows, self.tokenizer, self.eos_ids = rows, tokenizer, eos_ids
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            if row.finish_reason is None:
                row.push(token, self.tokenizer, self.eos_ids)

    def end(self) -> None:
        pass


class BatchWorker:
    """The queue, the worker thread and the engine calls the routes make, for an engine that runs
    ``generate(jobs)`` on one batch at a time."""

    def __init__(self, generate, max_batch: int, batch_window_s: float, name: str):
        self.generate, self.max_batch, self.batch_window_s = generate, max_batch, batch_window_s
        self.lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, request) -> Job:
        job = Job(request, asyncio.get_running_loop())
        self._queue.put(job)
        return job

    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, deadline = [first], time.monotonic() + self.batch_window_s
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                batch.append(job)
            with self.lock:
                self.generate(batch)


def _fixed_adapters(name, directory):
    raise LorakitError("this benchmark side serves a fixed set of adapters")


class StaticEngine:
    """lorakit batch at a time (see module docstring)."""

    def __init__(self, model_dir: str, adapters: dict[str, str], max_batch: int = 32, batch_window_s: float = 0.01):
        from lorakit.inference import MultiAdapterModel

        self.multi = MultiAdapterModel.from_pretrained(model_dir, adapters)
        self.tokenizer = self.multi.tokenizer
        config = self.multi.model.config
        self.context_length = getattr(config, "max_position_embeddings", None)
        self.worker = BatchWorker(self._generate, max_batch, batch_window_s, "static-generate")
        self.submit, self.waiting, self.close = self.worker.submit, self.worker.waiting, self.worker.close

    adapter_names = property(lambda self: self.multi.adapter_names)
    vocab_size = property(lambda self: len(self.tokenizer))
    load_adapter = unload_adapter = staticmethod(_fixed_adapters)

    def _generate(self, batch: list[Job]) -> None:
        from lorakit.inference.batched import generate_batch

        try:
            results = generate_batch(self.multi, self.tokenizer, [job.request for job in batch])
        except Exception as err:  # answer every job, keep serving
            for job in batch:
                job.fail(err)
            return
        for job, result in zip(batch, results):
            job.finish(result)


class PeerEngine:
    def __init__(self, model_dir: str, adapters: dict[str, str], max_batch: int = 32, batch_window_s: float = 0.01):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        kinds = {name: json.loads((Path(d) / "adapter_config.json").read_text()) for name, d in adapters.items()}
        self.mixable = {n for n, c in kinds.items()  # what one adapter_names batch can hold
                        if c.get("peft_type") == "LORA" and not c.get("use_dora") and not c.get("modules_to_save")}
        groups = {}  # PeftModel key -> its adapters: the mixable LoRA ones and DoRA share one
        for name, config in kinds.items():
            key = "lora" if config.get("peft_type") == "LORA" and not config.get("modules_to_save") else name
            groups.setdefault(key, []).append(name)
        self.models = {}  # adapter name (and "lora") -> the PeftModel holding it
        for key, names in groups.items():
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(adapters[name], adapter_name=name)
            for name in names + [key]:
                self.models[name] = model.eval()
        self._names = list(adapters)
        self.eos_ids = eos_token_ids(next(iter(self.models.values())).base_model.model, self.tokenizer)
        self.context = getattr(next(iter(self.models.values())).config, "max_position_embeddings", None)
        self.worker = BatchWorker(self._generate, max_batch, batch_window_s, "peer-generate")
        self.submit, self.waiting, self.close = self.worker.submit, self.worker.waiting, self.worker.close

    # --- the engine interface the routes use -------------------------------------------
    adapter_names = property(lambda self: list(self._names))
    context_length = property(lambda self: self.context)
    vocab_size = property(lambda self: len(self.tokenizer))

    load_adapter = unload_adapter = staticmethod(_fixed_adapters)

    def _groups(self, batch: list[Job]) -> dict:
        """Sub-batches peft can run: one mixed (adapter_names) batch of the mixable adapters and
        the base, and one per other adapter (set_adapter)."""
        groups: dict = {}
        for job in batch:
            adapter = job.request.adapter
            groups.setdefault("mixed" if adapter is None or adapter in self.mixable else adapter, []).append(job)
        return groups

    @torch.inference_mode()
    def _generate(self, batch: list[Job]) -> None:
        for key, jobs in self._groups(batch).items():
            rows = [RowState(job.request, None) for job in jobs]
            try:
                self._run_group(key, rows)
            except Exception as err:  # answer every job of the group, keep serving
                for job in jobs:
                    job.fail(err)
                continue
            for job, row in zip(jobs, rows):
                row.finish_reason = row.finish_reason or "length"
                job.finish(result_of(row))

    def _run_group(self, key: str, rows: list[RowState]) -> None:
        requests = [row.request for row in rows]
        width = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, request in enumerate(requests):  # left padding
            ids[b, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[b, width - len(request.prompt_ids):] = 1
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.max_new_tokens for r in requests),
                      do_sample=False, pad_token_id=pad, streamer=_RowsStreamer(rows, self.tokenizer, self.eos_ids))
        if key == "mixed":
            model = self.models.get("lora") or next(iter(self.models.values()))
            kwargs["adapter_names"] = [r.adapter or "__base__" for r in requests]
            model.generate(**kwargs)
            return
        model = self.models[key]
        model.set_adapter(key)
        model.generate(**kwargs)
