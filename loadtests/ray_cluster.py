"""A real multi-node Ray cluster on one machine, for the multi-node tests and benchmarks: a head and worker
nodes started with `ray start` (each with its own temp dir, PEFTSERVE_HOME and ports), `peftserve serve
--ray-address` deploying onto it, and node faults (SIGKILL of every process of one node) and restarts.

Nothing here is global: a node's processes are found by what names its temp dir (command line, open
files) or carries its marker in the environment, never by a process name, so other Ray instances on the
machine are left alone. The cluster uses token authentication with a token of its own (RAY_AUTH_TOKEN in
each process's environment; ~/.ray is not touched).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import yaml

from serve.app.local import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
MARKER = "PEFTSERVE_TEST_RAY_NODE"  # in the environment of every process a node starts


class RayNode:
    def __init__(self, name: str, work: Path, env: dict[str, str], num_cpus: float = 2,
                 head_address: str | None = None, resources: dict | None = None):
        self.name, self.num_cpus, self.head_address, self.resources = name, num_cpus, head_address, resources
        self.home = work / f"home-{name}"  # this node's PEFTSERVE_HOME: its node cache lives here
        self.env = {**env, "PEFTSERVE_HOME": str(self.home)}
        self.temp_dir: Path | None = None
        self._old_temp_dirs: list[Path] = []  # of earlier starts (a killed node's logs), removed by stop()
        self.port = free_port() if head_address is None else None
        self.node_id: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """`ray start` this node (a fresh temp dir each time: a restarted node is a new Ray node)."""
        if self.temp_dir is not None:
            self._old_temp_dirs.append(self.temp_dir)
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"r{self.name[:3]}", dir="/tmp"))  # short: socket paths
        self.marker = uuid.uuid4().hex
        cmd = [RAY, "start", f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               "--object-store-memory=200000000", f"--dashboard-agent-listen-port={free_port()}"]
        if self.head_address is None:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                    f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}"]
        else:
            cmd += [f"--address={self.head_address}", "--node-ip-address=127.0.0.1"]
        if self.resources:
            import json

            cmd.append(f"--resources={json.dumps(self.resources)}")
        out = subprocess.run(cmd, env={**os.environ, **self.env, MARKER: self.marker}, capture_output=True,
                             text=True, timeout=120)
        if out.returncode != 0:
            self.kill()
            raise RuntimeError(f"ray start ({self.name}) failed: {out.stderr[-3000:]}")
        self.node_id = self._raylet_node_id()

    def _raylet_node_id(self) -> str:
        for pid in self.pids():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for a in args:
                if a.startswith(b"--node_id="):
                    return a.split(b"=", 1)[1].decode()
        raise RuntimeError(f"no raylet found for node {self.name}")

    def pids(self) -> list[int]:
        """Every live process of this node: its temp dir on the command line or among its open files, or
        its marker in the environment (workers, agents and the raylet all have one of the three)."""
        if self.temp_dir is None:
            return []
        tmp, marker = str(self.temp_dir).encode(), f"{MARKER}={self.marker}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                if tmp in Path(f"/proc/{entry}/cmdline").read_bytes() or \
                        marker in Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
                    continue
                fds = Path(f"/proc/{entry}/fd")
                if any(os.readlink(fds / fd).startswith(str(self.temp_dir)) for fd in os.listdir(fds)):
                    found.append(int(entry))
            except OSError:
                continue
        return found

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 10.0) -> None:
        """Send `sig` to every process of this node (SIGKILL: the node dies as in a power loss)."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(0.2)

    def stop(self) -> None:
        self.kill(signal.SIGTERM, 5.0)
        self.kill(signal.SIGKILL, 10.0)
        for d in [*self._old_temp_dirs, self.temp_dir]:
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)


class RayCluster:
    """A head (no engine replicas unless it has CPUs to spare) and `workers` worker nodes."""

    def __init__(self, work: Path, env: dict[str, str] | None = None, workers: int = 1, head_cpus: float = 2,
                 worker_cpus: float = 2):
        self.work = work
        self.token = secrets.token_hex(16)
        self.env = {**(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.head = RayNode("head", work, self.env, head_cpus)
        self.workers = [RayNode(f"worker{i}", work, self.env, worker_cpus, head_address=self.head.address)
                        for i in range(workers)]

    @property
    def nodes(self) -> list[RayNode]:
        return [self.head, *self.workers]

    def start(self) -> None:
        try:
            for n in self.nodes:
                n.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for n in reversed(self.nodes):
            n.stop()

    def driver_env(self) -> dict[str, str]:
        """What a process connecting to this cluster needs (the cluster's token)."""
        return {**os.environ, **self.env}


class ClusterApp:
    """`peftserve serve --ray-address` deploying onto a cluster (the CLI process stays up; SIGTERM removes
    the app from the cluster)."""

    def __init__(self, cluster: RayCluster, base_dir: Path, config: dict, port: int | None = None,
                 replicas: int | None = None, log_name: str = "app"):
        self.cluster, self.port = cluster, port or free_port()
        self.log = cluster.work / f"{log_name}.log"
        path = cluster.work / f"{log_name}.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "serve.cli", "serve", "--ray-address", cluster.head.address, "--base",
               str(base_dir), "--port", str(self.port), "--config", str(path), "--grace-s", "2"]
        if replicas is not None:
            cmd += ["--replicas", str(replicas)]
        env = {**cluster.driver_env(), "PYTHONUNBUFFERED": "1",
               "PEFTSERVE_HOME": str(cluster.head.home)}  # the driver runs on the head
        self._out = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"peftserve serve exited: {self.log.read_text()[-4000:]}")
            if "ready on" in self.log.read_text():
                return
            time.sleep(0.3)
        raise TimeoutError(f"app not ready: {self.log.read_text()[-4000:]}")

    def replicas(self) -> list[dict]:
        return self.http.get("/info").json()["replicas"]

    def stop(self) -> None:
        from loadtests.registry_servers import stop_server_process

        self.http.close()
        stop_server_process(self.proc)
        self._out.close()
