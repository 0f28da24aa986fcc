"""RegistrySync: keeps one engine's registrations equal to the shared registry's active adapters.

Called before every request: one indexed SQLite read of the catalog generation; only when it moved is
the catalog snapshot diffed against what this engine holds (register new names, replace changed
versions, remove deleted ones). A lock with a second check makes concurrent callers sync once.
"""

from __future__ import annotations

import logging
import threading

from serve.registry import AdapterRegistry

log = logging.getLogger("peftserve.app")


class RegistrySync:
    def __init__(self, registry: AdapterRegistry, engine):
        self.registry = registry
        self.engine = engine
        self.generation = -1
        self.held: dict[str, tuple[int, str]] = {}  # name -> (version, digest) registered in the engine
        self._lock = threading.Lock()

    def ensure_current(self) -> bool:
        """Sync if the catalog changed since the last call; returns whether anything was synced."""
        if self.registry.generation() == self.generation:
            return False
        with self._lock:
            snap = self.registry.snapshot()
            if snap.generation == self.generation:  # another caller synced while we waited
                return False
            for name in [n for n in self.held if n not in snap.adapters]:
                self._remove(name)
            for name, rec in snap.adapters.items():
                key = (rec.version, rec.digest)
                if self.held.get(name) != key:
                    self._register(name, rec.path, replace=name in self.held, key=key)
            self.generation = snap.generation
            return True

    def _register(self, name: str, path: str, replace: bool, key: tuple[int, str]) -> None:
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
