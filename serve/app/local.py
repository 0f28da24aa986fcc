"""Run the app on a local Ray, or on a running cluster: used by `peftserve serve`, the app tests and the
benchmarks."""

from __future__ import annotations

import socket
import threading
import time

APP_NAME = "peftserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(application, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
          ready_timeout_s: float = 120.0, stop=None, address: str | None = None,
          proxy_location: str | None = None) -> str:
    """Start Ray (or connect to the cluster at `address`) and Serve on host:port, deploy `application`, wait
    for /health; returns the URL. On a cluster the proxies bind host:port on the nodes (`proxy_location`:
    Serve's EveryNode by default, HeadOnly, Disabled)."""
    import ray
    from ray import serve as ray_serve

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        else:
            # "local": a new instance, never a cluster some `ray start` left on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                     logging_level="WARNING", log_to_driver=True)
    ray_serve.start(http_options={"host": host, "port": port},
                    **({"proxy_location": proxy_location} if proxy_location else {}))
    ray_serve.run(application, name=APP_NAME, route_prefix="/")
    url = f"http://{probe_host(host, address)}:{port}"
    wait_healthy(url, ready_timeout_s, stop)
    return url


def probe_host(host: str, address: str | None) -> str:
    """Where this process reaches the app: the bind address, or for a wildcard bind this machine (a local
    Ray) or the cluster's head (every cluster runs a proxy there)."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    head = (address or "").rsplit(":", 1)[0].removeprefix("ray://")
    return head if head and head != "auto" else "127.0.0.1"


def wait_healthy(url: str, timeout_s: float, stop=None) -> None:
    """Until /health answers 200; returns early once `stop` (a threading.Event) is set."""
    import httpx

    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return
        try:
            r = httpx.get(f"{url}/health", timeout=10)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.3)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s}s (last: {last})")


def redeploy(application, url: str, ready_timeout_s: float = 120.0) -> None:
    """Delete and re-run the app on the running Serve instance: fresh replica processes."""
    from ray import serve as ray_serve

    ray_serve.delete(APP_NAME)
    ray_serve.run(application, name=APP_NAME, route_prefix="/")
    wait_healthy(url, ready_timeout_s)


def stop(grace_s: float = 0.0, joined: bool = False, front: str = "Ingress") -> None:
    """Shut Serve down (replicas finish their in-flight requests first, for up to their graceful-shutdown
    timeout), then Ray, then any process this Ray session left behind (its dashboard and runtime-env
    agents outlive `ray.shutdown()`). On a cluster this process `joined`, only this app is removed (and
    Serve, if no other application runs); the cluster keeps running. `front`: the deployment that answers HTTP
    (Ingress, or EngineReplica in the combined topology), which the drain asks what is in flight.

    A SIGTERM sent to the whole process group or cgroup (systemd's default KillMode, `timeout`, `kill -TERM
    -PGID`) also reaches the local Ray's GCS, whose group this process leads: it stops answering, and Serve's
    calls would block until Ray's 60 s GCS reconnect timeout aborts this process. So they run on a thread while
    the GCS is probed; when it stops answering, the drain and Serve's shutdown are abandoned, and Ray is shut
    down and its leftovers reaped."""
    import ray
    from ray import serve as ray_serve

    session_dir = _session_dir()

    def serve_down() -> None:
        if grace_s > 0:
            _drain(grace_s, front)
        if joined:
            ray_serve.delete(APP_NAME)
            if not ray_serve.status().applications:
                ray_serve.shutdown()  # frees the HTTP port on every node for the next deployment
        else:
            ray_serve.shutdown()

    try:
        if not _run_while_gcs_answers(serve_down):
            print("peftserve: Ray's own processes were stopped too (a signal to the whole process group?); "
                  "no drain, stopping what is left", flush=True)
    finally:
        ray.shutdown()
        if session_dir:
            reap_session(session_dir)


def _run_while_gcs_answers(fn, probe_every_s: float = 1.0) -> bool:
    """Run `fn`; False if Ray's GCS stops answering before `fn` returns (`fn` is then left behind on a daemon
    thread, blocked in Ray)."""
    done, failure = threading.Event(), []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="peftserve-serve-shutdown", daemon=True).start()
    while not done.wait(probe_every_s):
        if not _gcs_answers():
            return False
    if failure:
        raise failure[0]
    return True


def _gcs_answers(timeout_s: float = 2.0) -> bool:
    import ray

    try:
        ray._private.worker.global_worker.gcs_client.internal_kv_exists(b"peftserve-probe", b"peftserve",
                                                                        timeout=timeout_s)
        return True
    except Exception:  # noqa: BLE001 - timed out, unavailable, or Ray not initialised: it does not answer
        return False


def _drain(grace_s: float, front: str) -> None:
    """Wait until no HTTP request is in flight anywhere in the app, or `grace_s` passes."""
    from ray import serve as ray_serve

    deadline = time.monotonic() + grace_s
    handle = ray_serve.get_deployment_handle(front, APP_NAME)
    while time.monotonic() < deadline:
        try:
            if handle.in_flight.remote().result(timeout_s=5) == 0:
                return
        except Exception:  # noqa: BLE001 - an app without the method, or already gone: nothing to drain
            return
        time.sleep(0.2)


def _session_dir() -> str | None:
    try:
        import ray

        node = ray._private.worker.global_worker.node  # the node this driver started (None if it connected)
        return node.get_session_dir_path() if node is not None and node.head else None
    except Exception:  # noqa: BLE001 - not initialised, or a Ray without this attribute
        return None


def reap_session(session_dir: str, timeout_s: float = 10.0) -> list[int]:
    """SIGTERM (then SIGKILL) every process whose command line names `session_dir`; returns their pids."""
    import os
    import signal

    def leftovers() -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if session_dir.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
        return pids

    if not os.path.isdir("/proc"):
        return []
    found = leftovers()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in leftovers():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s / 2
        while leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)
    return found
