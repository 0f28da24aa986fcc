"""Pick the catalog and store backends from URLs: the one place that maps configuration to classes.

    catalog: None -> SQLite under the registry root; postgresql://user:pass@host:5432/db -> PostgresCatalog
    store:   None -> a local directory under the root; s3://bucket/prefix -> S3Store (+ this node's cache)

Unset arguments fall back to PEFTSERVE_REGISTRY_URL / PEFTSERVE_STORE_URL, so credentials can stay in
the environment (or a Kubernetes secret) instead of a config file.
"""

from __future__ import annotations

import os
from pathlib import Path

from serve.registry.catalog import SQLiteCatalog
from serve.registry.registry import AdapterRegistry
from serve.registry.secrets import redact_url
from serve.registry.store import LocalStore

REGISTRY_URL_ENV = "PEFTSERVE_REGISTRY_URL"
STORE_URL_ENV = "PEFTSERVE_STORE_URL"
DEFAULT_NODE_CACHE_BYTES = 20 << 30


class BackendConfigError(ValueError):
    """A registry or store URL this server cannot use; the message says which forms are accepted."""


def resolve_urls(registry_url: str | None = None, store_url: str | None = None) -> tuple[str | None, str | None]:
    return (registry_url or os.environ.get(REGISTRY_URL_ENV) or None,
            store_url or os.environ.get(STORE_URL_ENV) or None)


def check_urls(registry_url: str | None, store_url: str | None) -> None:
    """Refuse unusable URLs (before anything starts); never echoes a password."""
    if registry_url and not registry_url.startswith(("postgresql://", "postgres://")):
        raise BackendConfigError(f"registry_url {redact_url(registry_url)!r} is not supported: use "
                                 "postgresql://user:pass@host:5432/db (or leave it unset for SQLite)")
    if store_url:
        from serve.registry.s3 import split_s3_url

        try:
            split_s3_url(store_url)
        except ValueError:
            raise BackendConfigError(f"store_url {redact_url(store_url)!r} is not supported: use "
                                     "s3://bucket/prefix (or leave it unset for a local directory)") from None


def open_catalog(root: Path, registry_url: str | None):
    if registry_url is None:
        return SQLiteCatalog(root / "catalog.sqlite")
    from serve.registry.postgres import PostgresCatalog

    return PostgresCatalog(registry_url)


def open_store(root: Path, store_url: str | None, cache_bytes: int = DEFAULT_NODE_CACHE_BYTES):
    if store_url is None:
        return LocalStore(root / "store")
    from serve.registry.node_cache import NodeCache
    from serve.registry.s3 import S3Store

    return S3Store(store_url, NodeCache(root / "node-cache", cache_bytes))


def open_registry(root: str | Path, max_adapter_bytes: int = 512 << 20, registry_url: str | None = None,
                  store_url: str | None = None, cache_bytes: int = DEFAULT_NODE_CACHE_BYTES) -> AdapterRegistry:
    """The registry for these URLs (or the environment's); `root` holds SQLite/local files or the node cache."""
    root = Path(root).expanduser()
    registry_url, store_url = resolve_urls(registry_url, store_url)
    check_urls(registry_url, store_url)
    return AdapterRegistry(root, max_adapter_bytes, catalog=open_catalog(root, registry_url),
                           store=open_store(root, store_url, cache_bytes))
