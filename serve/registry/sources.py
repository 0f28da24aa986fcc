"""Remote adapter sources: `s3://bucket/prefix/` (a directory of adapter files) and `https://` archives.

Both only *fetch* into a registry staging directory; the registry then runs the same checks as for any
other source (`register_staged`: only config + safetensors, validation against the base) before anything
is published. Limits hold while bytes arrive: a download or an extraction over the adapter byte limit
stops with 413. Archives (.tar, .tar.gz/.tgz, .zip) may hold the files at their root or in one top
directory; links, devices, absolute paths and '..' are refused (400), other files are skipped.
"""

from __future__ import annotations

import posixpath
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from serve.registry.errors import AdapterRejected, AdapterTooLarge
from serve.registry.files import CHUNK, CONFIG_FILE, PICKLE_SUFFIXES, WEIGHT_SUFFIX
from serve.registry.secrets import redact_url, scrub

REMOTE_SCHEMES = ("s3://", "https://")
FETCH_TIMEOUT_S = 30


def is_remote(source: str) -> bool:
    return source.startswith(REMOTE_SCHEMES)


def _wanted(name: str) -> bool:
    return name == CONFIG_FILE or name.endswith(WEIGHT_SUFFIX)


def fetch(source: str, into: Path, limit: int, s3_client=None) -> None:
    """Fetch a remote source's adapter files into `into` (a staging directory)."""
    if source.startswith("s3://"):
        fetch_s3_dir(source, into, limit, s3_client)
    elif source.startswith("https://"):
        fetch_archive(source, into, limit)
    else:
        raise AdapterRejected(f"source {redact_url(source)!r}: remote sources are s3://bucket/prefix/ or an "
                              "https:// URL of a .tar.gz/.zip archive")


def fetch_s3_dir(url: str, into: Path, limit: int, client=None) -> None:
    from botocore.exceptions import ClientError

    from serve.registry.s3 import s3_client, split_s3_url

    bucket, prefix = split_s3_url(url)
    s3 = client if client is not None else s3_client()
    shown = f"s3://{bucket}/{prefix}"
    try:
        page = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=1000)
        names = [o["Key"][len(prefix):] for o in page.get("Contents", [])]
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        wanted = [n for n in names if _wanted(n)]
        if not wanted:
            hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
            raise AdapterRejected(f"adapter source {shown} holds no {CONFIG_FILE} or *{WEIGHT_SUFFIX} files{hint}")
        total = 0
        for name in wanted:
            body = s3.get_object(Bucket=bucket, Key=prefix + name)["Body"]
            with open(into / name, "wb") as f:
                while chunk := body.read(CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise AdapterTooLarge(f"adapter source {shown} is larger than the {limit}-byte limit")
                    f.write(chunk)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise AdapterRejected(f"adapter source {shown}: {code or type(e).__name__} (check the bucket, the "
                              "prefix and this server's credentials)") from None
    except (AdapterRejected, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - no credentials, endpoint unreachable: the source is the caller's
        raise AdapterRejected(f"could not read adapter source {shown} ({scrub(f'{type(e).__name__}: {e}')}); "
                              "check the URL and this server's AWS endpoint and credentials") from None


def fetch_archive(url: str, into: Path, limit: int) -> None:
    shown = redact_url(url)
    with tempfile.TemporaryFile(dir=into.parent) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as resp:  # noqa: S310 - https only
                n = 0
                while chunk := resp.read(CHUNK):
                    n += len(chunk)
                    if n > limit:
                        raise AdapterTooLarge(f"archive {shown} is larger than the {limit}-byte adapter limit")
                    tmp.write(chunk)
        except AdapterTooLarge:
            raise
        except Exception as e:  # noqa: BLE001 - unreachable, 404, TLS: the caller's URL to fix
            raise AdapterRejected(f"could not download {shown} ({scrub(e)}); check the URL") from None
        tmp.seek(0)
        if zipfile.is_zipfile(tmp):
            tmp.seek(0)
            _extract_zip(tmp, into, limit, shown)
            return
        tmp.seek(0)
        try:
            archive = tarfile.open(fileobj=tmp, mode="r:*")
        except tarfile.TarError:
            raise AdapterRejected(f"{shown} is not a .tar, .tar.gz or .zip archive") from None
        with archive:
            _extract_tar(archive, into, limit, shown)


def _member_name(name: str, shown: str) -> str | None:
    """The file name a member lands under, None to skip it; refuses paths that leave the archive."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or norm == ".." or norm.startswith("../") or ":" in norm.split("/")[0]:
        raise AdapterRejected(f"archive {shown}: member {name!r} points outside the archive; refused")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if len(parts) > 2:
        return None
    return parts[-1] if parts and _wanted(parts[-1]) else None


def _extract_tar(archive: tarfile.TarFile, into: Path, limit: int, shown: str) -> None:
    total = 0
    for m in archive:
        if m.issym() or m.islnk() or m.isdev() or m.isfifo():
            raise AdapterRejected(f"archive {shown}: member {m.name!r} is a link or device; an adapter archive "
                                  "holds regular files only")
        name = _member_name(m.name, shown)
        if not m.isfile() or name is None:
            continue
        total += m.size
        if total > limit:
            raise AdapterTooLarge(f"archive {shown} unpacks to more than the {limit}-byte adapter limit")
        _copy(archive.extractfile(m), into / name, m.size)


def _extract_zip(fileobj, into: Path, limit: int, shown: str) -> None:
    with zipfile.ZipFile(fileobj) as z:
        total = 0
        for info in z.infolist():
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise AdapterRejected(f"archive {shown}: member {info.filename!r} is a symlink; refused")
            name = _member_name(info.filename, shown)
            if info.is_dir() or name is None:
                continue
            total += info.file_size
            if total > limit:
                raise AdapterTooLarge(f"archive {shown} unpacks to more than the {limit}-byte adapter limit")
            with z.open(info) as src:
                _copy(src, into / name, info.file_size)


def _copy(src, dst: Path, declared: int) -> None:
    n = 0
    if dst.exists():
        raise AdapterRejected(f"the archive holds {dst.name} twice; keep one copy")
    with open(dst, "xb") as out:
        while chunk := src.read(CHUNK):
            n += len(chunk)
            if n > declared:  # a header that lies about the size
                raise AdapterTooLarge(f"{dst.name} is larger than its archive header says")
            out.write(chunk)
