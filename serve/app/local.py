"""Run the app on a local Ray: used by `peftserve serve`, the app tests and the benchmarks."""

from __future__ import annotations

import socket
import time

APP_NAME = "peftserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(application, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
          ready_timeout_s: float = 120.0) -> str:
    """Start Ray (if needed) and Serve on host:port, deploy `application`, wait for /health; returns the URL."""
    import ray
    from ray import serve as ray_serve

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 logging_level="WARNING", log_to_driver=True)
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(application, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_healthy(url, ready_timeout_s)
    return url


def wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
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


def stop() -> None:
    import ray
    from ray import serve as ray_serve

    try:
        ray_serve.shutdown()
    finally:
        ray.shutdown()
