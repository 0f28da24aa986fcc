"""Instrumentation hooks the engine calls; the default does nothing.

serve/app/metrics.py implements `EngineObserver` with prometheus-client. Method names and arguments are a
contract: add new hooks, never rename. Every hook is called from the engine's loop thread or its
adapter-loader thread, must be cheap and must not raise (exceptions are swallowed and logged once).

Label guidance: request hooks get the PEFT method as `kind` (adapters.kinds.METHODS or "base"), cache and
swap hooks the slot kind ("lora", "ia3", "bitfit", "prompt", "prefix", "adapterhub"); both are low-cardinality; `adapter` may take
thousands of values (use it for logs/exemplars, not as a metric label unless bounded).
Tiers: "disk" (registered, not loaded), "host" (CPU memory), "device" (slot tensors).
Swap tiers: "disk_to_host" (read + validate safetensors), "host_to_device" (copy into a slot).
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque


class EngineObserver:
    """No-op base: override what you export."""

    # --- requests -------------------------------------------------------------------------------
    def on_request_queued(self, adapter: str | None, queue_depth: int) -> None:
        """A request entered the waiting queue; `queue_depth` counts waiting requests including it."""

    def on_request_admitted(self, adapter: str | None, kind: str, queue_wait_s: float) -> None:
        """A request joined the running batch after waiting `queue_wait_s` (submit -> encoder pass)."""

    def on_first_token(self, adapter: str | None, kind: str, ttft_s: float) -> None:
        """Time to first token, from submit (queue wait included)."""

    def on_request_finished(self, adapter: str | None, kind: str, finish_reason: str, prompt_tokens: int,
                            generated_tokens: int, duration_s: float) -> None:
        """A request completed normally (finish_reason in length/eos/stop)."""

    def on_request_failed(self, adapter: str | None, error: str) -> None:
        """A request ended without a result; `error` is the exception class name or "cancelled"."""

    # --- batches ---------------------------------------------------------------------------------
    def on_step(self, batch_rows: int, distinct_adapters: int, tokens: int, step_s: float) -> None:
        """One decoder step: `batch_rows` rows each produced one token (`tokens` == batch_rows) in `step_s`.

        Per-token latency is `step_s`; tokens/s is tokens / step_s (or summed over a window).
        `distinct_adapters` counts distinct adapters in the batch, base rows counted as one.
        """

    def on_prefill(self, rows: int, tokens: int, seconds: float) -> None:
        """Encoder pass (plus cross-attention K/V) for `rows` joining requests with `tokens` input tokens."""

    def on_queue_depth(self, waiting: int, running: int) -> None:
        """Sampled once per loop iteration."""

    # --- adapter cache ---------------------------------------------------------------------------
    def on_cache_hit(self, tier: str, kind: str) -> None:
        """An adapter needed by a request was already in `tier` ("device" or "host")."""

    def on_cache_miss(self, tier: str, kind: str) -> None:
        """An adapter needed by a request was not in `tier`."""

    def on_cache_eviction(self, tier: str, kind: str) -> None:
        """An unpinned adapter was evicted from `tier` to make room (LRU)."""

    def on_swap(self, tier: str, kind: str, seconds: float, nbytes: int) -> None:
        """An adapter moved one tier up: tier is "disk_to_host" or "host_to_device"."""

    def on_cache_bytes(self, tier: str, nbytes: int, entries: int) -> None:
        """Bytes and entries now held in `tier` ("disk" counts registered metadata entries, bytes on disk)."""

    def on_device_memory(self, device: str, allocated_bytes: int, reserved_bytes: int) -> None:
        """Accelerator memory, sampled every few seconds (only for CUDA devices)."""

    # --- (IA)3 merge policy ----------------------------------------------------------------------
    def on_merge(self, kind: str, seconds: float) -> None:
        """An adapter was merged into the base weights (the batch uses only it)."""

    def on_unmerge(self, kind: str, seconds: float) -> None:
        """The merged adapter was removed exactly from the base weights (the batch mixes again)."""


class RecordingObserver(EngineObserver):
    """Keeps the last `maxlen` values of every hook in memory: for tests and benchmarks.

    `values["on_swap:host_to_device"]` -> deque of seconds; `counts["on_cache_hit:device"]` -> int.
    """

    def __init__(self, maxlen: int = 100_000):
        self._lock = threading.Lock()
        self.values: dict[str, deque] = defaultdict(lambda: deque(maxlen=maxlen))
        self.counts: dict[str, int] = defaultdict(int)
        self.last: dict[str, tuple] = {}

    def _record(self, key: str, value=None) -> None:
        with self._lock:
            self.counts[key] += 1
            if value is not None:
                self.values[key].append(value)

    def on_request_admitted(self, adapter, kind, queue_wait_s):
        self._record("on_request_admitted", queue_wait_s)

    def on_first_token(self, adapter, kind, ttft_s):
        self._record("on_first_token", ttft_s)

    def on_request_finished(self, adapter, kind, finish_reason, prompt_tokens, generated_tokens, duration_s):
        self._record(f"on_request_finished:{finish_reason}", duration_s)

    def on_request_failed(self, adapter, error):
        self._record(f"on_request_failed:{error}")

    def on_step(self, batch_rows, distinct_adapters, tokens, step_s):
        self._record("on_step", step_s)
        self._record("on_step:batch_rows", batch_rows)
        self._record("on_step:distinct_adapters", distinct_adapters)

    def on_prefill(self, rows, tokens, seconds):
        self._record("on_prefill", seconds)

    def on_cache_hit(self, tier, kind):
        self._record(f"on_cache_hit:{tier}")

    def on_cache_miss(self, tier, kind):
        self._record(f"on_cache_miss:{tier}")

    def on_cache_eviction(self, tier, kind):
        self._record(f"on_cache_eviction:{tier}")

    def on_swap(self, tier, kind, seconds, nbytes):
        self._record(f"on_swap:{tier}", seconds)

    def on_cache_bytes(self, tier, nbytes, entries):
        with self._lock:
            self.last[f"on_cache_bytes:{tier}"] = (nbytes, entries)

    def on_merge(self, kind, seconds):
        self._record("on_merge", seconds)

    def on_unmerge(self, kind, seconds):
        self._record("on_unmerge", seconds)


def safe_call(observer: EngineObserver, hook: str, *args) -> None:
    """Call a hook; a failing observer must never break serving."""
    try:
        getattr(observer, hook)(*args)
    except Exception as e:  # noqa: BLE001 - metrics are best effort
        if not getattr(observer, "_peftserve_warned", False):
            import logging

            logging.getLogger("peftserve.engine").warning("observer hook %s failed: %r", hook, e)
            try:
                observer._peftserve_warned = True  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass
