"""Remote sources against real servers: s3://bucket/prefix/ on moto's S3 server, https:// archives from a
local TLS server (self-signed certificate trusted through SSL_CERT_FILE). Bad archives are refused with
a 4xx before anything is published."""

from __future__ import annotations

import http.server
import io
import shutil
import ssl
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import boto3
import pytest

from serve.registry import AdapterRegistry, AdapterRejected, AdapterTooLarge
from serve.registry.sources import fetch
from tests.serve.test_registry import BASE, make_adapter, validate

LIMIT = 64 << 10


@pytest.fixture(scope="module")
def https_root(tmp_path_factory):
    """A directory served over https://127.0.0.1:<port>/ with a certificate this process trusts."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make the test server's certificate)")
    d = tmp_path_factory.mktemp("https")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "key.pem", "-out",
                    d / "cert.pem", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    www = d / "www"
    www.mkdir()
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(www), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mp = pytest.MonkeyPatch()
    mp.setenv("SSL_CERT_FILE", str(d / "cert.pem"))
    yield www, f"https://127.0.0.1:{server.server_address[1]}"
    mp.undo()
    server.shutdown()


@pytest.fixture
def reg(tmp_path):
    return AdapterRegistry(tmp_path / "registry", max_adapter_bytes=LIMIT).for_base(BASE)


def register_remote(reg, name, source):
    with reg.staging() as staged:
        fetch(source, staged, reg.max_adapter_bytes)
        return reg.register_staged(name, staged, validate, False, source)


def _tar(path: Path, members: list[tuple[str, bytes | None, str]]) -> None:
    """(name, data, type) with type file | symlink | hardlink."""
    with tarfile.open(path, "w:gz") as t:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = "/etc/passwd"
                t.addfile(info)


def _adapter_bytes(tmp_path) -> dict[str, bytes]:
    src = make_adapter(tmp_path / "src", seed=4.0)
    return {p.name: p.read_bytes() for p in src.iterdir()}


def test_https_archives_register_like_a_directory(reg, https_root, tmp_path):
    www, base_url = https_root
    files = _adapter_bytes(tmp_path)
    _tar(www / "good.tar.gz", [(f"my-adapter/{n}", b, "file") for n, b in files.items()]
         + [("my-adapter/README.md", b"# readme is skipped", "file")])
    rec = register_remote(reg, "from-tar", f"{base_url}/good.tar.gz")
    assert sorted(p.name for p in Path(rec.path).iterdir()) == sorted(files)
    with zipfile.ZipFile(www / "good.zip", "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    assert register_remote(reg, "from-zip", f"{base_url}/good.zip").digest == rec.digest  # same bytes, one object


@pytest.mark.parametrize("case, status, needle", [
    ("traversal", 400, "points outside the archive"),
    ("absolute", 400, "points outside the archive"),
    ("symlink", 400, "is a link or device"),
    ("hardlink", 400, "is a link or device"),
    ("bomb", 413, "unpacks to more than"),
    ("oversized", 413, "larger than the"),
    ("not-an-archive", 400, "is not a .tar"),
    ("missing", 400, "could not download"),
])
def test_bad_archives_are_refused_and_nothing_is_published(reg, https_root, tmp_path, case, status, needle):
    www, base_url = https_root
    files = _adapter_bytes(tmp_path)
    good = [(n, b, "file") for n, b in files.items()]
    path = www / f"{case}.tar.gz"
    if case == "traversal":
        _tar(path, [*good, ("../../evil.safetensors", b"x", "file")])
    elif case == "absolute":
        _tar(path, [*good, ("/tmp/evil.safetensors", b"x", "file")])
    elif case in ("symlink", "hardlink"):
        _tar(path, [*good, ("adapter_model.safetensors", None, case)])
    elif case == "bomb":  # compresses to a few KiB, unpacks past the limit
        _tar(path, [good[0], ("adapter_model.safetensors", b"\0" * (LIMIT * 4), "file")])
    elif case == "oversized":
        path.write_bytes(bytes(range(256)) * (LIMIT // 128))
    elif case == "not-an-archive":
        path.write_bytes(b"plain text, not an archive")
    with pytest.raises(AdapterRejected) as e:
        register_remote(reg, "bad", f"{base_url}/{case}.tar.gz")
    assert e.value.status == status and needle in str(e.value)
    assert reg.list() == [] and not list(reg.objects.iterdir()) and not list(reg.tmp.iterdir())
    assert not (tmp_path / "evil.safetensors").exists()


def test_s3_directory_source(reg, moto, tmp_path):
    bucket = moto.bucket("src")
    s3 = boto3.client("s3")
    for name, data in _adapter_bytes(tmp_path).items():
        s3.put_object(Bucket=bucket, Key=f"team/lora-7/{name}", Body=data)
    s3.put_object(Bucket=bucket, Key="team/lora-7/notes.txt", Body=b"skipped")
    s3.put_object(Bucket=bucket, Key="team/lora-7/sub/adapter_model.safetensors", Body=b"a deeper prefix: skipped")
    rec = register_remote(reg, "from-s3", f"s3://{bucket}/team/lora-7/")
    assert rec.source == f"s3://{bucket}/team/lora-7/" and len(list(Path(rec.path).iterdir())) == 2
    s3.put_object(Bucket=bucket, Key="pickled/pytorch_model.bin", Body=b"\x80\x04pickle")
    with pytest.raises(AdapterRejected, match="pickled weights are never loaded"):
        register_remote(reg, "pickled", f"s3://{bucket}/pickled/")
    with pytest.raises(AdapterRejected, match="NoSuchBucket"):
        register_remote(reg, "nobucket", "s3://no-such-bucket-here/x/")
    big = moto.bucket("big")
    s3.put_object(Bucket=big, Key="a/adapter_config.json", Body=b"{}")
    s3.put_object(Bucket=big, Key="a/adapter_model.safetensors", Body=b"\0" * (LIMIT + 1))
    with pytest.raises(AdapterTooLarge):
        register_remote(reg, "big", f"s3://{big}/a/")
    assert [r.name for r in reg.list()] == ["from-s3"]
