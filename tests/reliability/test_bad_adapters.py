"""Hostile and broken adapters via POST /adapters (server path and multipart upload): each is refused with a
4xx that says why, nothing is imported or unpickled (canary files never appear), and the registry — its
listing and every file in its store — is unchanged."""

from __future__ import annotations

import socket
import time

import pytest

from . import bad_adapters as bad
from .harness import ADMIN, AUTH, adapter_files, bump, record, register, registry_state, upload


@pytest.fixture(scope="module")
def canary_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("canaries")
    yield d
    assert not list(d.iterdir()), f"a canary appeared: {list(d.iterdir())}"


def _check(http, server, before, r, canary, expect=(400,)):
    bump("bad_adapter_cases")
    bump("bad_adapter_5xx", int(r.status_code >= 500))
    assert r.status_code in expect, r.text
    assert r.json()["error"], r.text
    assert not canary.exists(), "the adapter's code or pickle was executed"
    assert registry_state(http, server["registry"]) == before


@pytest.mark.parametrize("make", bad.PATH_CASES, ids=[f.__name__ for f in bad.PATH_CASES])
def test_bad_adapter_from_path_is_refused(http, server, registered, zoo, tmp_path, canary_dir, make):
    canary = canary_dir / f"path-{make.__name__}"
    before = registry_state(http, server["registry"])
    r = register(http, "bad-" + make.__name__.replace("_", "-"), make(tmp_path, zoo, canary))
    _check(http, server, before, r, canary)


@pytest.mark.parametrize("make", bad.UPLOAD_CASES, ids=[f.__name__ for f in bad.UPLOAD_CASES])
def test_bad_adapter_upload_is_refused(http, server, registered, zoo, tmp_path, canary_dir, make):
    canary = canary_dir / f"upload-{make.__name__}"
    before = registry_state(http, server["registry"])
    r = upload(http, "up-" + make.__name__.replace("_", "-"), adapter_files(make(tmp_path, zoo, canary)))
    _check(http, server, before, r, canary, expect=(400, 413))  # 413: over the 256 KiB upload cap


@pytest.mark.parametrize("source", ["file:///etc/passwd", "http://127.0.0.1:9/adapter", "https://example.com/a",
                                    "ftp://127.0.0.1/adapter", "s3://bucket/adapter", "hf://org/repo",
                                    "org/repo-that-cannot-be-fetched", "gopher://x/y", "\\\\smb-host\\share"])
def test_sources_outside_allowed_schemes_are_refused(http, server, registered, canary_dir, source):
    before = registry_state(http, server["registry"])
    r = register(http, "remote", source)
    _check(http, server, before, r, canary_dir / "never")


@pytest.mark.parametrize("filename", ["../../escape.safetensors", "/tmp/abs.safetensors", "..", "sub/dir.json",
                                      "adapter_config.json\u0000.txt"])
def test_upload_file_names_cannot_escape(http, server, registered, zoo, tmp_path, canary_dir, filename):
    before = registry_state(http, server["registry"])
    files = [("adapter_config.json", (zoo["lora-a"] / "adapter_config.json").read_bytes()),
             (filename, (zoo["lora-a"] / "adapter_model.safetensors").read_bytes())]
    r = upload(http, "escape", files)
    _check(http, server, before, r, canary_dir / "never")
    root = server["registry"].parent
    assert not list(root.rglob("escape*")) and not list(root.rglob("abs.safetensors"))


def test_custom_code_next_to_a_valid_adapter_is_never_imported_nor_stored(http, server, registered, zoo, tmp_path,
                                                                          canary_dir):
    """A valid adapter directory that also holds a python module: only config + safetensors are stored."""
    import shutil

    canary = canary_dir / "sidecar"
    d = shutil.copytree(zoo["lora-b"], tmp_path / "with-code")
    (d / "__init__.py").write_text(f"open({str(canary)!r}, 'w')\n")
    (d / "modeling_evil.py").write_text(f"open({str(canary)!r}, 'w')\n")
    r = register(http, "with-code", d)
    assert r.status_code == 201, r.text
    stored = {p.name for p in (server["registry"] / "store" / "objects" / r.json()["digest"]).iterdir()}
    assert stored == {"adapter_config.json", "adapter_model.safetensors"}
    assert http.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "with-code"}}).status_code == 200
    assert http.delete("/adapters/with-code", headers=AUTH).status_code == 200
    assert not canary.exists()


def _raw_post(server, path: str, headers: dict, first_bytes: bytes, chunked: bool) -> tuple[int, float]:
    """Send headers and only the start of a huge body, then read the status line: a server that waits for
    the whole body never answers (we time out); one that refuses early answers within the timeout."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=20) as s:
        s.sendall(head.encode() + b"\r\n")
        t0 = time.monotonic()
        try:
            if chunked:
                for _ in range(8):  # 8 x 64 KiB: past the 256 KiB upload cap, far short of "the rest"
                    s.sendall(f"{len(first_bytes):x}\r\n".encode() + first_bytes + b"\r\n")
            else:
                s.sendall(first_bytes)
        except OSError:
            pass  # the server refused and closed while we were still sending: fine
        status = s.recv(4096).split(b" ", 2)[1]
        return int(status), time.monotonic() - t0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_upload_is_refused_before_it_is_read(http, server, registered, chunked):
    before = registry_state(http, server["registry"])
    boundary = "relboundary"
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    else:
        headers["Content-Length"] = str(1 << 30)  # announces 1 GiB; we send 64 KiB of it
    start = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"adapter_model.safetensors\""
             f"\r\n\r\n").encode()
    status, seconds = _raw_post(server, "/adapters", headers, start + b"\0" * (64 * 1024 - len(start)), chunked)
    bump("bad_adapter_cases")
    assert status == 413
    record(f"oversized_upload_refused_after_s_{'chunked' if chunked else 'content_length'}", round(seconds, 3))
    assert registry_state(http, server["registry"]) == before
