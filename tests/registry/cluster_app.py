"""Shared by the multi-node test modules: one real Ray cluster (a head and a worker node started with `ray
start`, separate temp dirs and PEFTSERVE_HOMEs) running deploy/cluster.yaml's layout with the tiny base,
PostgreSQL + S3 (moto behind a TCP proxy that can cut it) as the registry, and a load generator that
records every reply."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from loadtests import registry_servers
from loadtests.ray_cluster import ClusterApp, RayCluster
from loadtests.registry_servers import ADMIN, AUTH, TcpProxy

ROOT = Path(__file__).resolve().parents[2]
ENGINE = {"max_batch_rows": 8, "max_new_tokens_cap": 256, "default_max_new_tokens": 8, "max_queue": 256,
          "request_timeout_s": 60, "host_bytes": "64MiB",
          "device_slots": {"lora": 4, "ia3": 1, "bitfit": 1, "prompt": 1, "adapterhub": 1}}


def serve_config(autoscaling: dict | None = None) -> dict:
    """deploy/cluster.yaml with the tiny base on CPU (its placement and proxy settings kept)."""
    doc = yaml.safe_load((ROOT / "deploy/cluster.yaml").read_text())
    app = doc["applications"][0]
    app["args"] = {"engine": ENGINE, "demo_adapters": False, "metrics_push_interval_s": 0.5,
                   "node_cache_bytes": "256MiB"}
    for d in app["deployments"]:
        if d["name"] == "EngineReplica":
            d["ray_actor_options"] = {"num_cpus": 0.5}
            d.pop("autoscaling_config", None)
            if autoscaling:
                d["autoscaling_config"] = autoscaling
        else:
            d["ray_actor_options"].pop("num_gpus", None)
            d["ray_actor_options"]["num_cpus"] = 0.25 if d["name"] == "Ingress" else 0
    return doc


@dataclass
class Stack:
    cluster: RayCluster
    store_proxy: TcpProxy
    base_dir: Path
    adapters: dict[str, Path]
    app: ClusterApp | None = None

    @property
    def head(self):
        return self.cluster.head

    @property
    def worker(self):
        return self.cluster.workers[0]

    def deploy(self, replicas: int | None = 2, autoscaling: dict | None = None, name: str = "app") -> ClusterApp:
        if self.app is not None:
            self.app.stop()
        self.app = ClusterApp(self.cluster, self.base_dir, serve_config(autoscaling), replicas=replicas,
                              log_name=name)
        self.app.wait_ready()
        return self.app


def start_stack(work: Path, postgres, moto, base_dir: Path, adapters: dict[str, Path]) -> Stack:
    proxy = TcpProxy(moto.port)
    env = {**moto.env(), "AWS_ENDPOINT_URL": proxy.url, "PEFTSERVE_ADMIN_TOKEN": ADMIN,
           "PEFTSERVE_REGISTRY_URL": postgres.database("cluster"),
           "PEFTSERVE_STORE_URL": f"s3://{moto.bucket('cluster')}/registry"}
    cluster = RayCluster(work, env)
    cluster.start()
    return Stack(cluster, proxy, base_dir, adapters)


def stop_stack(stack: Stack) -> None:
    try:
        if stack.app is not None:
            stack.app.stop()
    finally:
        stack.cluster.stop()
        stack.store_proxy.stop()


def replicas_by_node(http: httpx.Client) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in http.get("/info").json()["replicas"]:
        out.setdefault(r["node_id"], []).append(r)
    return out


def until(check, timeout_s: float, step_s: float = 0.2):
    """loadtests.registry_servers.until, polling /info-sized checks less often (a cluster's replicas answer them)."""
    return registry_servers.until(check, timeout_s, step_s)


def generate(http: httpx.Client, adapter: str | None, inputs: str = "translate: scale out", tokens: int = 8):
    params = {"max_new_tokens": tokens, "details": True}
    if adapter:
        params["adapter_id"] = adapter
    return http.post("/generate", json={"inputs": inputs, "parameters": params})


def register(http: httpx.Client, name: str, source: Path, replace: bool = False) -> httpx.Response:
    return http.post("/adapters", json={"name": name, "source": str(source), "replace": replace}, headers=AUTH)


class LongStream(threading.Thread):
    """One streamed request of `tokens` tokens (EOS masked until then); records tokens and how it ended."""

    def __init__(self, url: str, adapter: str, tokens: int = 256):
        super().__init__(daemon=True)
        self.url, self.adapter, self.tokens = url, adapter, tokens
        self.received, self.ending = 0, None  # "done" | ("error", message) | ("transport", repr)
        self.first_token = threading.Event()

    def run(self) -> None:
        params = {"max_new_tokens": self.tokens, "min_new_tokens": self.tokens, "adapter_id": self.adapter}
        try:
            with httpx.Client(base_url=self.url, timeout=120) as http, http.stream(
                    "POST", "/generate_stream", json={"inputs": "a long answer", "parameters": params}) as r:
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        self.ending = ("error", event["error"])
                        return
                    self.received += 1
                    self.first_token.set()
                    if event.get("generated_text") is not None:
                        self.ending = "done"
                        return
        except httpx.HTTPError as e:
            self.ending = ("transport", repr(e))
        finally:
            self.first_token.set()


@dataclass
class Reply:
    t: float
    kind: str  # "generate" | "stream"
    status: int  # 0: transport error
    retry_after: str | None = None
    error: str | None = None  # error body / SSE error event / transport error
    node: str | None = None
    stream_error_after_tokens: bool = False


@dataclass
class Load:
    """`clients` threads sending requests (non-streaming and streaming, adapters and base) until stopped."""

    url: str
    adapters: list[str]
    clients: int = 4
    tokens: int = 16
    replies: list[Reply] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Reply]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        return self.replies

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=90) as http:
            n = 0
            while not self._stop.is_set():
                adapter = ([None, *self.adapters])[(i + n) % (1 + len(self.adapters))]
                self.replies.append(self._stream(http, adapter) if n % 3 == 2 else self._generate(http, adapter))
                n += 1

    def _params(self, adapter):
        p = {"max_new_tokens": self.tokens, "details": True}
        if adapter:
            p["adapter_id"] = adapter
        return p

    def _generate(self, http, adapter) -> Reply:
        t = time.monotonic()
        try:
            r = http.post("/generate", json={"inputs": "load on the cluster", "parameters": self._params(adapter)})
        except httpx.HTTPError as e:
            return Reply(t, "generate", 0, error=repr(e))
        return Reply(t, "generate", r.status_code, r.headers.get("retry-after"),
                     None if r.status_code == 200 else r.text, r.headers.get("x-peftserve-node"))

    def _stream(self, http, adapter) -> Reply:
        t = time.monotonic()
        try:
            with http.stream("POST", "/generate_stream", json={"inputs": "streamed load",
                                                               "parameters": self._params(adapter)}) as r:
                if r.status_code != 200:
                    r.read()
                    return Reply(t, "stream", r.status_code, r.headers.get("retry-after"), r.text)
                tokens = 0
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        return Reply(t, "stream", 200, error=event["error"], stream_error_after_tokens=True)
                    tokens += 1
                    if event.get("generated_text") is not None:
                        return Reply(t, "stream", 200)
                return Reply(t, "stream", 0, error=f"stream ended without a final event after {tokens} tokens")
        except httpx.HTTPError as e:
            return Reply(t, "stream", 0, error=repr(e))
