"""The server's generation worker: continuous batching across adapters.

Request handlers (asyncio) put jobs on a FIFO queue. One worker thread loops:

    take:  the jobs that fit beside the running rows (``ContinuousBatcher.has_room``: a cap on
           rows and on KV-cache bytes), in arrival order; the first that does not fit is held
           (still waiting) until rows leave, so none overtakes it and none is dropped; when
           nothing runs, wait for a job, then ``batch_window_s`` for others arriving with it.
           While rows are decoding, the prompts taken in one step hold at most
           ``prefill_tokens`` tokens (the first always joins): with a small budget a burst of
           arrivals joins over a few steps instead of stalling every running stream at once
    step:  under ``lock``: the taken jobs join (prefilled), every running row decodes one token,
           finished rows leave and their jobs are answered

Text is pushed to each job's asyncio queue as it is generated, so streaming needs no polling.
A job whose client hangs up is cancelled and its row leaves at the next step.

Adapter load / unload take the same lock, so adapters change only between steps. An unload
first stops admitting rows for that adapter and waits until its running rows finish, so a
stream that has started always ends normally.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.inference.batched import GenerationRequest, result_of
from lorakit.inference.continuous import DEFAULT_MAX_KV_BYTES, PREFILL_TOKENS, ContinuousBatcher
from lorakit.server.protocol import ApiError

# Prompt tokens prefilled per step while other rows decode (``lorakit serve --prefill-tokens``).
# A smaller budget shortens the longest gap between a running stream's tokens and lengthens the
# wait of a burst of new requests. Measured with benchmarks/serve_load.py (32 clients over 8
# adapters, built-in model, 2-core CPU): a 256-token budget gave time-to-first-token p99 4.32 s
# and inter-token p99 0.87 s, against 2.72 s and 0.60 s with 2048 (more steps each carrying a
# prefill), so by default a step takes what one prefill forward does (continuous.PREFILL_TOKENS).
DEFAULT_PREFILL_TOKENS = PREFILL_TOKENS


class Job:
    """One request in flight; ``events`` receives ("text", str), then ("done", result) or ("error", exc).
    ``started_step`` / ``finished_step``: the engine's step counter when it joined and when it ended."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.started_step: int | None = None
        self.finished_step: int | None = None
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
    def __init__(self, multi, tokenizer, max_batch: int = 32, batch_window_s: float = 0.01,
                 max_kv_bytes: int = DEFAULT_MAX_KV_BYTES, prefill_tokens: int = DEFAULT_PREFILL_TOKENS):
        self.multi = multi
        self.tokenizer = tokenizer
        self.batch_window_s = batch_window_s
        self.prefill_tokens = prefill_tokens
        self.batcher = ContinuousBatcher(multi, tokenizer, max_rows=max_batch, max_kv_bytes=max_kv_bytes)
        self.batcher.kv_cache()  # its probe forward now, before any request or thread can race it
        self.lock = threading.Lock()
        self._changed = threading.Condition(self.lock)  # notified after every step (unload waits on it)
        self.peak_rows = 0  # the most rows one step ran (tests and logs)
        self._jobs: dict[int, Job] = {}  # id(RowState) -> job, for the rows running
        self._draining: set[str] = set()  # adapters being unloaded: no new rows
        self._queue: queue.Queue = queue.Queue()
        self._held: Job | None = None  # taken from the queue but not yet fitting: still waiting
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

    @property
    def steps(self) -> int:
        return self.batcher.steps

    @property
    def running(self) -> int:
        return self.batcher.running

    # --- called from request handlers -------------------------------------------------
    def submit(self, request: GenerationRequest) -> Job:
        """Queue ``request``; an ApiError (400) when it could not fit the KV-cache cap even alone."""
        if not self.batcher.fits_alone(request):
            raise ApiError(400, f"prompt + max_tokens ({len(request.prompt_ids)} + {request.max_new_tokens} tokens) "
                                f"needs more KV cache than this server's cap of "
                                f"{self.batcher.max_kv_bytes / 2**20:.0f} MiB; ask for fewer tokens",
                           param="max_tokens", code="context_length_exceeded")
        job = Job(request, asyncio.get_running_loop())
        self._queue.put(job)
        return job

    def waiting(self) -> int:
        """Jobs that have not joined the batch yet."""
        return self._queue.qsize() + (self._held is not None)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def load_adapter(self, name: str, directory: Path) -> None:
        """Load ``name``; one that mixed batches cannot serve (a trained bias, a bottleneck
        adapter) is unloaded again and refused, so the adapters served stay as they were."""
        with self.lock:
            self.multi.add_adapter(name, directory)
            try:
                self.multi.stacks()  # build the mixed-batch stacks now (DoRA's scales too), not in a step
            except LorakitError:
                self.multi.delete_adapter(name)
                raise

    def unload_adapter(self, name: str) -> None:
        """Unload ``name`` once no running row uses it; rows for it that have not started get a 404."""
        with self._changed:
            self._draining.add(name)
            try:
                while any(job.request.adapter == name for job in self._jobs.values()):
                    self._changed.wait(timeout=1.0)
                self.multi.delete_adapter(name)
            finally:
                self._draining.discard(name)

    # --- the worker thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            joining, closing = self._take()
            with self._changed:
                self._step(joining)
                self._changed.notify_all()
            if closing:
                self._shut_down()
                return

    def _take(self) -> tuple[list[Job], bool]:
        """(jobs to join now, whether close() was called); see module docstring."""
        jobs: list[Job] = []
        deadline = None
        while True:
            job, self._held = self._held, None
            if job is None:
                try:
                    if not self.batcher.running and not jobs:
                        job = self._queue.get()  # idle: wait for work
                        deadline = time.monotonic() + self.batch_window_s
                    elif deadline is not None:
                        job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    else:
                        job = self._queue.get_nowait()
                except queue.Empty:
                    return jobs, False
            if job is None:
                return jobs, True
            if job.cancelled:
                continue
            if not self.batcher.has_room([j.request for j in jobs] + [job.request]) or \
                    self._over_prefill_budget(jobs, job):
                self._held = job
                return jobs, False
            jobs.append(job)

    def _over_prefill_budget(self, jobs: list[Job], job: Job) -> bool:
        """Whether ``job`` would take this step's prompts past ``prefill_tokens`` while rows decode."""
        if not jobs or not self.batcher.running:
            return False
        return sum(len(j.request.prompt_ids) for j in jobs + [job]) > self.prefill_tokens

    def _admissible(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose adapter is still served; the others are answered 404."""
        loaded = set(self.multi.adapter_names) - self._draining
        admitted = []
        for job in jobs:
            adapter = job.request.adapter
            if job.cancelled:
                continue
            if adapter is not None and adapter not in loaded:  # unloaded while the job waited
                job.fail(ApiError(404, f"The model '{adapter}' was unloaded", param="model", code="model_not_found"))
            else:
                admitted.append(job)
        return admitted

    def _step(self, joining: list[Job]) -> None:
        admitted = self._admissible(joining)
        states = [self.batcher.new_row(job.request) for job in admitted]
        for job, state in zip(admitted, states):
            job.started_step = self.batcher.steps
            self._jobs[id(state)] = job
        try:
            finished = self.batcher.step(states)
        except Exception as err:  # a bug or an out-of-memory: answer every running job, keep serving
            error = ApiError(400, str(err)) if isinstance(err, LorakitError) else \
                ApiError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")
            for state in self.batcher.reset() + [s for s in states if id(s) in self._jobs]:
                job = self._jobs.pop(id(state), None)
                if job is not None:
                    job.fail(error)
            return
        self.peak_rows = max(self.peak_rows, self.batcher.running + len(finished))
        for state in finished:
            job = self._jobs.pop(id(state))
            job.finished_step = self.batcher.steps
            job.finish(result_of(state))

    def _shut_down(self) -> None:
        error = ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        for state in self.batcher.reset():
            self._jobs.pop(id(state)).fail(error)
        pending = [self._held] if self._held else []
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if job is not None:
                job.fail(error)
