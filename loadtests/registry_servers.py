"""Real servers for the registry tests and benchmark: a throwaway PostgreSQL cluster (initdb + pg_ctl as
user postgres, in a temp dir, on a free port, password auth over TCP), moto's S3-compatible server in a
subprocess, and `peftserve serve` nodes (separate homes and Ray clusters) sharing them."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import yaml

from serve.app.local import free_port

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "two-node-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CONFIG = {"engine": {"max_batch_rows": 4, "max_new_tokens_cap": 32, "default_max_new_tokens": 8,
                     "max_queue": 32, "request_timeout_s": 60, "host_bytes": "64MiB",
                     "device_slots": {"lora": 4, "ia3": 1, "bitfit": 1, "prompt": 1, "adapterhub": 1}},
          "demo_adapters": False, "metrics_push_interval_s": 0.5}

# Throwaway credentials of the servers started here; the redaction tests look for them in logs and replies.
PG_USER, PG_PASSWORD = "peft", "pg-Secret-7f3a9"
AWS_KEY_ID, AWS_SECRET = "AKIAPEFTSERVETEST", "aws-Secret-Key-91c2e"


def stop_server_process(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM (the launcher drains and exits), then SIGKILL to the process group if it hangs: a `peftserve
    serve` child started with start_new_session=True, Ray's processes included."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def pg_bin() -> Path | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def _as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    if os.geteuid() != 0:  # already an unprivileged user: run directly
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    runner = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else ["su", "postgres", "-c"]
    full = runner + cmd if runner[0] == "runuser" else runner + [" ".join(cmd)]
    return subprocess.run(full, check=True, capture_output=True, text=True, **kw)


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="peftserve-pg-"))
        self.data, self.sock, self.log = self.dir / "data", self.dir / "sock", self.dir / "log"
        self.port = free_port()
        self.sock.mkdir()
        (self.dir / "pw").write_text("postgres-superuser-pw\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            for p in (self.sock, self.dir / "pw"):
                shutil.chown(p, "postgres")
        _as_postgres([str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                      "--auth-host=scram-sha-256", f"--pwfile={self.dir / 'pw'}", "-E", "UTF8", "--no-sync"])

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", f"'{opts}'"
                      if not shutil.which("runuser") else opts, "-w", "-t", "60", "start"])

    def stop(self) -> None:
        _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.sock), port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as c:
            c.execute(sql)

    def create_role(self) -> None:
        self.admin(f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'")

    def database(self, prefix: str = "t") -> str:
        """A fresh database owned by the test role; returns its URL (with the password)."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.admin(f"CREATE DATABASE {name} OWNER {PG_USER}")
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def moto_bin() -> Path | None:
    p = Path(sys.executable).parent / "moto_server"
    return p if p.exists() else (Path(shutil.which("moto_server")) if shutil.which("moto_server") else None)


class MotoServer:
    def __init__(self, binary: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("moto_server did not start")

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def bucket(self, prefix: str = "b") -> str:
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.url).create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class TcpProxy:
    """A TCP forwarder to 127.0.0.1:`target_port` on a port of its own: `stop()` refuses and cuts every
    connection (an outage of the server behind it, whose state survives), `start()` serves again on the
    same port."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(128)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for c in (src, dst):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            src.close()  # each pump closes the socket it read from; the other pump closes the other


class Node:
    """`peftserve serve` with its own home and Ray; `config`: a Serve config or AppConfig mapping (default
    CONFIG), `args`: more command-line flags (e.g. --replicas 2)."""

    def __init__(self, name: str, base_dir: Path, work: Path, env: dict[str, str], config: dict | None = None,
                 args: tuple[str, ...] = ()):
        self.name, self.port = name, free_port()
        self.home = work / f"home-{name}"
        self.ray_tmp = Path(tempfile.mkdtemp(prefix=f"r{name}", dir="/tmp"))  # short: Ray's socket paths
        self.log = work / f"node-{name}.log"
        config_file = work / f"node-{name}.yaml"
        config_file.write_text(yaml.safe_dump(config or CONFIG))
        full_env = {**os.environ, **env, "PEFTSERVE_HOME": str(self.home), "PEFTSERVE_ADMIN_TOKEN": ADMIN,
                    "RAY_TMPDIR": str(self.ray_tmp), "PYTHONUNBUFFERED": "1"}
        full_env.pop("RAY_ADDRESS", None)
        self._out = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--base", str(base_dir),
                                      "--port", str(self.port), "--num-cpus", "2", "--config", str(config_file),
                                      "--grace-s", "2", *args],
                                     cwd=ROOT, env=full_env, stdout=self._out, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def wait_ready(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited: {self.log.read_text()[-3000:]}")
            if "ready on" in self.log.read_text():
                return
            time.sleep(0.3)
        raise TimeoutError(f"node {self.name} not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.http.close()
        stop_server_process(self.proc)
        self._out.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def logs(self) -> str:
        """This node's console output and every log file of its Ray session."""
        texts = [self.log.read_text(errors="replace")]
        for p in self.ray_tmp.rglob("*"):
            if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json") and p.stat().st_size < 50 << 20:
                texts.append(p.read_text(errors="replace"))
        return "\n".join(texts)

    def generate(self, adapter: str | None, inputs: str = "translate: the registry is shared") -> httpx.Response:
        params = {"max_new_tokens": 8, "details": True}
        if adapter:
            params["adapter_id"] = adapter
        return self.http.post("/generate", json={"inputs": inputs, "parameters": params})

    def register(self, name: str, source: str, replace: bool = False) -> httpx.Response:
        return self.http.post("/adapters", json={"name": name, "source": source, "replace": replace}, headers=AUTH)


def until(check, timeout_s: float, step_s: float = 0.05):
    """(value, seconds): poll `check()` until truthy or `timeout_s` (an HTTP error counts as not yet). seconds:
    from the start to when the check that succeeded was issued (a change served "within 2 s" is one that a
    request sent by then gets, however long that request then takes on a loaded machine); on a timeout, the
    time spent."""
    t0 = time.monotonic()
    while True:
        issued = time.monotonic() - t0
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value, issued
        if time.monotonic() - t0 > timeout_s:
            return value, time.monotonic() - t0
        time.sleep(step_s)


def token_ids(r: httpx.Response) -> list[int]:
    body = r.json()
    body = body[0] if isinstance(body, list) else body
    return [t["id"] for t in body["details"]["tokens"]]
