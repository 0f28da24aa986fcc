"""Engine: the in-process API. One frozen T5, per-row adapters, continuous batching on one loop thread.

    engine = Engine.from_config(EngineConfig())
    engine.register_adapter("support-bot", "/path/to/adapter")      # metadata only until first use
    [res] = engine.generate([GenerationRequest("hello", adapter="support-bot")])
    res = await engine.submit(request)                                # from asyncio: shares the batch
    async for ev in engine.stream(request): ...                       # TokenEvent..., GenerationResult

Threads: callers validate and enqueue; the loop thread owns the batch, the KV cache and every slot write;
loader threads read adapters from disk into host memory (serve/cache.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

import torch

from serve.cache import BLOCKED as CACHE_BLOCKED
from serve.cache import LOADING, READY, AdapterCache
from serve.config import EngineConfig
from serve.decode import KVCache, T5Parts, decode_step, encode, fuse_activations, prefill_cross, sample
from serve.device_map import apply_device_map, devices_of, plan_device_map
from serve.errors import (
    AdapterExistsError,
    AdapterLoadError,
    ConfigError,
    EngineClosedError,
    OverloadedError,
    PeftServeError,
    RequestCancelledError,
    RequestTimeoutError,
    RequestValidationError,
    UnknownAdapterError,
)
from serve.merge_policy import MergePolicy
from serve.observer import EngineObserver, safe_call
from serve.requests import (
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
    validate_params,
    validate_request,
)
from serve.scheduler import BLOCKED, FAIL, OK, WAIT, admit
from serve.sequence import Sequence

__all__ = ["Engine", "EngineConfig", "GenerationParams", "GenerationRequest", "GenerationResult", "TokenEvent"]

log = logging.getLogger("peftserve.engine")
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,127}")


@dataclass(frozen=True)
class _Registered:
    spec: object  # adapters.AdapterSpec (module paths interned: 10,000 registrations stay small)
    key: tuple[str, int]  # (name, version): a replaced adapter is a new cache key

    @property
    def kind(self) -> str:
        return str(self.spec.kind)


class Engine:
    def __init__(self, config: EngineConfig, base, observer: EngineObserver | None = None):
        """Use `Engine.from_config`. `base` is a LoadedBase this engine owns (its model gets wrapped)."""
        from adapters import AdapterKind, AdapterLimits, BaseDescription, SlotConfig, attach_slots

        self.config = config
        self.observer = observer or EngineObserver()
        self.base = base
        self.tokenizer = base.tokenizer
        model = base.model
        fuse_activations(model)
        self.parts = T5Parts.of(model)
        self.base_desc = BaseDescription.from_model(model, base.name, base.fingerprint)
        self.limits = AdapterLimits(max_rank=config.max_rank, max_virtual_tokens=config.max_virtual_tokens,
                                    max_file_bytes=config.max_adapter_file_bytes)
        slot_counts = {AdapterKind(k): n for k, n in config.device_slots.items() if n > 0}
        self.slots = attach_slots(model, SlotConfig(slots=slot_counts, max_rank=config.max_rank,
                                                    max_virtual_tokens=config.max_virtual_tokens))
        virtual = config.max_virtual_tokens if config.device_slots.get("prompt", 0) else 0
        self.kv = KVCache(self.parts, config.max_batch_rows, config.max_new_tokens_cap,
                          config.max_input_tokens + virtual)
        self._wake = threading.Event()
        self.cache = AdapterCache(load=self._load_weights, write=self.slots.write, slots=config.device_slots,
                                  host_bytes=config.host_bytes, device_bytes=config.device_bytes,
                                  loader_threads=config.loader_threads, observer=self.observer,
                                  on_loaded=self._wake.set)
        self._reg_lock = threading.Lock()
        self._adapters: dict[str, _Registered] = {}
        self._version = 0
        self._inbox: deque[Sequence] = deque()
        self._inbox_lock = threading.Lock()
        self._queued = 0  # waiting + inbox, for the queue bound
        self._waiting: list[Sequence] = []  # loop thread only, arrival order
        self._running: list[Sequence] = []  # loop thread only, index == KV-cache row
        self._rows_cache = None
        self._merged: tuple[str, int] | None = None  # key of the (IA)3 adapter merged into the weights
        self.merge_policy = MergePolicy(config.ia3_merge, config.ia3_merge_after_steps, config.dedicated_adapter)
        self.counters = {"steps": 0, "tokens": 0, "prefills": 0, "merges": 0, "unmerges": 0, "merge_s": 0.0,
                         "unmerge_s": 0.0, "finished": 0, "failed": 0}
        self._closed = False
        self.device_map: dict[str, str] | None = None
        self._last_mem_report = 0.0
        self._thread = threading.Thread(target=self._loop, name="peftserve-engine", daemon=True)
        self._thread.start()

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EngineConfig | None = None, observer: EngineObserver | None = None) -> Engine:
        from serve.base import load_base

        config = config or EngineConfig()
        dtype = config.torch_dtype()
        base = load_base(config.base, dtype=dtype)
        model = base.model
        plan = config.device_map
        if plan is None and (config.device_memory or config.device == "auto"):
            budgets = config.device_memory or _cuda_budgets()
            nbytes = torch.finfo(dtype).bits // 8
            plan = plan_device_map(model.config, budgets, nbytes, **_block_extras(model.config, config, nbytes))
        if plan is not None:
            apply_device_map(model, plan)
        else:
            model.to(config.device)
        engine = cls(config, base, observer)
        engine.device_map = plan
        return engine

    def close(self) -> None:
        """Stop the loop: waiting and running requests fail with EngineClosedError."""
        self._closed = True
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self.cache.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- adapters ----------------------------------------------------------------------------------
    def register_adapter(self, name: str, path, replace: bool = False, prefetch: bool = False):
        """Validate `path` against the base (config + safetensors header only) and register it under
        `name`. With replace=True an existing name gets a new version: running rows finish on the old
        one, later requests use the new one. prefetch=True starts loading it into host memory now (its
        first request then skips the disk read). Returns the AdapterSpec. Raises AdapterError subclasses
        (bad directory), AdapterExistsError, RequestValidationError (bad name)."""
        from adapters import inspect_adapter

        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise RequestValidationError("name", "adapter names are 1-128 characters of letters, digits, "
                                                 "'.', '_', '-', '/' starting with a letter or digit")
        spec = inspect_adapter(path, self.base_desc, self.limits, name=name)
        kind = str(spec.kind)
        if self.config.device_slots.get(kind, 0) == 0:
            raise AdapterLoadError(name, f"this engine serves no {kind} adapters "
                                         f"(EngineConfig.device_slots[{kind!r}] is 0)")
        slim = _slim_spec(spec)
        with self._reg_lock:
            old = self._adapters.get(name)
            if old is not None and not replace:
                raise AdapterExistsError(name)
            self._version += 1
            reg = _Registered(slim, (name, self._version))
            self.cache.add(reg.key, kind, slim, int(spec.size_bytes))
            self._adapters[name] = reg
        if old is not None:
            self.cache.discard(old.key)  # pinned by running rows: freed when they finish
        if prefetch:
            self.cache.prefetch(reg.key)
        return spec

    def remove_adapter(self, name: str) -> None:
        """Unregister `name`: running rows finish; waiting and new requests get UnknownAdapterError."""
        with self._reg_lock:
            reg = self._adapters.pop(name, None)
        if reg is None:
            raise UnknownAdapterError(name)
        self.cache.discard(reg.key)
        self._wake.set()

    def adapters(self) -> list[dict]:
        """Registered adapters: spec fields plus `version` and the `tier` it is cached in now."""
        with self._reg_lock:
            regs = list(self._adapters.values())
        on_device = set(self.cache.resident())
        on_host = set(self.cache.host_keys())
        out = []
        for r in regs:
            d = r.spec.to_dict()
            d["version"] = r.key[1]
            d["tier"] = "device" if r.key in on_device else "host" if r.key in on_host else "disk"
            out.append(d)
        return out

    def adapter_spec(self, name: str):
        with self._reg_lock:
            reg = self._adapters.get(name)
        if reg is None:
            raise UnknownAdapterError(name)
        return reg.spec

    def _load_weights(self, spec):
        from adapters import load_adapter

        return load_adapter(spec.path, self.base_desc, self.limits, name=spec.name)

    # ---- requests ----------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Sequence:
        """Validate and tokenize (caller's thread). Raises RequestValidationError / UnknownAdapterError."""
        cfg = self.config
        validate_request(request)
        params = validate_params(request.params, cfg)
        virtual = 0
        if request.adapter is not None:
            spec = self.adapter_spec(request.adapter)
            virtual = spec.num_virtual_tokens or 0
        ids = self.tokenizer(request.inputs).input_ids
        if len(ids) > cfg.max_input_tokens:
            raise RequestValidationError("inputs", f"{len(ids)} tokens; this server accepts at most "
                                                   f"{cfg.max_input_tokens} input tokens")
        cost = len(ids) + virtual + params.max_new_tokens
        if cost > cfg.max_batch_tokens:
            raise RequestValidationError("params.max_new_tokens",
                                         f"input ({len(ids)} tokens) + max_new_tokens exceeds the batch token "
                                         f"budget {cfg.max_batch_tokens}")
        seed = params.seed
        if seed is None and params.do_sample:
            seed = secrets.randbits(63)
        seq = Sequence(request=request, params=params, input_ids=ids, seed=seed,
                       deadline=time.perf_counter() + cfg.request_timeout_s, cost_tokens=cost,
                       prefill_tokens=len(ids) + virtual)
        return seq

    def enqueue(self, seq: Sequence) -> None:
        with self._inbox_lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if self._queued >= self.config.max_queue:
                raise OverloadedError(f"{self._queued} requests are waiting (max_queue="
                                      f"{self.config.max_queue}); retry later")
            self._queued += 1
            self._inbox.append(seq)
        safe_call(self.observer, "on_request_queued", seq.adapter, self._queued)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        """Free the row (or queue place) of a request whose caller went away. Safe from any thread."""
        seq.cancelled = True
        self._wake.set()

    def generate(self, requests: list[GenerationRequest], timeout: float | None = None
                 ) -> list[GenerationResult]:
        """Run requests to completion in the shared batch (blocking). Validates all before running any;
        raises the first request's error if any failed."""
        single = isinstance(requests, GenerationRequest)
        seqs = [self.prepare(r) for r in ([requests] if single else requests)]
        done = threading.Semaphore(0)
        out: dict[int, tuple] = {}
        def collect(i: int, res, exc) -> None:
            out[i] = (res, exc)
            done.release()

        for i, seq in enumerate(seqs):
            seq.on_done = functools.partial(collect, i)
        for seq in seqs:
            self.enqueue(seq)
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in seqs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not done.acquire(timeout=left):
                for seq in seqs:
                    self.cancel(seq)
                raise RequestTimeoutError(f"generate did not finish within {timeout} s")
        errors = [out[i][1] for i in range(len(seqs)) if out[i][1] is not None]
        if errors:
            raise errors[0]
        results = [out[i][0] for i in range(len(seqs))]
        return results[0] if single else results

    async def submit(self, request: GenerationRequest) -> GenerationResult:
        """Await one request's result; cancelling the awaiting task frees its row."""
        seq = self.prepare(request)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(res, exc):
            loop.call_soon_threadsafe(_resolve, fut, res, exc)

        seq.on_done = done
        self.enqueue(seq)
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancel(seq)
            raise

    async def stream(self, request: GenerationRequest):
        """Async iterator: a TokenEvent per generated token, then the GenerationResult.
        Closing the iterator early (client disconnect) frees the row."""
        seq = self.prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seq.on_event = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        seq.on_done = lambda res, exc: loop.call_soon_threadsafe(queue.put_nowait, (res, exc))
        self.enqueue(seq)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, TokenEvent):
                    yield item
                    continue
                finished = True
                res, exc = item
                if exc is not None:
                    raise exc
                yield res
                return
        finally:
            if not finished:
                self.cancel(seq)

    # ---- introspection -----------------------------------------------------------------------------
    def info(self) -> dict:
        cfg = self.config
        with self._reg_lock:
            kinds: dict[str, int] = {}
            for r in self._adapters.values():
                kinds[r.kind] = kinds.get(r.kind, 0) + 1
        stats = self.cache.stats()
        devices = devices_of(self.device_map) if getattr(self, "device_map", None) else [
            str(next(self.base.model.parameters()).device)]
        return {
            "base": self.base.name, "fingerprint": self.base.fingerprint, "dtype": str(self.parts.dtype),
            "devices": devices, "device_map": getattr(self, "device_map", None),
            "scheduling": cfg.scheduling, "ia3_merge": cfg.ia3_merge,
            "limits": {"max_batch_rows": cfg.max_batch_rows, "max_batch_tokens": cfg.max_batch_tokens,
                       "max_input_tokens": cfg.max_input_tokens, "max_new_tokens": cfg.max_new_tokens_cap,
                       "max_stop_sequences": cfg.max_stop_sequences, "max_queue": cfg.max_queue,
                       "max_rank": cfg.max_rank, "max_virtual_tokens": cfg.max_virtual_tokens,
                       "request_timeout_s": cfg.request_timeout_s},
            "adapters": {"registered": sum(kinds.values()), "by_kind": kinds},
            "cache": {"device_slots": dict(cfg.device_slots), "device_entries": stats.device_entries,
                      "device_bytes": stats.device_bytes, "host_entries": stats.host_entries,
                      "host_bytes": stats.host_bytes, "hits": stats.hits, "misses": stats.misses,
                      "evictions": stats.evictions},
            "kv_cache_bytes": self.kv.nbytes(),
            "queue": {"waiting": self._queued, "running": len(self._running)},
            "counters": dict(self.counters),
        }

    def stats(self) -> dict:
        """Counters for benchmarks: steps, tokens, merges/unmerges (+ seconds), cache stats."""
        s = self.cache.stats()
        return {**self.counters, "cache": s.__dict__}

    # ---- the loop (engine thread) ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._wake.clear()
            self._take_inbox()
            if self._closed:
                self._fail_all(EngineClosedError("the engine is shut down"))
                return
            try:
                self._reap()
                self._admit()
                safe_call(self.observer, "on_queue_depth", self._queued, len(self._running))
                if self._running:
                    self._step()
                else:
                    self._release_idle_merge()
                    self._wake.wait(timeout=0.02 if self._waiting else 0.5)
                self._report_memory()
            except Exception as e:  # noqa: BLE001 - a failing batch must not kill the server
                log.exception("engine step failed; failing the running requests")
                self._fail_running(e)

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            while self._inbox:
                self._waiting.append(self._inbox.popleft())

    def _dequeue(self, seq: Sequence) -> None:
        with self._inbox_lock:
            self._queued -= 1

    def _reap(self) -> None:
        now = time.perf_counter()
        keep = []
        for seq in self._waiting:
            if seq.cancelled or now > seq.deadline:
                self._dequeue(seq)
                self._fail(seq, None if seq.cancelled else RequestTimeoutError(
                    f"request timed out after {self.config.request_timeout_s} s in the queue"))
            else:
                keep.append(seq)
        self._waiting = keep
        gone = [i for i, s in enumerate(self._running) if s.cancelled or now > s.deadline]
        for i in reversed(gone):
            seq = self._running[i]
            self._remove_row(i)
            self._fail(seq, None if seq.cancelled else RequestTimeoutError(
                f"request timed out after {self.config.request_timeout_s} s"))

    def _readiness(self, seq: Sequence) -> str:
        if seq.adapter is None:
            return OK
        with self._reg_lock:
            reg = self._adapters.get(seq.adapter)
        if reg is None:
            seq.error = UnknownAdapterError(seq.adapter)
            return FAIL
        seq.key, seq.kind = reg.key, reg.kind
        prepared = self.cache.prepare(reg.key, count=not seq.counted)
        seq.counted = True
        if prepared.state == READY:
            seq.slot = self.cache.pin(reg.key)
            return OK
        if prepared.state == LOADING:
            return WAIT
        if prepared.state == CACHE_BLOCKED:
            return BLOCKED
        err = prepared.error
        if isinstance(err, KeyError):  # removed between lookup and prepare
            seq.error = UnknownAdapterError(seq.adapter)
        else:
            seq.error = AdapterLoadError(seq.adapter, f"could not be loaded: {err}")
            seq.error.__cause__ = err
        return FAIL

    def _admit(self) -> None:
        if not self._waiting:
            return
        cfg = self.config
        running_tokens = sum(s.cost_tokens for s in self._running)
        admitted, failed = admit(self._waiting, len(self._running), running_tokens,
                                 max_rows=cfg.max_batch_rows, max_tokens=cfg.max_batch_tokens,
                                 max_skips=cfg.fairness_max_skips, static=cfg.scheduling == "static",
                                 readiness=self._readiness, max_prefill_tokens=cfg.max_prefill_tokens)
        if not admitted and not failed:
            return
        gone = set(map(id, admitted)) | set(map(id, failed))
        self._waiting = [s for s in self._waiting if id(s) not in gone]
        for seq in failed:
            self._dequeue(seq)
            self._fail(seq, seq.error)
        if admitted:
            for seq in admitted:
                self._dequeue(seq)
            try:
                self._prefill(admitted)
            except Exception as e:  # noqa: BLE001 - only the joining rows fail; running rows are intact
                log.exception("encoder pass failed for %d joining requests", len(admitted))
                joined = set(map(id, self._running))
                error = PeftServeError(f"generation failed: {e!r}")
                for seq in admitted:
                    if id(seq) in joined:
                        self._remove_row(self._running.index(seq))
                    elif seq.key is not None:
                        self.cache.release(seq.key)
                    self._fail(seq, error)

    def _pairs(self, seqs: list[Sequence]):
        from adapters import RowAdapters

        pairs = tuple(None if s.key is None or s.key == self._merged else (s.kind, s.slot) for s in seqs)
        cached = self._rows_cache  # same mapping as last step: the wrapped layers keep their gathered weights
        if cached is None or cached.pairs != pairs:
            self._rows_cache = cached = RowAdapters.from_pairs(pairs)
        return cached

    def _prefill(self, seqs: list[Sequence]) -> None:
        t0 = time.perf_counter()
        self._apply_merge_policy(self._running + seqs)
        width = max(len(s.input_ids) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s.input_ids)] = torch.tensor(s.input_ids)
            mask[i, :len(s.input_ids)] = 1
        rows = self._pairs(seqs)
        emb_dev = self.base.model.get_input_embeddings().weight.device
        embeds, mask = self.slots.encoder_inputs(ids.to(emb_dev), mask.to(emb_dev), rows)
        self.slots.set_rows(rows)
        hidden = encode(self.parts, embeds, mask)
        first = len(self._running)
        prefill_cross(self.parts, self.kv, list(range(first, first + len(seqs))), hidden, mask)
        now = time.perf_counter()
        for s in seqs:
            s.t_admit = now
            s.start()
            self._running.append(s)
            safe_call(self.observer, "on_request_admitted", s.adapter, s.kind, now - s.t_submit)
        self.counters["prefills"] += 1
        safe_call(self.observer, "on_prefill", len(seqs), int(mask.sum()), now - t0)

    def _step(self) -> None:
        t0 = time.perf_counter()
        running = self._running
        self._apply_merge_policy(running)
        self.slots.set_rows(self._pairs(running))
        start = self.parts.decoder_start_token_id
        tokens = torch.tensor([s.last_token(start) for s in running], dtype=torch.long)
        positions = torch.tensor([len(s.tokens) for s in running], dtype=torch.long)
        logits = decode_step(self.parts, self.kv, tokens, positions)
        want_lp = any(s.params.logprobs for s in running)
        next_ids, logprobs = sample(logits, [s.sampling for s in running], want_lp)
        now = time.perf_counter()
        finished: list[tuple[int, str]] = []
        for i, s in enumerate(running):
            if s.t_first is None:
                s.t_first = now
                safe_call(self.observer, "on_first_token", s.adapter, s.kind, now - s.t_submit)
            reason = s.append(next_ids[i], logprobs[i] if logprobs else None, self.parts.eos_token_id,
                              self.tokenizer)
            if reason is not None:
                finished.append((i, reason))
        n = len(running)
        distinct = len({s.key for s in running})
        for i, reason in reversed(finished):
            seq = running[i]
            self._remove_row(i)
            self.counters["finished"] += 1
            result = seq.result(reason)
            safe_call(self.observer, "on_request_finished", seq.adapter, seq.kind, reason, result.prompt_tokens,
                      result.generated_tokens, result.timings["total_s"])
            seq.finish(result, None)
        self.counters["steps"] += 1
        self.counters["tokens"] += n
        safe_call(self.observer, "on_step", n, distinct, n, time.perf_counter() - t0)

    def _remove_row(self, i: int) -> None:
        """Row i leaves: the last row moves into its place (KV cache and list), its pin is released."""
        running = self._running
        seq = running[i]
        last = len(running) - 1
        if i != last:
            moved = running[last]
            self.kv.move_row(last, i, len(moved.tokens))
            running[i] = moved
        running.pop()
        if seq.key is not None:
            self.cache.release(seq.key)

    def _apply_merge_policy(self, seqs: list[Sequence]) -> None:
        """Merge the (IA)3 adapter every row uses (serve/merge_policy.py); unmerge exactly when rows mix."""
        want = self.merge_policy.target([(s.key, s.kind) for s in seqs], self._merged)
        if want == self._merged:
            return
        if self._merged is not None:
            self._unmerge()
        if want is not None:
            t0 = time.perf_counter()
            self.slots.merge(seqs[0].kind, seqs[0].slot)
            dt = time.perf_counter() - t0
            self.cache.pin(want)  # a merged adapter's slot must not be evicted while merged
            self._merged = want
            self.counters["merges"] += 1
            self.counters["merge_s"] += dt
            safe_call(self.observer, "on_merge", "ia3", dt)
        self._rows_cache = None

    def _release_idle_merge(self) -> None:
        """No rows run: a removed merged adapter, or one holding a slot others wait for, is unmerged."""
        if self.merge_policy.release_when_idle(self._merged, self._merged is not None and not
                                               self.cache.contains(self._merged), bool(self._waiting)):
            self._unmerge()

    def _unmerge(self) -> None:
        t0 = time.perf_counter()
        self.slots.unmerge()
        dt = time.perf_counter() - t0
        self.cache.release(self._merged)
        self._merged = None
        self._rows_cache = None
        self.counters["unmerges"] += 1
        self.counters["unmerge_s"] += dt
        safe_call(self.observer, "on_unmerge", "ia3", dt)

    def _fail(self, seq: Sequence, error: BaseException | None) -> None:
        self.counters["failed"] += 1
        safe_call(self.observer, "on_request_failed", seq.adapter,
                  "cancelled" if error is None else type(error).__name__)
        seq.finish(None, error if error is not None else RequestCancelledError("request cancelled"))

    def _fail_running(self, error: BaseException) -> None:
        wrapped = error if isinstance(error, PeftServeError) else PeftServeError(f"generation failed: {error!r}")
        while self._running:
            seq = self._running[-1]
            self._remove_row(len(self._running) - 1)
            self._fail(seq, wrapped)
        if self._merged is not None:
            self._unmerge()

    def _fail_all(self, error: BaseException) -> None:
        self._fail_running(error)
        self._take_inbox()
        for seq in self._waiting:
            self._dequeue(seq)
            self._fail(seq, error)
        self._waiting = []

    def _report_memory(self) -> None:
        now = time.monotonic()
        if now - self._last_mem_report < 5.0 or not torch.cuda.is_available():
            return
        self._last_mem_report = now
        for dev in {t.device for t in self.kv.self_k if t.device.type == "cuda"}:
            safe_call(self.observer, "on_device_memory", str(dev), torch.cuda.memory_allocated(dev),
                      torch.cuda.memory_reserved(dev))


