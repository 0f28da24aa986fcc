"""RegistrySync: keeps one engine's registrations equal to the shared registry's active adapters.

Called before every request: one indexed read of the catalog generation; only when it moved is the
catalog snapshot diffed against what this engine holds (register new names, replace changed versions,
remove deleted ones). A lock with a second check makes concurrent callers sync once. With a remote store
each new object is fetched into this node's cache first (once per node; the live set stays pinned).

A catalog or store outage never fails a request: the engine keeps what it holds (degraded) and the
sync retries after `RETRY_S`, so requests do not each wait for a connect timeout.
"""

from __future__ import annotations

import logging
import threading
import time

from serve.registry import AdapterRegistry, BackendUnavailable

log = logging.getLogger("peftserve.app")
RETRY_S = 1.0


class RegistrySync:
    def __init__(self, registry: AdapterRegistry, engine):
        self.registry = registry
        self.engine = engine
        self.generation = -1
        self.held: dict[str, tuple[int, str]] = {}  # name -> (version, digest) registered in the engine
        self.degraded: str | None = None  # why the last sync failed, while it does
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def ensure_current(self) -> bool:
        """Sync if the catalog changed since the last call; returns whether anything was synced."""
        if self.degraded and time.monotonic() < self._retry_at:
            return False
        try:
            return self._sync()
        except BackendUnavailable as e:
            if self.degraded is None:
                log.warning("registry unavailable, serving the %d adapters held: %s", len(self.held), e)
            self.degraded, self._retry_at = str(e), time.monotonic() + RETRY_S
            return False

    def _sync(self) -> bool:
        if self.registry.generation() == self.generation:
            self.degraded = None
            return False
        with self._lock:
            snap = self.registry.snapshot()
            if snap.generation == self.generation:  # another caller synced while we waited
                return False
            live = {rec.digest for rec in snap.adapters.values()}
            for name in [n for n in self.held if n not in snap.adapters]:
                self._remove(name)
            for name, rec in snap.adapters.items():  # a store outage raises: the next request retries
                key = (rec.version, rec.digest)
                if self.held.get(name) != key:
                    self._register(name, rec, replace=name in self.held, key=key, live=live)
            self.generation = snap.generation
            self.degraded = None
            return True

    def _register(self, name: str, rec, replace: bool, key: tuple[int, str], live: set[str]) -> None:
        try:
            path = self.registry.fetch(rec, pinned=live)
        except BackendUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt object must not block every other adapter
            log.error("adapter %r (version %s) could not be fetched to this node: %s", name, key[0], e)
            return
        try:
            self.engine.register_adapter(name, path, replace=replace)
        except Exception as e:  # noqa: BLE001 - one bad entry must not block every other adapter
            # The registry validated it with the same limits; this means the replicas' configs differ.
            log.error("adapter %r (version %s) could not be registered in this replica: %s", name, key[0], e)
            if replace:
                self._remove(name)
            return
        self.held[name] = key

    def _remove(self, name: str) -> None:
        try:
            self.engine.remove_adapter(name)
        except Exception as e:  # noqa: BLE001
            log.warning("removing adapter %r: %s", name, e)
        self.held.pop(name, None)
