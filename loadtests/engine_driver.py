"""Drive peftserve's in-process engine for the benchmarks, through its public API only.

- `EnginePeer`: the engine as one more peer (`run(requests) -> RunResult`).
- `run_arrivals`: submit requests at given arrival times (Poisson) and time each one.
- `swap_latencies`: cold / warm / hot adapter swaps as the engine's own observer hooks report them.
- `first_token_after_register`: register a new adapter, time until its first token.
- `idle_registration_bytes`: memory of registered adapters that are never used.
- `engine_rounds`: a plan of cells timed in alternated rounds, each paired with its base cell (the rule the
  throughput, methods and combinations sections share).
- `close_engine`: stop an engine's background threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import statistics
import time
import tracemalloc
from pathlib import Path

from loadtests.measure import percentile, result_cell, rss_bytes
from loadtests.peers import RunResult, unique_tensor_bytes
from loadtests.presets import KINDS, Preset
from loadtests.workload import Request


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def open_engine(base_dir: Path, preset: Preset, observer=None, **overrides):
    from serve.engine import Engine
    from serve.engine.config import EngineConfig

    fields = dict(base=str(base_dir), device=preset.device, dtype=preset.dtype, max_rank=preset.lora_rank,
                  max_virtual_tokens=max(preset.prompt_tokens, 1),
                  max_new_tokens_cap=max(preset.new_tokens, preset.out_len[1], 8))
    fields.update(overrides)
    return Engine.from_config(EngineConfig(**fields), observer=observer)


def _gen_requests(requests: list[Request]):
    from serve.engine.requests import GenerationParams, GenerationRequest, MergedAdapters

    return [GenerationRequest(inputs=r.text, adapter=r.adapter, params=GenerationParams(max_new_tokens=r.max_new_tokens),
                              merged_adapters=None if r.merged is None else MergedAdapters(*r.merged))
            for r in requests]


class EnginePeer:
    name = "engine"

    def __init__(self, engine):
        self.engine = engine

    def register(self, adapters: dict[str, Path]) -> None:
        for name, path in adapters.items():
            self.engine.register_adapter(name, str(path))

    def run(self, requests: list[Request]) -> RunResult:
        t0 = time.perf_counter()
        results = self.engine.generate(_gen_requests(requests))
        dt = time.perf_counter() - t0
        latencies = [r.timings.get("total_s", dt) for r in results]
        return RunResult(sum(r.generated_tokens for r in results), dt, latencies, [r.token_ids for r in results])

    def memory_bytes(self) -> int:
        """Base weights, every adapter slot tensor (allocated up front), the KV cache and adapters
        cached in host memory."""
        engine = self.engine
        return (unique_tensor_bytes(engine.base.model) + engine.kv.nbytes()
                + engine.cache.stats().host_bytes)


async def _submit_at(engine, request, arrival: float, t0: float) -> tuple[float, object]:
    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    sent = time.perf_counter()
    result = await engine.submit(request)
    return time.perf_counter() - sent, result


async def _arrivals(engine, requests: list[Request], arrivals: list[float]):
    reqs = _gen_requests(requests)
    t0 = time.perf_counter()
    # return_exceptions: the loop must outlive every request, even when one fails
    done = await asyncio.gather(*(_submit_at(engine, r, a, t0) for r, a in zip(reqs, arrivals, strict=True)),
                                return_exceptions=True)
    errors = [d for d in done if isinstance(d, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(done)} requests failed; first: {errors[0]!r}")
    return done, time.perf_counter() - t0


def run_arrivals(engine, requests: list[Request], arrivals: list[float]) -> dict:
    """Open-loop load: request i is submitted at t0 + arrivals[i]; latency = its submit -> result."""
    done, makespan = asyncio.run(_arrivals(engine, requests, arrivals))
    latencies = [d for d, _ in done]
    tokens = sum(r.generated_tokens for _, r in done)
    ttft = [r.timings["ttft_s"] for _, r in done if "ttft_s" in r.timings]
    return {"requests": len(done), "tokens": tokens, "seconds": makespan, "tokens_per_s": tokens / makespan,
            "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99),
            "p50_ttft_s": percentile(ttft, 50), "latencies": latencies}


def swap_latencies(engine, recorder, adapters: dict[str, Path], probe_text: str) -> dict[str, list[float]]:
    """Swap latency by tier, from the engine's own hooks while it serves one-token requests.

    The engine must have fewer device slots for the adapters' kind than `adapters`, and host memory for
    all of them. Pass 1 touches every adapter once: each is cold (disk -> host -> device). Pass 2 touches
    them again in the same order: each was evicted from its device slot by the others but is still in
    host memory, so each is a warm swap (host -> device). Pass 3 repeats one resident adapter: hot.
    cold = disk_to_host + host_to_device of the same adapter (the engine's hooks); hot = first-token
    time of a resident adapter minus the base's median (what a resident slot costs over no adapter);
    cold_first_token_overhead = the same end to end for a cold adapter (queueing and polling included).
    """
    names = list(adapters)
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))

    def one(name: str | None) -> float:
        t0 = time.perf_counter()
        engine.generate(_gen_requests([Request(probe_text, name, 1)]))
        return time.perf_counter() - t0

    d2h, h2d = recorder.values["on_swap:disk_to_host"], recorder.values["on_swap:host_to_device"]
    repeats = max(3, len(names) // 2)
    base = sorted(one(None) for _ in range(repeats))
    base_med = base[len(base) // 2]
    cold, cold_e2e = [], []
    for name in names:
        n1, n2 = len(d2h), len(h2d)
        dt = one(name)
        if len(d2h) > n1 and len(h2d) > n2:
            cold.append(d2h[-1] + h2d[-1])
            cold_e2e.append(max(0.0, dt - base_med))
    warm = []
    for name in names:
        n1, n2 = len(d2h), len(h2d)
        one(name)
        if len(h2d) > n2 and len(d2h) == n1:  # host hit: only the host -> device copy ran
            warm.append(h2d[-1])
    one(names[-1])
    hot = [max(0.0, one(names[-1]) - base_med) for _ in range(repeats)]
    return {"cold": cold, "warm": warm, "hot": hot, "cold_first_token_overhead": cold_e2e}


def first_token_after_register(engine, path: Path, samples: int, probe_text: str, prefix: str) -> dict:
    """register -> first token of a never-seen adapter (registration, cold load, encoder, one step),
    next to the same request on the base (what the adapter adds)."""
    def first_token(adapter: str | None) -> float:
        return engine.generate(_gen_requests([Request(probe_text, adapter, 1)]))[0]

    with_adapter, base = [], []
    for i in range(samples):
        name = f"{prefix}-{i}"
        t0 = time.perf_counter()
        engine.register_adapter(name, str(path))
        first_token(name)
        with_adapter.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        first_token(None)
        base.append(time.perf_counter() - t0)
        engine.remove_adapter(name)
    return {"register_to_first_token": with_adapter, "base_first_token": base}


def idle_registration_bytes(engine, adapter_dir: Path, count: int, traced: int | None = None,
                            prefix: str = "idle") -> dict:
    """Register `count` names for one adapter directory and never use them.

    `rss_bytes_each`: resident-memory growth over all `count` registrations / count (what the target is
    about: allocator pages included). `bytes_each`: Python heap bytes retained per registration, from
    tracemalloc over the first `traced` ones only (tracing makes registration ~10x slower)."""
    traced = min(300, count // 4) if traced is None else min(traced, count)
    gc.collect()
    rss0 = rss_bytes()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    for i in range(traced):
        engine.register_adapter(f"{prefix}-{i:06d}", str(adapter_dir))
    gc.collect()
    heap_each = (tracemalloc.get_traced_memory()[0] - before) / max(1, traced)
    tracemalloc.stop()
    t1 = time.perf_counter()
    for i in range(traced, count):
        engine.register_adapter(f"{prefix}-{i:06d}", str(adapter_dir))
    untraced_s = time.perf_counter() - t1
    gc.collect()
    rss = rss_bytes() - rss0
    return {"count": count, "bytes_each": heap_each, "rss_bytes_each": max(0, rss) / count,
            "register_ms_each": 1000 * untraced_s / max(1, count - traced), "traced": traced,
            "total_s": time.perf_counter() - t0}


def close_engine(engine) -> None:
    close = getattr(engine, "close", None) or getattr(engine, "shutdown", None)
    if close:
        close()


def engine_rounds(peer, plan: list, preset: Preset) -> list[dict]:
    """Run every cell once per round, `repeats` rounds, after a one-token warm-up round that makes
    every adapter resident. Other processes (and, on a VM, steal time) only ever slow a run down, so a
    cell's throughput is its best round (timeit's rule) and its ratio to the base is best / best. The
    per-round ratios (same rows, same round) and their median are kept next to it.

    `plan`: (kind, N, rows, requests) per cell, with a "base" cell for every row count."""
    for _, _, _, reqs in plan:
        peer.run([dataclasses.replace(r, max_new_tokens=1) for r in reqs])
    runs: list[list] = [[] for _ in plan]
    for round_ in range(preset.repeats):
        for i, (_, _, _, reqs) in enumerate(plan):
            runs[i].append(peer.run(reqs))
        log(f"engine round {round_ + 1}/{preset.repeats} done")
    base_runs = {rows: runs[i] for i, (kind, _, rows, _) in enumerate(plan) if kind == "base"}
    mem = peer.memory_bytes()
    cells = []
    for i, (kind, n, rows, _) in enumerate(plan):
        rates = [r.tokens / r.seconds for r in runs[i]]
        ratios = [rate / (b.tokens / b.seconds) for rate, b in zip(rates, base_runs[rows], strict=True)]
        lat = [x for r in runs[i] for x in r.latencies]
        best_base = max(b.tokens / b.seconds for b in base_runs[rows])
        stats = {"tokens_per_s": max(rates), "tokens_per_s_runs": rates,
                 "tokens_per_run": runs[i][0].tokens, "p50_latency_s": percentile(lat, 50),
                 "p99_latency_s": percentile(lat, 99), "ratio_to_base": max(rates) / best_base,
                 "ratio_runs": ratios, "ratio_median_paired": statistics.median(ratios)}
        ns = [n] if kind != "base" else [m for m in preset.distinct if max(preset.batch_rows, m) == rows]
        for m in ns:
            cells.append(result_cell("engine", kind, m, rows, stats, mem))
        log(f"engine {kind} N={n} rows={rows}: {stats['tokens_per_s']:.1f} tok/s, "
            f"{stats['ratio_to_base']:.2f}x base")
    return cells


def slots_for(distinct: int) -> dict[str, int]:
    return {k: distinct for k in KINDS}
