"""The registry: which adapters exist for which base (catalog) and their bytes (content-addressed store).

Imports neither Ray nor FastAPI, nor the engine: the app wires it to both. Backends sit behind two small
interfaces, `Catalog` (serve/registry/catalog.py: SQLite) and `Store` (serve/registry/store.py: a local
directory); `AdapterRegistry` (serve/registry/registry.py) combines them.
"""

from serve.registry.backends import BackendConfigError, open_registry, resolve_urls
from serve.registry.catalog import Catalog, CatalogEntry, Changes, SQLiteCatalog
from serve.registry.errors import (
    AdapterExists,
    AdapterNotFound,
    AdapterRejected,
    AdapterTooLarge,
    BackendUnavailable,
    InvalidAdapterName,
    RegistryError,
    StoreFull,
)
from serve.registry.files import (
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    WEIGHT_SUFFIX,
    adapter_files,
    check_name,
    copy_file,
    directory_digest,
)
from serve.registry.registry import AdapterRecord, AdapterRegistry, Delta, Snapshot
from serve.registry.secrets import redact_url, scrub
from serve.registry.store import LocalStore, Store

__all__ = [
    "CONFIG_FILE", "PICKLE_SUFFIXES", "WEIGHT_SUFFIX", "AdapterExists", "AdapterNotFound", "AdapterRecord",
    "AdapterRegistry", "AdapterRejected", "AdapterTooLarge", "BackendConfigError", "BackendUnavailable", "Catalog",
    "CatalogEntry", "Changes", "Delta", "InvalidAdapterName",
    "LocalStore", "RegistryError", "SQLiteCatalog", "Snapshot", "Store", "StoreFull", "adapter_files",
    "check_name", "copy_file", "directory_digest", "open_registry", "redact_url", "resolve_urls", "scrub",
]
