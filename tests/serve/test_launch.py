"""`peftserve serve` as a process: errors knowable before start-up are one line in seconds; Ctrl-C and
SIGTERM drain in-flight requests, stop everything the command started, and exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve.app.local import free_port

ROOT = Path(__file__).resolve().parents[2]


def _serve(args: list[str], home: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PEFTSERVE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("PEFTSERVE_ADMIN_TOKEN", None)
    return subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("args, needle", [
    (["--base", "/no/such/dir"], "base path /no/such/dir does not exist"),
    (["--base", "not a model id"], "neither an existing local directory nor a hub id"),
    (["--host", "0.0.0.0"], "set PEFTSERVE_ADMIN_TOKEN"),
    (["--config", "/no/such.yaml"], "cannot read config /no/such.yaml"),
    (["--allow-source-dir", "/no/such/adapters"], "allowed source directory /no/such/adapters does not exist"),
    (["--dtype", "int8", "--config", "deploy/flan-t5-xl-4xa10.yaml"], "dtype int8 runs on the CPU only"),
    (["--config", "deploy/cluster.yaml", "--replicas", "2"], "--replicas conflicts with the config's autoscaling"),
    (["--ray-address", "127.0.0.1:1", "--num-cpus", "2"], "--num-cpus sizes a local Ray"),
])
def test_knowable_errors_are_one_line_before_ray_starts(args, needle, tmp_path):
    t0 = time.monotonic()
    proc = _serve(args, tmp_path)
    out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("peftserve serve: error: "), err
    assert needle in lines[0] and "Traceback" not in err
    assert "starting Ray" not in out and elapsed < 20, (elapsed, out)


def test_port_in_use_is_one_line(tmp_path, tiny_base_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = _serve(["--base", str(tiny_base_dir), "--port", str(s.getsockname()[1])], tmp_path)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.count("\n") == 1 and "cannot listen on 127.0.0.1" in err


def test_open_admin_beyond_loopback_is_explicit(tmp_path):
    from serve.app.config import AppConfig
    from serve.app.preflight import preflight
    from serve.engine import ConfigError

    with pytest.raises(ConfigError, match="--insecure-allow-open-admin"):
        preflight(AppConfig(registry_dir=str(tmp_path)), "0.0.0.0", free_port())
    opened = preflight(AppConfig(registry_dir=str(tmp_path), insecure_allow_open_admin=True), "0.0.0.0", free_port())
    assert opened.allowed_source_dirs == []  # server paths are opt-in beyond loopback
    with_token = preflight(AppConfig(registry_dir=str(tmp_path), admin_token="s3cret"), "0.0.0.0", free_port())
    assert with_token.allowed_source_dirs == []
    local = preflight(AppConfig(registry_dir=str(tmp_path)), "127.0.0.1", free_port())
    assert local.allowed_source_dirs is None


def _ray_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"ray" in cmd and (b"session_" in cmd or b"raylet" in cmd or b"gcs_server" in cmd):
                pids.add(int(entry))
    return pids


def _wait_ready(proc: subprocess.Popen) -> None:
    """Read the server's output until it says it is ready (fails the test if it exits first)."""
    for line in proc.stdout:
        if "ready on" in line:
            return
    pytest.fail(f"server did not start: {proc.stderr.read()[-3000:]}")


def _gone_soon(pids: set[int], timeout_s: float = 10.0) -> list[int]:
    """The pids still alive after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_options_for_a_deployment_the_topology_lacks_are_one_line(tmp_path):
    config = tmp_path / "combined.yaml"
    config.write_text("applications:\n- name: peftserve\n  import_path: serve.app.builder:app_builder\n"
                      "  args: {topology: combined}\n"
                      "  deployments:\n  - name: Ingress\n    num_replicas: 2\n")
    proc = _serve(["--config", str(config)], tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "deployments: Ingress is not part of the app with topology: combined" in err
    assert "starting Ray" not in out


# SIGTERM (what orchestrators send) in every run, in both topologies (the drain asks whichever deployment answers
# HTTP); SIGINT (Ctrl-C) takes the same drain path, in the soak run
@pytest.mark.parametrize("sig, topology", [pytest.param(signal.SIGINT, "split", marks=pytest.mark.soak),
                                           (signal.SIGTERM, "split"), (signal.SIGTERM, "combined")])
def test_signal_drains_in_flight_and_stops_everything(sig, topology, tmp_path, tiny_base_dir):
    port = free_port()
    before = _ray_pids()
    config = tmp_path / "app.yaml"
    config.write_text(f"topology: {topology}\n")
    # Started as a background job would be: SIGINT ignored on entry (the command must re-install it).
    proc = _serve(["--base", str(tiny_base_dir), "--port", str(port), "--num-cpus", "2", "--no-demo-adapters",
                   "--config", str(config)], tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc)
        started = _ray_pids() - before
        assert started, "no Ray processes seen"
        reply: dict = {}

        def long_request():
            r = httpx.post(f"{url}/generate", timeout=120, json={
                "inputs": "drain me " * 40, "parameters": {"max_new_tokens": 32, "details": True}})
            reply.update(status=r.status_code, body=r.json())

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.3)  # the request is in flight
        proc.send_signal(sig)
        t.join(timeout=120)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert reply.get("status") == 200, reply
    assert reply["body"]["details"]["generated_tokens"] >= 1
    left = _gone_soon(started)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left]


def test_sigterm_to_the_whole_process_group_stops_promptly_and_leaves_nothing(tmp_path, tiny_base_dir):
    """systemd (KillMode=control-group), `timeout` and `kill -TERM -PGID` signal every process of the group, Ray's
    GCS included: the server must not wait on a GCS that stopped answering (Ray would abort it after 60 s)."""
    port = free_port()
    before = _ray_pids()
    proc = _serve(["--base", str(tiny_base_dir), "--port", str(port), "--num-cpus", "2", "--no-demo-adapters"],
                  tmp_path, start_new_session=True)
    try:
        _wait_ready(proc)
        started = _ray_pids() - before
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=50) == 0, proc.stderr.read()[-3000:]
        assert time.monotonic() - t0 < 40
        assert "no drain, stopping what is left" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not _gone_soon(started)
