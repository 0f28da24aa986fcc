"""S3Store: store objects in S3-compatible object storage, read through this node's NodeCache.

    s3://<bucket>/<prefix>/objects/<sha256>/<file>           the adapter's files
    s3://<bucket>/<prefix>/objects/<sha256>/MANIFEST.json    written last: the object is complete

Endpoint and credentials come from boto3's standard chain (AWS_ENDPOINT_URL, AWS_PROFILE, env keys,
instance roles); the URL names only bucket and prefix. Every file is sent with its Content-MD5, so the
server refuses a corrupted upload, and its size is read back before the manifest is written; only then
does `put` return and the registry publish the catalog row. A node killed mid-upload leaves files
without a manifest: invisible (no catalog row references them) and removed by `collect`.

Reads (`fetch`) download into the node cache, verify the directory digest, and count bytes and seconds
through `observer(op, nbytes, seconds, ok)` (the app feeds Prometheus from it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from serve.registry.errors import BackendUnavailable, RegistryError, StoreObjectMissing
from serve.registry.files import CHUNK
from serve.registry.node_cache import NodeCache
from serve.registry.secrets import scrub

MANIFEST = "MANIFEST.json"


def s3_client():
    """boto3's client with short timeouts: an unreachable store is a 503 in seconds, not a hang."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=3, read_timeout=30,
                                            retries={"max_attempts": 2, "mode": "standard"}))


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix ending in '/' or empty) of `s3://bucket/prefix`."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"{url!r} is not an s3://bucket/prefix URL")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def is_store_outage(e: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        return code.startswith("5") or code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId",
                                                "SignatureDoesNotMatch", "SlowDown", "ServiceUnavailable")
    return isinstance(e, BotoCoreError | OSError)


class S3Store:
    def __init__(self, url: str, cache: NodeCache, client=None):
        self.url = url
        self.bucket, self.prefix = split_s3_url(url)
        self.where = f"S3 s3://{self.bucket}/{self.prefix}"
        self.cache = cache
        self.s3 = client if client is not None else s3_client()
        self.observer: Callable[[str, int, float, bool], None] | None = None
        self.objects, self.tmp = cache.objects, cache.tmp

    def _key(self, digest: str, name: str = "") -> str:
        return f"{self.prefix}objects/{digest}/{name}"

    @contextmanager
    def _op(self, op: str, nbytes: list[int]) -> Iterator[None]:
        t0, ok = time.perf_counter(), False
        try:
            yield
            ok = True
        except RegistryError:
            raise
        except Exception as e:
            if op == "read" and _code(e) in ("NoSuchKey", "404"):
                raise StoreObjectMissing(f"a file of this object is missing from {self.where} ({op}); "
                                         "re-register the adapter") from None
            if is_store_outage(e):
                raise BackendUnavailable("store", self.where, scrub(f"{type(e).__name__}: {e}")) from None
            raise
        finally:
            if self.observer is not None:
                self.observer(op, nbytes[0], time.perf_counter() - t0, ok)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        path = self.cache.tmp / uuid.uuid4().hex
        try:
            path.mkdir()
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def complete(self, digest: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._key(digest, MANIFEST))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put(self, staged: Path, digest: str) -> None:
        nbytes = [0]
        with self._op("write", nbytes):
            if not self.complete(digest):
                files = {}
                for p in sorted(staged.iterdir()):
                    data = p.read_bytes()
                    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 - integrity, not security
                    self.s3.put_object(Bucket=self.bucket, Key=self._key(digest, p.name), Body=data, ContentMD5=md5)
                    head = self.s3.head_object(Bucket=self.bucket, Key=self._key(digest, p.name))
                    if head["ContentLength"] != len(data):
                        raise BackendUnavailable("store", self.where, f"{p.name} was stored with "
                                                 f"{head['ContentLength']} of {len(data)} bytes")
                    files[p.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                    nbytes[0] += len(data)
                self.s3.put_object(Bucket=self.bucket, Key=self._key(digest, MANIFEST),
                                   Body=json.dumps({"digest": digest, "files": files}).encode())
        self.cache.adopt(staged, digest)

    def probe(self) -> None:
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001 - unreachable, no bucket, no access: not usable now
            raise BackendUnavailable("store", self.where, scrub(f"{type(e).__name__}: {e}")) from None

    def local_path(self, digest: str) -> Path:
        return self.cache.path(digest)

    def fetch(self, digest: str, pinned: set[str] = frozenset()) -> Path:
        """This node's verified copy of object `digest`, downloaded on a cache miss."""
        if self.cache.has(digest):
            self.cache.touch(digest)
            return self.cache.path(digest)
        nbytes = [0]
        with self._op("read", nbytes):
            return self.cache.fill(digest, lambda into: self._download(digest, into, nbytes), pinned)

    def verify(self, digest: str) -> bool:
        """Download object `digest` afresh (bypassing the node cache) and check its directory digest."""
        from serve.registry.files import directory_digest

        with self.staging() as into, self._op("read", [0]):
            self._download(digest, into, [0])
            return directory_digest(into) == digest

    def _download(self, digest: str, into: Path, nbytes: list[int]) -> None:
        manifest = json.loads(self.s3.get_object(Bucket=self.bucket, Key=self._key(digest, MANIFEST))["Body"].read())
        for name in manifest["files"]:
            body = self.s3.get_object(Bucket=self.bucket, Key=self._key(digest, name))["Body"]
            with open(into / name, "wb") as f:
                while chunk := body.read(CHUNK):
                    f.write(chunk)
                    nbytes[0] += len(chunk)

    def digests(self) -> dict[str, float]:
        """Every object directory in the bucket (complete or not) -> its newest file's mtime."""
        out: dict[str, float] = {}
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}objects/")
        for page in pages:
            for obj in page.get("Contents", []):
                digest = obj["Key"][len(self.prefix) + len("objects/"):].split("/", 1)[0]
                out[digest] = max(out.get(digest, 0.0), obj["LastModified"].timestamp())
        return out

    def collect(self, live: set[str], min_age_s: float) -> list[str]:
        """Delete objects no live entry references (orphans of killed uploads included) older than min_age_s."""
        cutoff, removed = time.time() - min_age_s, []
        with self._op("collect", [0]):
            for digest, mtime in self.digests().items():
                if digest in live or mtime >= cutoff:
                    continue
                keys = [{"Key": o["Key"]} for page in self.s3.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self._key(digest)) for o in page.get("Contents", [])]
                for i in range(0, len(keys), 1000):
                    self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i:i + 1000]})
                removed.append(digest)
        self.cache.collect(min_age_s)
        return removed
