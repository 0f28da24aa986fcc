"""Tiered adapter cache: disk (everything registered) -> host memory (bytes bound) -> device slots.

Generic over how weights are loaded and written (`load`, `write` callables), so it is tested with fake
weights and used by the engine with adapters/ (load_adapter, AdapterSlots.write).

- Disk tier: metadata only (`add`); thousands of entries cost a few hundred bytes each.
- Host tier: LRU bounded by bytes; filled by background loader threads (disk -> host overlaps serving).
- Device tier: per-kind slots (count bound) and an optional bytes bound; LRU among unpinned entries.
  Running rows pin their adapter (refcount); a pinned adapter is never evicted.
All state sits behind one lock; loads run outside it and re-check ("second check") when they land.
Keys are opaque hashables (the engine uses (name, version) so a replaced adapter is a new key).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from serve.engine.observer import EngineObserver, safe_call
from serve.engine.threads import OneShotThreads

READY, LOADING, BLOCKED, FAILED = "ready", "loading", "blocked", "failed"


@dataclass
class _Entry:
    kind: str
    source: object  # whatever `load` needs (the engine passes the AdapterSpec)
    disk_bytes: int
    removed: bool = False
    error: BaseException | None = None
    loading: bool = False
    # device tier
    slot: int | None = None
    device_bytes: int = 0
    pins: int = 0


@dataclass
class Prepared:
    """Outcome of `AdapterCache.prepare`: state READY (with slot), LOADING, BLOCKED or FAILED (with error)."""

    state: str
    slot: int | None = None
    error: BaseException | None = None


@dataclass
class CacheStats:
    registered: int = 0
    disk_bytes: int = 0
    host_entries: int = 0
    host_bytes: int = 0
    device_entries: int = 0
    device_bytes: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0})
    evictions: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0})
    loads: int = 0
    load_failures: int = 0
    pinned: int = 0


class AdapterCache:
    def __init__(self, *, load: Callable[[object], object], write: Callable[[str, int, object], None],
                 slots: dict[str, int], host_bytes: int,
                 device_bytes: int | None = None, loader_threads: int = 2,
                 observer: EngineObserver | None = None, on_loaded: Callable[[], None] | None = None):
        """`load(source) -> weights` (with `.nbytes`) runs on loader threads; `write(kind, slot, weights)`
        runs on the caller of `prepare` (the engine loop: the only thread that touches slot tensors).
        A freed slot is not cleared: no row references it, and the next write overwrites all of it."""
        self._load, self._write = load, write
        self._host_limit, self._device_limit = host_bytes, device_bytes
        self._observer = observer or EngineObserver()
        self._on_loaded = on_loaded or (lambda: None)
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry] = {}
        self._host: OrderedDict[Hashable, object] = OrderedDict()  # LRU: oldest first
        self._host_bytes = 0
        self._staged: set[Hashable] = set()  # loaded for a waiting request, not yet on device: not evictable
        self._free: dict[str, list[int]] = {k: list(range(n - 1, -1, -1)) for k, n in slots.items()}
        self._resident: OrderedDict[Hashable, None] = OrderedDict()  # device LRU: oldest first
        self._device_bytes = 0
        # each load on a thread of its own that exits afterwards (serve/engine/threads.py: why)
        self._pool = OneShotThreads(loader_threads, "peftserve-load")
        self.stats_ = CacheStats()

    # ---- disk tier -----------------------------------------------------------------------------------
    def add(self, key: Hashable, kind: str, source: object, disk_bytes: int) -> None:
        with self._lock:
            if key in self._entries and not self._entries[key].removed:
                raise KeyError(f"{key!r} is already in the cache")
            if kind not in self._free:
                raise ValueError(f"no device slots configured for kind {kind!r}")
            self._entries[key] = _Entry(kind=kind, source=source, disk_bytes=disk_bytes)
            self.stats_.registered += 1
            self.stats_.disk_bytes += disk_bytes
        self._report_bytes()

    def discard(self, key: Hashable) -> None:
        """Forget `key`: host copy dropped now, device slot freed now or when its last pin is released."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.removed:
                return
            e.removed = True
            self.stats_.registered -= 1
            self.stats_.disk_bytes -= e.disk_bytes
            self._drop_host(key)
            self._detach_if_unpinned(key, e)
            if not e.loading and e.slot is None:
                del self._entries[key]
        self._report_bytes()

    def prefetch(self, key: Hashable) -> bool:
        """Start loading `key` into host memory if it is in no tier yet (e.g. right after registration).
        Prefetched entries are ordinary LRU members of the host tier. Returns whether a load started."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.removed or e.loading or e.slot is not None or key in self._host or e.error:
                return False
            e.loading = True
            self._pool.submit(self._load_into_host, key, e, False)
            return True

    def contains(self, key: Hashable) -> bool:
        with self._lock:
            e = self._entries.get(key)
            return e is not None and not e.removed

    # ---- host/device tiers, used by the engine loop ---------------------------------------------------
    def prepare(self, key: Hashable, count: bool = False) -> Prepared:
        """Make `key` servable if possible without waiting: READY (resident in a device slot),
        LOADING (disk -> host in the background; `on_loaded` fires when done), BLOCKED (every slot of
        its kind, or the device byte budget, is held by pinned adapters) or FAILED.
        `count=True` records hit/miss metrics (once per request)."""
        obs = self._observer
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.removed:
                return Prepared(FAILED, error=KeyError(key))
            if e.error is not None:
                return Prepared(FAILED, error=e.error)
            if e.slot is not None:
                self._resident.move_to_end(key)
                if count:
                    self.stats_.hits["device"] += 1
                    safe_call(obs, "on_cache_hit", "device", e.kind)
                return Prepared(READY, slot=e.slot)
            weights = self._host.get(key)
            if count:
                self.stats_.misses["device"] += 1
                safe_call(obs, "on_cache_miss", "device", e.kind)
                tier_hit = weights is not None
                (self.stats_.hits if tier_hit else self.stats_.misses)["host"] += 1
                safe_call(obs, "on_cache_hit" if tier_hit else "on_cache_miss", "host", e.kind)
            if weights is None:
                if not e.loading:
                    e.loading = True
                    self._pool.submit(self._load_into_host, key, e, True)
                return Prepared(LOADING)
            self._host.move_to_end(key)
            nbytes = int(getattr(weights, "nbytes", 0))
            if self._device_limit is not None and nbytes > self._device_limit:
                e.error = ValueError(f"the adapter needs {nbytes} bytes on the device, more than the whole "
                                     f"device_bytes budget ({self._device_limit}); raise device_bytes")
                self._drop_host(key)
                return Prepared(FAILED, error=e.error)
            plan = self._plan_slot(e.kind, nbytes)
            if plan is None:
                return Prepared(BLOCKED)
            slot, victims = plan
            for vkey in victims:
                self._evict_device(vkey)
            self._free[e.kind].remove(slot)
            e.slot, e.device_bytes = slot, nbytes
            self._staged.discard(key)
            self._enforce_host_bound()
            self._resident[key] = None
            self._device_bytes += nbytes
        t0 = time.perf_counter()
        try:
            self._write(e.kind, slot, weights)
        except BaseException as err:  # a failed copy must not leave a half-written slot marked resident
            with self._lock:
                self._resident.pop(key, None)
                self._device_bytes -= nbytes
                e.slot, e.error = None, err
                self._free[e.kind].append(slot)
            return Prepared(FAILED, error=err)
        safe_call(obs, "on_swap", "host_to_device", e.kind, time.perf_counter() - t0, nbytes)
        self._report_bytes()
        return Prepared(READY, slot=slot)

    def pin(self, key: Hashable) -> int:
        """A row starts using `key` (must be READY). Returns its slot."""
        with self._lock:
            e = self._entries[key]
            if e.slot is None:
                raise RuntimeError(f"{key!r} is not resident; call prepare() first")
            e.pins += 1
            self.stats_.pinned += 1
            return e.slot

    def release(self, key: Hashable) -> None:
        """A row stopped using `key`. A discarded adapter's slot is freed with its last pin."""
        with self._lock:
            e = self._entries[key]
            e.pins -= 1
            self.stats_.pinned -= 1
            freed = e.removed and self._detach_if_unpinned(key, e)
            if e.removed and e.slot is None and not e.loading:
                self._entries.pop(key, None)
        if freed:
            self._report_bytes()

    def slot_of(self, key: Hashable) -> int | None:
        with self._lock:
            e = self._entries.get(key)
            return None if e is None else e.slot

    def resident(self, kind: str | None = None) -> list[Hashable]:
        """Device-resident keys, least recently used first."""
        with self._lock:
            return [k for k in self._resident if kind is None or self._entries[k].kind == kind]

    def host_keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._host)

    def stats(self) -> CacheStats:
        with self._lock:
            s = self.stats_
            return CacheStats(registered=s.registered, disk_bytes=s.disk_bytes, host_entries=len(self._host),
                              host_bytes=self._host_bytes, device_entries=len(self._resident),
                              device_bytes=self._device_bytes, hits=dict(s.hits), misses=dict(s.misses),
                              evictions=dict(s.evictions), loads=s.loads, load_failures=s.load_failures,
                              pinned=s.pinned)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- internals (lock held unless noted) -----------------------------------------------------------
    def _load_into_host(self, key: Hashable, e: _Entry, for_request: bool) -> None:
        """Loader thread: disk -> host, outside the lock; the result lands only if still wanted."""
        t0 = time.perf_counter()
        try:
            weights, err = self._load(e.source), None
        except BaseException as exc:  # noqa: BLE001 - stored and reported to the request
            weights, err = None, exc
        seconds = time.perf_counter() - t0
        with self._lock:
            e.loading = False
            if e.removed:  # second check: discarded while loading
                if e.slot is None:
                    self._entries.pop(key, None)
            elif err is not None:
                e.error = err
                self.stats_.load_failures += 1
            else:
                self.stats_.loads += 1
                self._host[key] = weights
                self._host_bytes += int(getattr(weights, "nbytes", 0))
                if for_request:
                    self._staged.add(key)
                self._enforce_host_bound()
        if err is None and not e.removed:
            safe_call(self._observer, "on_swap", "disk_to_host", e.kind, seconds, int(getattr(weights, "nbytes", 0)))
        self._report_bytes()
        self._on_loaded()

    def _enforce_host_bound(self) -> None:
        # Staged entries (loaded for a request, not yet copied to a slot) stay even above the bound:
        # evicting them would only make their requests load them again.
        for key in list(self._host):
            if self._host_bytes <= self._host_limit:
                break
            if key in self._staged:
                continue
            self._drop_host(key)
            self.stats_.evictions["host"] += 1
            safe_call(self._observer, "on_cache_eviction", "host", self._entries[key].kind
                      if key in self._entries else "unknown")

    def _drop_host(self, key: Hashable) -> None:
        self._staged.discard(key)
        w = self._host.pop(key, None)
        if w is not None:
            self._host_bytes -= int(getattr(w, "nbytes", 0))

    def _plan_slot(self, kind: str, nbytes: int) -> tuple[int, list[Hashable]] | None:
        """A slot for `kind` plus the unpinned LRU victims to evict for it (nothing changed yet)."""
        victims: list[Hashable] = []
        unpinned = [k for k in self._resident if self._entries[k].pins == 0]
        free = self._free[kind]
        if free:
            slot = free[-1]
        else:
            same = [k for k in unpinned if self._entries[k].kind == kind]
            if not same:
                return None
            victims.append(same[0])
            slot = self._entries[same[0]].slot
        if self._device_limit is not None:
            used = self._device_bytes - sum(self._entries[v].device_bytes for v in victims)
            for k in unpinned:
                if used + nbytes <= self._device_limit:
                    break
                if k not in victims:
                    victims.append(k)
                    used -= self._entries[k].device_bytes
            if used + nbytes > self._device_limit:
                return None
        return slot, victims

    def _evict_device(self, key: Hashable) -> None:
        e = self._entries[key]
        kind, slot = e.kind, e.slot
        self._resident.pop(key, None)
        self._device_bytes -= e.device_bytes
        e.slot, e.device_bytes = None, 0
        self.stats_.evictions["device"] += 1
        safe_call(self._observer, "on_cache_eviction", "device", kind)
        # The slot is reused by the caller (same kind) or returned to its free list (other kinds).
        self._free[kind].append(slot)
        if e.removed and not e.loading:
            self._entries.pop(key, None)

    def _detach_if_unpinned(self, key: Hashable, e: _Entry) -> bool:
        if e.slot is None or e.pins > 0:
            return False
        self._resident.pop(key, None)
        self._device_bytes -= e.device_bytes
        self._free[e.kind].append(e.slot)
        e.slot, e.device_bytes = None, 0
        return True

    def _report_bytes(self) -> None:
        s = self.stats()
        safe_call(self._observer, "on_cache_bytes", "disk", s.disk_bytes, s.registered)
        safe_call(self._observer, "on_cache_bytes", "host", s.host_bytes, s.host_entries)
        safe_call(self._observer, "on_cache_bytes", "device", s.device_bytes, s.device_entries)
