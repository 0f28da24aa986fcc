"""Secure by default (issue 12), over real HTTP from a real non-loopback address of this machine:
without an admin token, registry writes are loopback-only; server-path sources stay inside
`allowed_source_dirs` (resolved, so symlinks and '..' cannot leave them)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from serve.app.admin_routes import allowed_source
from serve.app.http_errors import HTTPProblem
from tests.serve.app_fixtures import app_args, build, make_zoo


def _non_loopback_ipv4() -> str | None:
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith("127."):
            return addr
    return None


ADDR = _non_loopback_ipv4()


@pytest.fixture(scope="module")
def zoo(tiny_base, tmp_path_factory):
    return make_zoo(tiny_base, tmp_path_factory.mktemp("security-zoo"))


@pytest.fixture(scope="module")
def server(tiny_base_dir, zoo, tmp_path_factory):
    if ADDR is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    from serve.app import local

    args = app_args(tiny_base_dir, tmp_path_factory.mktemp("security-registry"),
                    allowed_source_dirs=[str(zoo["lora-a"].parent)])
    port = local.free_port()
    local.start(build(args), host="0.0.0.0", port=port, num_cpus=4)
    yield {"local": f"http://127.0.0.1:{port}", "remote": f"http://{ADDR}:{port}"}
    local.stop()


def _client(url: str, remote: bool) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=ADDR) if remote else None
    return httpx.Client(base_url=url, timeout=60, transport=transport)


def test_writes_without_a_token_are_loopback_only(server, zoo):
    with _client(server["remote"], remote=True) as remote, _client(server["local"], remote=False) as local:
        r = remote.post("/adapters", json={"name": "from-net", "source": str(zoo["lora-a"])})
        assert r.status_code == 403 and "PEFTSERVE_ADMIN_TOKEN" in r.json()["error"], r.text
        files = [("files", (p.name, p.read_bytes())) for p in sorted(zoo["ia3-a"].iterdir())
                 if p.name in ("adapter_config.json", "adapter_model.safetensors")]
        assert remote.post("/adapters", data={"name": "up"}, files=files).status_code == 403
        assert local.post("/adapters", json={"name": "mine", "source": str(zoo["lora-a"])}).status_code == 201
        r = remote.delete("/adapters/mine")
        assert r.status_code == 403 and local.get("/adapters/mine").status_code == 200
        assert remote.get("/adapters/mine").status_code == 200  # reads and generation stay open
        assert remote.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "mine",
                                                                               "max_new_tokens": 2}}).status_code == 200
        assert local.delete("/adapters/mine").status_code == 200


def test_server_paths_stay_inside_allowed_dirs(server, zoo, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(zoo["lora-a"], outside)
    link = zoo["lora-a"].parent / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with _client(server["local"], remote=False) as local:
            for source in (outside, link, zoo["lora-a"].parent / ".." / outside.parent.name / "outside"):
                r = local.post("/adapters", json={"name": "escape", "source": str(source)})
                assert r.status_code == 403 and "outside the directories" in r.json()["error"], (source, r.text)
            assert local.get("/adapters/escape").status_code == 404
    finally:
        link.unlink()


def test_allowed_source_rules(tmp_path):
    inside = tmp_path / "allowed" / "a"
    inside.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    allowed = [str((tmp_path / "allowed").resolve())]
    assert allowed_source(str(inside), allowed, "10.1.2.3") == inside.resolve()
    assert allowed_source(str(inside), None, "127.0.0.1") == inside.resolve()
    refusals = [(str(inside), None, "10.1.2.3", "loopback clients only"),
                (str(inside), None, None, "loopback clients only"),
                (str(inside), [], "127.0.0.1", "disabled"),
                (str(tmp_path / "allowed" / ".." / "elsewhere"), allowed, "127.0.0.1", "outside"),
                (str(tmp_path / "allowed-but-not"), allowed, "127.0.0.1", "outside")]
    for source, dirs, client, needle in refusals:
        with pytest.raises(HTTPProblem) as e:
            allowed_source(source, dirs, client)
        assert e.value.reply.status == 403 and needle in e.value.reply.message, (source, dirs, client)


def test_config_refuses_relative_allowed_dirs():
    from pydantic import ValidationError

    from serve.app.config import AppConfig

    with pytest.raises(ValidationError, match="not an absolute path"):
        AppConfig(allowed_source_dirs=["relative/dir"])
    assert AppConfig(allowed_source_dirs=[str(Path("/tmp/../tmp"))]).allowed_source_dirs == [str(Path("/tmp").resolve())]
