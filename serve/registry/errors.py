"""Typed registry errors; `status` is the HTTP status the app maps each to."""

from __future__ import annotations

import errno


class RegistryError(Exception):
    """Base of the registry's typed errors; the message says what to fix."""

    status = 400


class InvalidAdapterName(RegistryError):
    status = 400


class AdapterExists(RegistryError):
    status = 409

    @classmethod
    def for_version(cls, name: str, version: int) -> AdapterExists:
        return cls(f"adapter {name!r} already exists (version {version}); pass replace=true to register a new "
                   "version")


class AdapterNotFound(RegistryError):
    status = 404


class AdapterRejected(RegistryError):
    """The adapter's files are missing, corrupt, pickled, mismatched with the base, or over a limit."""

    status = 400


class AdapterTooLarge(AdapterRejected):
    status = 413


class StoreFull(RegistryError):
    """The store's filesystem (or the catalog's) has no space left; nothing was registered."""

    status = 507


class BackendUnavailable(RegistryError):
    """The catalog database or the object store cannot be reached; nothing was changed. Retry later."""

    status = 503

    def __init__(self, backend: str, where: str, detail: object = ""):
        self.backend = backend  # "catalog" | "store"
        why = f": {detail}" if detail else ""
        super().__init__(f"the adapter {backend} ({where}) is unavailable{why}; nothing was changed — "
                         "adapters already loaded keep serving; retry when it is back")


class StoreObjectMissing(RegistryError):
    """A catalog row references an object the store no longer holds (deleted behind the registry's back)."""

    status = 500


NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def store_full(where: str, detail: object) -> StoreFull:
    return StoreFull(f"the adapter store is full ({where}: {detail}); nothing was registered — free space "
                     "under the registry directory (AdapterRegistry.gc() removes unreferenced objects) and retry")