def _resolve(fut: asyncio.Future, res, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)


def _slim_spec(spec):
    """Intern module paths: every adapter of a base shares the same few hundred strings."""
    return replace(spec, modules=tuple(sys.intern(m) for m in spec.modules))


def _block_extras(t5, cfg: EngineConfig, nbytes: int) -> dict[str, int]:
    """Bytes that live with each block besides its weights: slot tensors (all kinds, every target linear)
    and, for decoder blocks, the preallocated KV cache rows. The planner counts them with the block."""
    d, inner, dff = t5.d_model, t5.num_heads * t5.d_kv, t5.d_ff
    ffn = [(d, dff), (d, dff), (dff, d)] if str(t5.feed_forward_proj).startswith("gated") else [(d, dff), (dff, d)]
    attention = [(d, inner)] * 3 + [(inner, d)]
    slots = cfg.device_slots

    def slot_bytes(linears) -> int:
        per = sum(slots["lora"] * cfg.max_rank * (i + o) + slots["ia3"] * max(i, o) + slots["bitfit"] * o
                  for i, o in linears)
        return per * nbytes

    virtual = cfg.max_virtual_tokens if slots.get("prompt", 0) else 0
    kv = 2 * cfg.max_batch_rows * inner * (cfg.max_new_tokens_cap + cfg.max_input_tokens + virtual) * nbytes
    return {"extra_encoder_block": slot_bytes(attention + ffn),
            "extra_decoder_block": slot_bytes(attention * 2 + ffn) + kv}


def _cuda_budgets() -> dict[str, int]:
    if not torch.cuda.is_available():
        raise ConfigError('device="auto" needs CUDA devices (none found); use device="cpu" or give device_memory')
    return {f"cuda:{i}": int(torch.cuda.get_device_properties(i).total_memory * 0.8)
            for i in range(torch.cuda.device_count())}
