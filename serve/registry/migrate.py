"""`peftserve registry migrate`: copy a SQLite + local-directory registry into PostgreSQL and S3.

Every object is checked against its digest before it is copied and downloaded again afterwards to check
the copy; only then are the catalog rows (every version, deletions included, version numbers kept)
inserted, in one transaction. Rows already present are skipped, so an interrupted run can be re-run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from serve.registry.errors import RegistryError
from serve.registry.files import directory_digest


class MigrationError(RegistryError):
    """The source registry cannot be migrated as it is; the message names the entry and what to do."""


def migrate(source_root: Path, registry_url: str, store_url: str, progress: bool = True) -> dict:
    from serve.registry.backends import check_urls, open_catalog, open_store
    from serve.registry.catalog import SQLiteCatalog
    from serve.registry.store import LocalStore

    source_root = Path(source_root).expanduser()
    if not (source_root / "catalog.sqlite").is_file():
        raise MigrationError(f"{source_root} holds no catalog.sqlite; pass the registry directory "
                             "($PEFTSERVE_HOME/registry)")
    check_urls(registry_url, store_url)
    src_catalog, src_store = SQLiteCatalog(source_root / "catalog.sqlite"), LocalStore(source_root / "store")
    scratch = Path(tempfile.mkdtemp(prefix="peftserve-migrate-"))  # the S3 store's staging, not the source dir
    catalog, store = open_catalog(source_root, registry_url), open_store(scratch, store_url)
    try:
        return _copy(src_catalog.rows(), src_store, catalog, store, progress)
    finally:
        catalog.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _copy(rows, src_store, catalog, store, progress: bool) -> dict:
    from tqdm import tqdm

    live = {e.digest for e, deleted in rows if deleted is None}
    copied, skipped = 0, []
    for digest in tqdm(sorted({e.digest for e, _ in rows}), desc="objects", unit="obj", disable=not progress):
        src = src_store.local_path(digest)
        if not src.is_dir():
            if digest in live:
                names = sorted({e.name for e, d in rows if e.digest == digest and d is None})
                raise MigrationError(f"object {digest[:12]} of live adapter(s) {', '.join(names)} is missing "
                                     f"from {src_store.objects}; nothing was migrated")
            skipped.append(digest)  # a deleted version whose object gc already removed
            continue
        if directory_digest(src) != digest:
            raise MigrationError(f"object {digest[:12]} in {src_store.objects} does not match its digest "
                                 "(corrupt on disk); re-register that adapter, then migrate")
        with store.staging() as staged:
            for f in src.iterdir():
                shutil.copy2(f, staged / f.name)
            store.put(staged, digest)
        if hasattr(store, "verify") and not store.verify(digest):
            raise MigrationError(f"object {digest[:12]} read back from {store.where} does not match its digest")
        copied += 1
    inserted = catalog.import_rows(rows)
    return {"rows": len(rows), "inserted": inserted, "objects": copied, "skipped_deleted_objects": len(skipped),
            "catalog": catalog.where, "store": store.where}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{migrate}")
    m = sub.add_parser("migrate", help="copy a SQLite + local registry into PostgreSQL and S3, digests verified",
                       description="Copy a SQLite + local-directory registry into PostgreSQL and S3-compatible "
                                   "storage; every object's digest is verified after the copy.")
    m.add_argument("--from", dest="source", type=Path, default=None,
                   help="registry directory to read (default: $PEFTSERVE_HOME/registry)")
    m.add_argument("--registry-url", default=None, help="postgresql://... (default: $PEFTSERVE_REGISTRY_URL)")
    m.add_argument("--store-url", default=None, help="s3://bucket/prefix (default: $PEFTSERVE_STORE_URL)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from serve.registry.backends import resolve_urls

    registry_url, store_url = resolve_urls(args.registry_url, args.store_url)
    if not registry_url or not store_url:
        raise MigrationError("name the destination: --registry-url postgresql://... and --store-url s3://... "
                             "(or PEFTSERVE_REGISTRY_URL / PEFTSERVE_STORE_URL)")
    if args.source is None:  # serve.engine.default_home(), which this package may not import
        args.source = Path(os.environ.get("PEFTSERVE_HOME", "~/.cache/peftserve")).expanduser() / "registry"
    try:
        summary = migrate(args.source, registry_url, store_url, progress=not args.quiet)
    except MigrationError:
        raise
    except (RegistryError, ValueError) as e:  # backend down, bad URL: one line, no traceback
        raise MigrationError(str(e)) from None
    print(f"peftserve registry migrate: {summary['rows']} catalog rows ({summary['inserted']} new) and "
          f"{summary['objects']} objects copied to {summary['catalog']} and {summary['store']}; every digest "
          "verified")
    return 0
