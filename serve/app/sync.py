"""RegistrySync: keeps one engine's registrations in step with the shared registry, by deltas.

- Start: read the catalog's generation G and hold nothing, whatever the catalog's size. An adapter enters
  the engine when a request first needs it (`ensure_current`: one indexed get, a node-cache fetch).
- Changes: `registry.changes(G)` returns what changed after G (one indexed read; its cost grows with the
  changes, not with the catalog). Adapters this engine holds follow them (a new version replaces the old,
  a deleted one is removed); new names are prefetched (fetched and registered) when a delta brings at most
  `prefetch_max` of them, so a fresh registration is servable on every replica before its first request
  (a bulk import stays lazy).
- When: a thread per replica waits on the catalog's feed (PostgreSQL LISTEN/NOTIFY) and applies each change
  as it commits. It re-checks the generation every `check_interval_s` (a notification lost on a broken
  connection) and after every reconnect: one primary-key read, then the delta. Without a feed (SQLite) the
  thread checks the generation every `poll_s`.
- Requests name what they need, with the version the ingress resolved for them: `ensure_current({name:
  version})` costs nothing when this engine holds that version or a newer one (`satisfied`), so the request
  path reads the catalog only for an adapter this replica has not served yet.

Outages: an unreachable catalog or store never fails a request for an adapter this engine holds (it keeps
serving the version it has); one it does not hold gets 503 naming the backend. The thread retries with
backoff; `degraded` says why while it does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping

from serve.registry import AdapterNotFound, AdapterRegistry, BackendUnavailable, Delta

log = logging.getLogger("peftserve.app")
PREFETCH_MAX = 64  # new names in one delta registered eagerly; more (a bulk import) load on first use
CHECK_INTERVAL_S = 5.0  # generation re-check while listening (a missed notification)
POLL_S = 0.5  # generation check without a feed (SQLite)
RECENT = 32  # last applied changes kept for /info (name, version, lag, cost)


class RegistrySync:
    def __init__(self, registry: AdapterRegistry, engine, metrics=None, prefetch_max: int = PREFETCH_MAX,
                 check_interval_s: float = CHECK_INTERVAL_S, poll_s: float = POLL_S):
        self.registry = registry
        self.engine = engine
        self.metrics = metrics
        self.prefetch_max, self.check_interval_s, self.poll_s = prefetch_max, check_interval_s, poll_s
        self.generation = -1  # the catalog generation every held adapter is current for
        self.held: dict[str, tuple[int, str]] = {}  # name -> (version, digest) registered in the engine
        self.degraded: str | None = None  # why the last catalog/store access failed, while it does
        self.mode = "request"  # how changes arrive: "notify" (LISTEN), "poll" (no feed), "request" (no thread)
        self.recent: deque[dict] = deque(maxlen=RECENT)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.generation = registry.generation()
        except BackendUnavailable as e:  # a degraded start: the first successful read sets the baseline
            self._degrade(e)

    # ---- the request path ------------------------------------------------------------------------
    def satisfied(self, wanted: Mapping[str, int | None]) -> bool:
        """Whether every wanted adapter is held at that version or newer (no I/O; `None`: any version)."""
        for name, version in wanted.items():
            have = self.held.get(name)
            if have is None or (version is not None and have[0] < version):
                return False
        return self._thread is not None  # without the thread, each request is where changes are read

    def ensure_current(self, wanted: Mapping[str, int | None] | Iterable[str] = ()) -> None:
        """Make the wanted adapters servable: catch up with the catalog, then register what is still missing.

        Raises BackendUnavailable only for an adapter this engine cannot serve at all; an unknown name is
        left to the engine (UnknownAdapterError, 404)."""
        wanted = dict(wanted) if isinstance(wanted, Mapping) else dict.fromkeys(wanted)
        try:
            self._catch_up(check=True)
        except BackendUnavailable as e:
            self._degrade(e)
        for name, version in wanted.items():
            have = self.held.get(name)
            if have is not None and (version is None or have[0] >= version):
                continue
            try:
                self._materialize(name)
            except BackendUnavailable as e:
                self._degrade(e)
                if have is None:
                    raise
                log.warning("adapter %r: serving version %d, the newer one is unreachable: %s", name, have[0], e)

    # ---- the change feed -------------------------------------------------------------------------
    def start(self) -> None:
        """Follow the catalog from a background thread (LISTEN where the catalog has a feed, else polling)."""
        self._thread = threading.Thread(target=self._follow, name="peftserve-registry-sync", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _follow(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            feed = None
            try:
                feed = self.registry.feed()
                self.mode = "notify" if feed is not None else "poll"
                self._catch_up(check=True)  # after (re)connecting: a change may have been missed
                backoff, checked = 0.5, time.monotonic()
                while not self._stop.is_set():
                    if feed is None:
                        self._stop.wait(self.poll_s)
                        self._catch_up(check=True)
                        continue
                    announced = feed.wait(min(1.0, self.check_interval_s))
                    if announced is not None and announced > self.generation:
                        self._catch_up(check=False)
                    elif time.monotonic() - checked >= self.check_interval_s:
                        self._catch_up(check=True)
                        checked = time.monotonic()
            except BackendUnavailable as e:
                self._degrade(e)
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad change
                log.exception("registry sync failed; retrying")
            finally:
                self.mode = "request"
                if feed is not None:
                    feed.close()
            self._stop.wait(backoff)
            backoff = min(2 * backoff, 5.0)

    # ---- applying changes ------------------------------------------------------------------------
    def _catch_up(self, check: bool) -> None:
        """Apply what changed since `generation`; with `check`, only after a generation read says it moved."""
        if check and self.generation >= 0 and self.registry.generation() == self.generation:
            self.degraded = None
            return
        with self._lock:
            if self.generation < 0:  # the baseline of a degraded start
                self.generation = self.registry.generation()
            else:
                self._apply(self.registry.changes(self.generation))
            self.degraded = None

    def _apply(self, delta: Delta) -> None:
        if delta.generation == self.generation:  # another caller applied it while we waited
            return
        for name in delta.removed:
            if name in self.held:
                self._remove(name)
        prefetch = sum(name not in self.held for name in delta.upserts) <= self.prefetch_max
        for name, rec in delta.upserts.items():
            have = self.held.get(name)
            if have == (rec.version, rec.digest) or (have is None and not prefetch):
                continue
            try:
                self._register(rec, replace=have is not None)
            except BackendUnavailable as e:  # the store is down: held versions keep serving, and a request
                self._degrade(e)            # for a newer one registers it when the store is back
        self.generation = delta.generation

    def _materialize(self, name: str) -> None:
        with self._lock:
            try:
                rec = self.registry.get(name)
            except AdapterNotFound:
                return
            have = self.held.get(name)
            if have is None or have[0] < rec.version:
                self._register(rec, replace=have is not None)

    def _register(self, rec, replace: bool) -> None:
        t0 = time.perf_counter()
        pinned = {digest for _, digest in self.held.values()} | {rec.digest}
        try:
            path = self.registry.fetch(rec, pinned=pinned)
        except BackendUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt object must not block every other adapter
            log.error("adapter %r (version %s) could not be fetched to this node: %s", rec.name, rec.version, e)
            return
        try:
            self.engine.register_adapter(rec.name, path, replace=replace)
        except Exception as e:  # noqa: BLE001 - one bad entry must not block every other adapter
            # The registry validated it with the same limits; this means the replicas' configs differ.
            log.error("adapter %r (version %s) could not be registered in this replica: %s", rec.name, rec.version, e)
            if replace:
                self._remove(rec.name)
            return
        self.held[rec.name] = (rec.version, rec.digest)
        applied_s, lag_s = time.perf_counter() - t0, max(0.0, time.time() - rec.created_at)
        self.recent.append({"name": rec.name, "version": rec.version, "lag_s": lag_s, "apply_s": applied_s,
                            "at": time.time()})
        if self.metrics is not None:
            self.metrics.observe_sync(lag_s, applied_s)

    def _remove(self, name: str) -> None:
        try:
            self.engine.remove_adapter(name)
        except Exception as e:  # noqa: BLE001
            log.warning("removing adapter %r: %s", name, e)
        self.held.pop(name, None)

    def _degrade(self, e: BackendUnavailable) -> None:
        if self.degraded is None:
            log.warning("registry unavailable, serving the %d adapters held: %s", len(self.held), e)
        self.degraded = str(e)

    def report(self) -> dict:
        return {"mode": self.mode, "generation": self.generation, "held": len(self.held),
                "degraded": self.degraded, "recent": list(self.recent)}
