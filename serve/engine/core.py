"""Engine: the in-process API. One frozen T5, per-row adapters, continuous batching on one loop thread.

    engine = Engine.from_config(EngineConfig())
    engine.register_adapter("support-bot", "/path/to/adapter")      # metadata only until first use
    [res] = engine.generate([GenerationRequest("hello", adapter="support-bot")])
    res = await engine.submit(request)                                # from asyncio: shares the batch
    async for ev in engine.stream(request): ...                       # TokenEvent..., GenerationResult

Threads: callers validate and enqueue (this module); the loop thread (serve/engine/batch_loop.py) owns the batch,
the KV cache and every slot write; loader threads read adapters from disk into host memory (serve/engine/cache.py).
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import sys
import threading
import time
from dataclasses import replace

import torch

from serve.engine.batch_loop import BatchLoop
from serve.engine.cache import AdapterCache
from serve.engine.combinations import (
    DerivedAdapters,
    DerivedSource,
    Registered,
    Term,
    combination_label,
    described,
    resolve,
)
from serve.engine.config import EngineConfig
from serve.engine.decode import KVCache, T5Parts, tune_head
from serve.engine.detokenize import Detokenizer
from serve.engine.device_map import apply_device_map, devices_of, plan_device_map
from serve.engine.errors import (
    AdapterExistsError,
    AdapterLoadError,
    ConfigError,
    RequestTimeoutError,
    RequestValidationError,
    UnknownAdapterError,
)
from serve.engine.observer import EngineObserver
from serve.engine.optimize import optimize_base
from serve.engine.requests import (
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
    check_vocabulary,
    rows_of,
    validate_params,
    validate_request,
)
from serve.engine.sequence import Sequence
from serve.engine.threads import run_on_fresh_thread

__all__ = ["Engine", "EngineConfig", "GenerationParams", "GenerationRequest", "GenerationResult", "TokenEvent"]

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,127}")


class Engine:
    def __init__(self, config: EngineConfig, base, observer: EngineObserver | None = None):
        """Use `Engine.from_config`. `base` is a LoadedBase this engine owns (its model gets wrapped)."""
        from adapters import AdapterKind, AdapterLimits, BaseDescription, SlotConfig, attach_slots

        self.config = config
        self.observer = observer or EngineObserver()
        self.base = base
        self.tokenizer = base.tokenizer
        model = base.model
        self.optimizations = optimize_base(model)
        int8 = config.dtype == "int8"  # the head is quantized below: nothing to tune
        self.parts = replace(T5Parts.of(model), head_weight_major=frozenset() if int8 else
                             tune_head(model.lm_head.weight, config.max_batch_rows))
        self.base_desc = BaseDescription.from_model(model, base.name, base.fingerprint)
        self.limits = AdapterLimits(max_rank=config.max_rank, max_virtual_tokens=config.max_virtual_tokens,
                                    max_prefix_tokens=config.max_prefix_tokens,
                                    max_bottleneck=config.max_bottleneck,
                                    max_file_bytes=config.max_adapter_file_bytes)
        slot_counts = {AdapterKind(k): n for k, n in config.device_slots.items() if n > 0}
        self.slots = attach_slots(model, SlotConfig(slots=slot_counts, max_rank=config.max_rank,
                                                    max_virtual_tokens=config.max_virtual_tokens,
                                                    max_prefix_tokens=config.max_prefix_tokens,
                                                    max_bottleneck=config.max_bottleneck))
        if int8:  # after the slots: adapters stay float32, sized by the float weights
            from serve.engine import int8 as int8_base

            if (why := int8_base.available()) is not None:
                raise ConfigError(f"dtype int8 is not available: {why}")
            self.optimizations.update(int8_base.quantize_linears(model))
        virtual = config.max_virtual_tokens if config.device_slots.get("prompt", 0) else 0
        hub = config.device_slots.get("adapterhub", 0) > 0
        prefixed = hub or config.device_slots.get("prefix", 0) > 0
        self.kv = KVCache(self.parts, config.max_batch_rows, config.max_new_tokens_cap,
                          config.max_input_tokens + virtual, config.max_prefix_tokens if prefixed else 0,
                          adapterhub=hub)
        self._wake = threading.Event()  # wakes the loop thread
        self.cache = AdapterCache(load=self._load_weights, write=self.slots.write, slots=config.device_slots,
                                  host_bytes=config.host_bytes, device_bytes=config.device_bytes,
                                  loader_threads=config.loader_threads, observer=self.observer,
                                  on_loaded=self._wake.set)
        self._reg_lock = threading.Lock()
        self._adapters: dict[str, Registered] = {}
        self.derived = DerivedAdapters(self.cache, config.max_derived_adapters)
        self._version = 0
        self.device_map: dict[str, str] | None = None
        self.detokenizer = Detokenizer(self.tokenizer)  # shared with the serving layer (token texts, special ids)
        self.loop = BatchLoop(config, self.observer, self.parts, self.kv, self.slots, self.cache, self.detokenizer,
                              self._resolve_terms, self._wake)

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EngineConfig | None = None, observer: EngineObserver | None = None) -> Engine:
        """Load the base, place it, wrap it, start the loop. The work runs on a thread that exits when done,
        so the caller's thread never holds an OpenMP team beside the loop's (serve/engine/threads.py)."""
        return run_on_fresh_thread(cls._build, config or EngineConfig(), observer, name="peftserve-start")

    @classmethod
    def _build(cls, config: EngineConfig, observer: EngineObserver | None) -> Engine:
        from serve.engine.base import load_base

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
        engine.warm_up()
        return engine

    def warm_up(self, rows: int = 8, tokens: int = 8) -> float:
        """One encoder pass and two decoder steps over `rows` base rows, straight through the decode functions
        (no request, no metrics), so that a server's first request does not pay for first-call work: kernel
        libraries' lazily built kernels and buffers (MKL, oneDNN primitives for the int8 base), the KV cache's
        first touch. Runs before `from_config` returns, i.e. before /health reports ready. Returns seconds."""
        from adapters import RowAdapters
        from serve.engine.decode import decode_step, encode, prefill_cross

        t0 = time.perf_counter()
        rows = max(1, min(rows, self.config.max_batch_rows))
        tokens = max(1, min(tokens, self.config.max_input_tokens))
        base_rows = RowAdapters.from_rows((None,) * rows)
        emb_dev = self.slots.embedding.weight.device
        ids = torch.full((rows, tokens), self.parts.eos_token_id, dtype=torch.long, device=emb_dev)
        mask = torch.ones(rows, tokens, dtype=torch.long, device=emb_dev)
        embeds, mask = self.slots.encoder_inputs(ids, mask, base_rows)
        self.slots.set_rows(base_rows, token_mask=mask)
        prefill_cross(self.parts, self.kv, list(range(rows)), encode(self.parts, embeds, mask), mask)
        self.slots.set_rows(base_rows)
        token = torch.full((rows,), self.parts.decoder_start_token_id, dtype=torch.long)
        for position in range(min(2, self.config.max_new_tokens_cap)):
            token = decode_step(self.parts, self.kv, token, torch.full((rows,), position)).argmax(-1)
        self.slots.set_rows(None)
        self.warm_up_s = time.perf_counter() - t0
        return self.warm_up_s

    def close(self) -> None:
        """Stop the loop: waiting and running requests fail with EngineClosedError."""
        self.loop.close()
        self.cache.close()

    @property
    def counters(self) -> dict:
        """steps, tokens, prefills, merges/unmerges (+ seconds), finished, failed (the loop's own dict)."""
        return self.loop.counters

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
            reg = Registered(slim, (name, self._version))
            self.cache.add(reg.key, kind, slim, int(spec.size_bytes))
            self._adapters[name] = reg
        if old is not None:
            self.cache.discard(old.key)  # pinned by running rows: freed when they finish
            self.derived.drop_using(old.key)
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
        self.derived.drop_using(reg.key)
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

    def _lookup(self, name: str) -> Registered | None:
        with self._reg_lock:
            return self._adapters.get(name)

    def adapter_spec(self, name: str):
        reg = self._lookup(name)
        if reg is None:
            raise UnknownAdapterError(name)
        return reg.spec

    def _load_weights(self, source):
        """The cache's loader (a loader thread): an adapter's files, or a derived adapter's build."""
        from adapters import load_adapter

        if not isinstance(source, DerivedSource):
            return load_adapter(source.path, self.base_desc, self.limits, name=source.name)
        from adapters.combine import merge_loras

        parts = [load_adapter(p.path, self.base_desc, self.limits, name=p.name) for p in source.parts]
        return merge_loras(parts, list(source.weights), source.options, source.spec.name, seed=source.seed)

    def _combination(self, request: GenerationRequest):
        return resolve(request.merged_adapters, self._lookup, self.config.max_combined_adapters,
                       self.config.device_slots.get("lora", 0))

    @functools.cached_property
    def _grammars(self):
        """Structured output's compiler for this engine's tokenizer (llguidance's tokenizer built on first use)."""
        from serve.engine.grammar import GrammarCompiler

        return GrammarCompiler(self.tokenizer, self.parts.model.config.vocab_size, self.parts.eos_token_id)

    def _resolve_terms(self, seq: Sequence) -> tuple[Term, ...]:
        """The loop thread, at admission: the row's terms against the registrations now (newest versions)."""
        request = seq.request
        if request.merged_adapters is None:
            reg = self._lookup(request.adapter)
            if reg is None:
                raise UnknownAdapterError(request.adapter)
            seq.method = reg.method
            return (Term(reg.key, reg.kind),)
        regs, weights, options = self._combination(request)
        seq.resolved = described(regs, weights)
        seq.method = combination_label(regs, options.strategy)
        if options.strategy == "linear":
            return tuple(Term(r.key, r.kind, w) for r, w in zip(regs, weights, strict=True))
        return (Term(self.derived.get_or_add(regs, weights, options).key, "lora"),)

    # ---- requests ----------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Sequence:
        """Validate and tokenize (caller's thread). Raises RequestValidationError / UnknownAdapterError."""
        cfg = self.config
        validate_request(request)
        params = validate_params(request.params, cfg)
        specs = []
        if request.adapter is not None:
            specs = [self.adapter_spec(request.adapter)]
        elif request.merged_adapters is not None:  # validated once here, against the registrations
            regs, _, options = self._combination(request)
            specs = [r.spec for r in regs] if options.strategy == "linear" else []
        # soft prompt or prefix: both hold KV-cache tokens; only a prompt lengthens the encoder pass
        virtual = sum(s.num_virtual_tokens or 0 for s in specs)
        encoder_virtual = sum(s.num_virtual_tokens or 0 for s in specs if str(s.kind) == "prompt")
        ids = self.tokenizer(request.inputs).input_ids
        if len(ids) > cfg.max_input_tokens:
            raise RequestValidationError("inputs", f"{len(ids)} tokens; this server accepts at most "
                                                   f"{cfg.max_input_tokens} input tokens")
        rows = rows_of(params)  # beams or sampled candidates: each a row holding the same token budget
        cost = (len(ids) + virtual + params.max_new_tokens) * rows
        if cost > cfg.max_batch_tokens:
            raise RequestValidationError("params.max_new_tokens",
                                         f"input ({len(ids)} tokens) + max_new_tokens, x {rows} rows, exceeds the "
                                         f"batch token budget {cfg.max_batch_tokens}")
        seed = params.seed
        if seed is None and params.do_sample:
            seed = secrets.randbits(63)
        seq = Sequence(request=request, params=params, input_ids=ids, seed=seed,
                       deadline=time.perf_counter() + cfg.request_timeout_s, cost_tokens=cost,
                       prefill_tokens=len(ids) + encoder_virtual,
                       grammar=check_vocabulary(params, self.parts.model.config.vocab_size, self._grammars))
        return seq

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
            self.loop.enqueue(seq)
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in seqs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not done.acquire(timeout=left):
                for seq in seqs:
                    self.loop.cancel(seq)
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
        self.loop.enqueue(seq)
        try:
            return await fut
        except asyncio.CancelledError:
            self.loop.cancel(seq)
            raise

    async def stream(self, request: GenerationRequest):
        """Async iterator: a TokenEvent per generated token, then the GenerationResult.
        Closing the iterator early (client disconnect) frees the row."""
        seq = self.prepare(request)
        if (seq.params.best_of or 1) > seq.params.n:
            raise RequestValidationError("params.best_of", "best_of > n cannot stream: the best candidates are "
                                                           "known only when all have finished")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seq.on_event = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        seq.on_done = lambda res, exc: loop.call_soon_threadsafe(queue.put_nowait, (res, exc))
        self.loop.enqueue(seq)
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
                self.loop.cancel(seq)

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
            "base": self.base.name, "fingerprint": self.base.fingerprint,
            "dtype": "int8" if cfg.dtype == "int8" else str(self.parts.dtype),
            "devices": devices, "device_map": getattr(self, "device_map", None),
            "scheduling": cfg.scheduling, "ia3_merge": cfg.ia3_merge,
            "head_weight_major_rows": sorted(self.parts.head_weight_major),
            "optimizations": dict(self.optimizations),
            "warm_up_s": round(getattr(self, "warm_up_s", 0.0), 3),
            "limits": {"max_batch_rows": cfg.max_batch_rows, "max_batch_tokens": cfg.max_batch_tokens,
                       "max_input_tokens": cfg.max_input_tokens, "max_new_tokens": cfg.max_new_tokens_cap,
                       "max_stop_sequences": cfg.max_stop_sequences, "max_queue": cfg.max_queue,
                       "max_rank": cfg.max_rank, "max_virtual_tokens": cfg.max_virtual_tokens,
                       "max_prefix_tokens": cfg.max_prefix_tokens,
                       "request_timeout_s": cfg.request_timeout_s, "max_beams": cfg.max_beams, "max_n": cfg.max_n,
                       "max_top_n_tokens": cfg.max_top_n_tokens, "max_logit_bias": cfg.max_logit_bias,
                       "max_grammar_bytes": cfg.max_grammar_bytes},
            "adapters": {"registered": sum(kinds.values()), "by_kind": kinds},
            "cache": {"device_slots": dict(cfg.device_slots), "device_entries": stats.device_entries,
                      "device_bytes": stats.device_bytes, "host_entries": stats.host_entries,
                      "host_bytes": stats.host_bytes, "hits": stats.hits, "misses": stats.misses,
                      "evictions": stats.evictions},
            "kv_cache_bytes": self.kv.nbytes(),
            "kv_cache_prefix_row_bytes": self.kv.prefix_row_bytes(),  # one row's prefix region, all layers
            "queue": {"waiting": self.loop.queued, "running": len(self.loop.running)},
            "counters": dict(self.counters),
        }

    def stats(self) -> dict:
        """Counters for benchmarks: steps, tokens, merges/unmerges (+ seconds), cache stats."""
        s = self.cache.stats()
        return {**self.counters, "cache": s.__dict__}


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

    hub = slots.get("adapterhub", 0)

    def slot_bytes(linears, sublayers: int) -> int:
        per = sum((slots["lora"] + hub) * cfg.max_rank * (i + o) + (slots["ia3"] + hub) * max(i, o)
                  + slots["bitfit"] * o for i, o in linears)
        # adapterhub: a bottleneck adapter after each sublayer, and its prefixes (keys + values) per attention
        per += hub * sublayers * (2 * d * cfg.max_bottleneck + 8 * d)
        return per * nbytes

    virtual = cfg.max_virtual_tokens if slots.get("prompt", 0) else 0
    prefix = cfg.max_prefix_tokens if slots.get("prefix", 0) or hub else 0
    # per decoder block: self + cross + prefix KV rows (AdapterHub: cross prefixes too), and the prefix slots
    kv = 2 * cfg.max_batch_rows * inner * (cfg.max_new_tokens_cap + cfg.max_input_tokens + virtual
                                           + prefix * (2 if hub else 1)) * nbytes
    kv += 2 * (slots.get("prefix", 0) + 2 * hub + 1) * prefix * inner * nbytes
    return {"extra_encoder_block": slot_bytes(attention + ffn, 2) + 2 * hub * prefix * inner * nbytes,
            "extra_decoder_block": slot_bytes(attention * 2 + ffn, 3) + kv}


def _cuda_budgets() -> dict[str, int]:
    if not torch.cuda.is_available():
        raise ConfigError('device="auto" needs CUDA devices (none found); use device="cpu" or give device_memory')
    return {f"cuda:{i}": int(torch.cuda.get_device_properties(i).total_memory * 0.8)
            for i in range(torch.cuda.device_count())}
