"""The server's generation worker: requests that arrive together are batched across adapters.

Request handlers (asyncio) put jobs on a queue; one worker thread takes the first waiting
job, collects whatever else arrives within ``batch_window_s`` (up to ``max_batch`` jobs), and
runs them as one mixed-adapter batch with a KV cache (``lorakit.inference.batched``). Text is
pushed back to each job's asyncio queue as it is generated, so streaming needs no polling.
Batches are static: a job that arrives while a batch runs waits for the next one.

Adapter load / unload hold the same lock as a batch, so adapters never change mid-batch.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.inference.batched import GenerationRequest, generate_batch
from lorakit.server.protocol import ApiError


class Job:
    """One request in flight; ``events`` receives ("text", str), then ("done", result) or ("error", exc)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        request.on_text = lambda text: self._send("text", text)
        request.is_cancelled = lambda: self.cancelled
        self.request = request

    def _send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def finish(self, result) -> None:
        self._send("done", result)

    def fail(self, error: Exception) -> None:
        self._send("error", error)

    def cancel(self) -> None:
        """The client is gone (or has its answer): the row leaves the batch at the next step."""
        self.cancelled = True


class BatchingEngine:
    def __init__(self, multi, tokenizer, max_batch: int = 32, batch_window_s: float = 0.01):
        self.multi = multi
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.lock = threading.Lock()
        self.batch_sizes: list[int] = []  # one entry per batch run, for tests and logs
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lorakit-generate", daemon=True)
        self._thread.start()

    # --- what the routes need --------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return self.multi.adapter_names

    @property
    def context_length(self) -> int | None:
        """The model's context in tokens (None when its config does not say)."""
        config = self.multi.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    # --- called from request handlers -------------------------------------------------
    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request, asyncio.get_running_loop())
        self._queue.put(job)
        return job

    def waiting(self) -> int:
        """Jobs queued and not yet taken by the worker."""
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def load_adapter(self, name: str, directory: Path) -> None:
        with self.lock:
            self.multi.add_adapter(name, directory)
            self.multi.stacks()  # build the mixed-batch stacks now, not in the next request

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self.multi.delete_adapter(name)

    # --- the worker thread ------------------------------------------------------------
    def _collect(self, first: Job) -> list[Job]:
        batch = [first]
        deadline = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._collect(first)
            with self.lock:
                self._generate(batch)

    def _generate(self, batch: list[Job]) -> None:
        loaded = set(self.multi.adapter_names)
        runnable = []
        for job in batch:
            adapter = job.request.adapter
            if job.cancelled:
                continue
            if adapter is not None and adapter not in loaded:  # unloaded while the job waited
                job.fail(ApiError(404, f"The model '{adapter}' was unloaded", param="model", code="model_not_found"))
            else:
                runnable.append(job)
        if not runnable:
            return
        self.batch_sizes.append(len(runnable))
        try:
            results = generate_batch(self.multi, self.tokenizer, [job.request for job in runnable])
        except LorakitError as err:
            for job in runnable:
                job.fail(ApiError(400, str(err)))
        except Exception as err:  # a bug or an out-of-memory: answer every job, keep serving
            for job in runnable:
                job.fail(ApiError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error"))
        else:
            for job, result in zip(runnable, results):
                job.finish(result)
