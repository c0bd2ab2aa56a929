"""The engine: one thread owns the model and runs iteration-level (continuous) batching.

Each loop turn, between two forwards: run queued commands (load/unload), install adapters the loader thread
has validated, evict beyond the LRU size, admit waiting requests (prefill them together, or take their KV
from the prompt cache), then run ONE decode step for every running row whatever its adapter (a row naming
the base gets no delta). A finished or cancelled row leaves the batch right after the step that ended it.
The model is never changed while a forward runs: structural changes happen here, between steps, under
`structure_lock` (which the loader also takes to read the module layout); so do the writes into the decode
steps' slot tables (lorakit/row_tables.py), which forwards only read.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from lorakit.row_tables import RowTables

from .decode_step import lean_step
from .encode import encode, no_head
from .jobs import Job, Seq
from .kv import PromptCache, empty_batch
from .metrics import Metrics
from .prefill import Parts, batch_rows, by_batch, prompt_states
from .registry import AdapterRegistry
from .sampling import next_token
from .schemas import ServeError
from .step_plans import StepPlans
from .threads import pin_threads


class Engine:
    def __init__(self, model: nn.Module, tokenizer, kind: str, registry: AdapterRegistry, metrics: Metrics,
                 max_batch: int = 32, max_queue: int = 256, prompt_cache: int = 4096, max_context: int = 2048) -> None:
        self.model, self.tokenizer, self.kind = model.eval(), tokenizer, kind
        self.registry, self.metrics = registry, metrics
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.prompt_cache = PromptCache(prompt_cache)
        self.tables = RowTables(max_batch)  # the running adapters' factors for decode steps (lorakit.row_tables)
        self.plans = StepPlans(self.model, registry)  # fused LoRA terms for steps under one adapter (step_plans.py)
        # Prefill needs the last position's logits only: the LM head over every prompt token would be wasted work.
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters \
            else {}
        # Decode steps: the lean Llama step where it applies (decode_step.py: ~1.2x tokens/s at batch 1, same
        # logits), else the model's forward. Prefill always runs the model's forward.
        self.decode = (lean_step(model) if kind == "causal_lm" else None) or self._forward_step
        self.structure_lock = threading.Lock()
        self.inbox: queue.Queue = queue.Queue()
        self.pending: list[Job] = []
        self.running: list[Seq] = []
        self.batch = empty_batch()
        self.loading: dict[str, Future] = {}  # adapter name -> its validation on the loader threads
        # One torch thread on the loaders: no OpenMP pool of their own beside the engine's (threads.py)
        self.loader = ThreadPoolExecutor(2, thread_name_prefix="lorakit-loader", initializer=pin_threads,
                                         initargs=(1,))
        self.threads = torch.get_num_threads()  # the engine thread's count: the creating thread's (`--threads`)
        self.outstanding, self.draining, self._stop = 0, False, False
        self._count_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)

    # -- called from the API threads ---------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        self.inbox.put(None)
        self.thread.join(timeout=10)
        self.loader.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> None:
        """Queue a job; 503 while draining, 429 + Retry-After when the queue is full."""
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise ServeError(503, "the server is shutting down; retry on another replica", type="server_error",
                             code="draining")
        with self._count_lock:
            if self.outstanding >= self.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise ServeError(429, f"the server has {self.outstanding} requests queued or running (limit "
                                      f"{self.max_queue}); retry shortly", type="rate_limit_error",
                                 code="queue_full", headers={"Retry-After": "1"})
            self.outstanding += 1
        self.metrics.queue_depth.inc()
        self.inbox.put(job)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between two steps; its result (or error) lands in the Future."""
        fut: Future = Future()
        self.inbox.put((fn, fut))
        return fut

    def idle(self) -> bool:
        with self._count_lock:
            return self.outstanding == 0

    # -- the loop ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        pin_threads(self.threads)
        while not self._stop:
            try:
                self._turn()
            except Exception:  # noqa: BLE001 - a bug in one turn must not kill the thread every request waits on
                traceback.print_exc()
                time.sleep(0.01)

    def _turn(self) -> None:
        self._take_inbox(block=not self.running and not self._ready())
        self.finish_loads()
        self._evict()
        self._admit()
        if self.running:
            self._guarded(self._step)

    def _ready(self) -> bool:
        return any(j.adapter is None or self.registry.is_loaded(j.adapter) or j.cancelled.is_set()
                   for j in self.pending)

    def _take_inbox(self, block: bool) -> None:
        items = []
        try:
            items.append(self.inbox.get(timeout=0.02) if block else self.inbox.get_nowait())
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        for item in items:
            if isinstance(item, Job):
                self.pending.append(item)
            elif isinstance(item, tuple):
                fn, fut = item
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller gets it through the Future
                    fut.set_exception(e)

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failed step fails its rows, never the server
            err = ServeError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
            for seq in self.running:
                self._close(seq.job, err)
            self.running, self.batch = [], empty_batch()

    def _close(self, job: Job, error: ServeError | None = None) -> None:
        """Finish a job exactly once: its last event, metrics, and its place in the queue bound."""
        if job.closed:
            return
        job.closed = True
        if error is not None:
            self.metrics.errors.labels(job.label, str(error.status)).inc()
            error.counted = True  # the API's error handler must not count it again
            job.emit("error", error)
        elif job.cancelled.is_set():
            self.metrics.cancelled.inc()
        else:
            self.metrics.latency.labels(job.label).observe(time.perf_counter() - job.start)
            if job.kind == "generate":
                self.metrics.generated_tokens.labels(job.label).inc(job.completion_tokens)
                job.emit("done", {"prompt_tokens": len(job.prompt), "completion_tokens": job.completion_tokens,
                                  "total_tokens": len(job.prompt) + job.completion_tokens})
        with self._count_lock:
            self.outstanding -= 1

    # -- adapters ----------------------------------------------------------------------------------------
    def load_async(self, name: str) -> Future:
        """Start validating adapter `name` on the loader thread (once); the engine installs it when done."""
        if name not in self.loading:
            path = self.registry.path_of(name)
            self.loading[name] = self.loader.submit(self.registry.plan, self.model, name, path, self.structure_lock)
        return self.loading[name]

    def finish_loads(self) -> None:
        for name, fut in list(self.loading.items()):
            if not fut.done():
                continue
            del self.loading[name]
            try:
                planned = fut.result()
                with self.structure_lock:
                    self.registry.install(self.model, planned)
                self.tables.drop(name)  # a slot holding an earlier file under this name must not be reused
                self.metrics.loads.inc()
                self.metrics.loaded.set(len(self.registry.loaded))
            except Exception as e:  # noqa: BLE001 - any failure fails the requests that named it, nothing else
                self.metrics.load_failures.inc()
                err = e if isinstance(e, ServeError) else ServeError(
                    400, f"adapter {name!r} could not be loaded: {e}", code="adapter_invalid", param="model")
                for job in [j for j in self.pending if j.adapter == name]:
                    self.pending.remove(job)
                    self.metrics.queue_depth.dec()
                    self._close(job, err)

    def in_use(self) -> set[str]:
        return {s.adapter for s in self.running if s.adapter} | {j.adapter for j in self.pending if j.adapter}

    def _evict(self) -> None:
        for name in self.registry.evictable(self.in_use()):
            self.unload(name)
            self.metrics.evictions.inc()

    def unload(self, name: str) -> int:
        """Remove adapter `name`'s tensors (engine thread, between steps); returns the bytes freed."""
        with self.structure_lock:
            freed = self.registry.unload(self.model, name)
        self.prompt_cache.drop_adapter(name)
        self.tables.drop(name)
        self.metrics.unloaded_bytes.inc(freed)
        self.metrics.loaded.set(len(self.registry.loaded))
        return freed

    # -- admission and prefill ---------------------------------------------------------------------------
    def _admit(self) -> None:
        group: list[Job] = []
        encode: dict[str, list[Job]] = {}  # embeddings / classify jobs: one forward per kind, adapters mixed
        rows = len(self.running)
        for job in list(self.pending):
            if job.cancelled.is_set():
                self._dequeue(job)
                self._close(job)
                continue
            if job.adapter is not None and not self.registry.is_loaded(job.adapter):
                self._count(job, hit=False)
                self._guard_load(job)
                continue
            self._count(job, hit=True)
            if job.adapter is not None:
                self.registry.touch(job.adapter)
            if job.kind != "generate":
                self._dequeue(job)
                encode.setdefault(job.kind, []).append(job)
            elif rows + job.n <= self.max_batch or rows == 0:
                self._dequeue(job)
                group.append(job)
                rows += job.n
        for jobs in encode.values():
            self._encode(jobs)
        if group:
            self._guarded_prefill(group)

    def _guard_load(self, job: Job) -> None:
        try:
            self.load_async(job.adapter)
        except ServeError as e:  # the directory vanished since the request was checked
            self._dequeue(job)
            self._close(job, e)

    def _dequeue(self, job: Job) -> None:
        self.pending.remove(job)
        self.metrics.queue_depth.dec()

    def _count(self, job: Job, hit: bool) -> None:
        if not job.counted and job.adapter is not None:
            (self.metrics.adapter_hits if hit else self.metrics.adapter_misses).inc()
        job.counted = True

    def _guarded_prefill(self, jobs: list[Job]) -> None:
        try:
            self._prefill(jobs)
        except Exception as e:  # noqa: BLE001 - a failed prefill fails its jobs only
            for job in jobs:
                self._close(job, ServeError(500, f"prefill failed: {type(e).__name__}: {e}", type="server_error"))

    @torch.inference_mode()
    def _prefill(self, jobs: list[Job]) -> None:
        """Compute (or fetch) the prompt KV of every new choice, sample its first token, join the batch."""
        seqs = [Seq(j, i, self.tokenizer, self.max_context, self.eos) for j in jobs for i in range(j.n)]
        parts, hits = prompt_states(self.model, seqs, self.registry.loaded, self.prompt_cache, self.pad_id,
                                    self.last_logits)
        self.metrics.prompt_cache_hits.inc(hits)
        for job in jobs:
            job.remaining = job.n
            self.metrics.prompt_tokens.labels(job.label).inc(len(job.prompt))
        joining = self._first_tokens(seqs, parts)
        self._join(joining, parts)

    def _first_tokens(self, seqs: list[Seq], parts: Parts) -> list[tuple[int, Seq]]:
        joining = []
        for i, seq in enumerate(seqs):
            reason = seq.push(next_token(parts[i][2], seq.job.sampling, seq.gen))
            if seq.job.first_token is not None and seq.index == 0:
                self.metrics.ttft.labels(seq.job.label).observe(seq.job.first_token - seq.job.start)
            if reason:
                self._finish(seq, reason)
            else:
                joining.append((i, seq))
        return joining

    def _join(self, joining: list[tuple[int, Seq]], parts: Parts) -> None:
        for kv, rows, seqs in by_batch(joining, parts):
            kv.select(rows)
            if self.running:
                self.batch.merge(kv)
            else:
                self.batch = kv
            self.running += seqs
        self.metrics.running.set(len(self.running))

    def _finish(self, seq: Seq, reason: str) -> None:
        seq.finish(reason)
        seq.job.remaining -= 1
        if seq.job.remaining == 0:
            self._close(seq.job)

    # -- one decode step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self) -> None:
        live = [i for i, s in enumerate(self.running) if not s.job.cancelled.is_set()]
        if len(live) < len(self.running):
            for s in [s for s in self.running if s.job.cancelled.is_set()]:
                self._close(s.job)
            self._keep(live)
            if not self.running:
                return
        names = [s.adapter for s in self.running]
        tables = self.tables if self.tables.sync(self.model, names) else None  # between forwards: may copy factors
        mask, pos = self.batch.step_inputs()
        ids = torch.tensor([[s.last] for s in self.running], dtype=torch.long)
        with batch_rows(names, tables), self.plans.for_step(names):
            logits = self.decode(ids, mask, pos, self.batch.cache)
        self.batch.stepped(mask)
        self.metrics.batch_size.observe(len(names))
        self.metrics.batch_adapters.observe(len(set(names)))
        greedy = logits.argmax(-1).tolist()  # one call for the batch; sampled rows draw below
        keep = []
        for i, seq in enumerate(self.running):
            s = seq.job.sampling
            reason = seq.push(greedy[i] if s.temperature == 0 else next_token(logits[i], s, seq.gen))
            if reason:
                self._finish(seq, reason)
            else:
                keep.append(i)
        self._keep(keep)

    def _forward_step(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=True).logits[:, -1]

    def _keep(self, rows: list[int]) -> None:
        if len(rows) < len(self.running):
            self.running = [self.running[i] for i in rows]
            if self.running:
                self.batch.select(rows)
            else:
                self.batch = empty_batch()
        self.metrics.running.set(len(self.running))

    # -- embeddings and classification -------------------------------------------------------------------
    def _encode(self, jobs: list[Job]) -> None:
        """One forward for every input of these embeddings (or classify) jobs (encode.py)."""
        for job in [j for j in jobs if j.kind == "classify" and not self.registry.heads.get(j.adapter)]:
            jobs.remove(job)
            self._close(job, no_head(job.adapter))
        if not jobs:
            return
        try:
            names, results = encode(self.model, jobs, self.pad_id, batch_rows)
        except Exception as e:  # noqa: BLE001 - fail these jobs, keep serving
            for job in jobs:
                self._close(job, ServeError(500, f"{job.kind} failed: {type(e).__name__}: {e}", type="server_error"))
            return
        self.metrics.batch_size.observe(len(names))
        self.metrics.batch_adapters.observe(len(set(names)))
        for job, part in zip(jobs, results, strict=True):
            self.metrics.prompt_tokens.labels(job.label).inc(int(job.inputs["attention_mask"].sum()))
            job.emit("result", part)
            self._close(job)
