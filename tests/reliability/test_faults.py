"""Faults on the real server: SIGKILL of the engine replica under load, a failing check_health, a request
deadline (408, work cancelled), and a full disk during registration. Runs last among the HTTP modules that
share the server (it restarts replicas); every test leaves the server serving every registered adapter."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from .harness import (
    AUTH,
    adapter_files,
    gen,
    is_engine_replica,
    record,
    register,
    registry_state,
    replica_info,
)
from .harness import upload as upload_files
from .metrics_util import metric_sum, scrape, wait_metric


def _serve_every_adapter(http) -> list[str]:
    names = [a["name"] for a in http.get("/adapters").json()["adapters"]]
    for name in names:
        r = gen(http, adapter=name, max_new_tokens=4)
        assert r.status_code == 200, (name, r.text)
    return names


def test_sigkill_engine_replica_under_load(server, http, registered):
    before = replica_info(http)
    pid = before["pid"]
    assert is_engine_replica(pid), f"pid {pid} is not an engine replica of this test run"
    names = _serve_every_adapter(http)
    killed_at: dict[str, float] = {}

    async def load():
        async with httpx.AsyncClient(base_url=server["url"], timeout=120) as c:
            async def one(i: int):
                t = time.monotonic()
                r = await c.post("/generate", json={"inputs": f"load {i}", "parameters": {
                    "adapter_id": names[i % len(names)], "max_new_tokens": 32}})
                return t, time.monotonic(), r.status_code, r.headers.get("Retry-After")

            async def killer():
                await asyncio.sleep(1.0)
                os.kill(pid, signal.SIGKILL)
                killed_at["t"] = time.monotonic()

            tasks, kill = [], asyncio.create_task(killer())
            for i in range(160):  # bounded: 160 requests over ~8 s of offered load
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(0.05)
            await kill
            return await asyncio.gather(*tasks)

    results = asyncio.run(load())
    statuses = [s for _, _, s, _ in results]
    assert set(statuses) <= {200, 503}, statuses  # in-flight requests fail cleanly, never 500
    for _, _, s, retry in results:
        if s == 503:
            assert retry is not None and int(retry) >= 1
    kill_t = killed_at["t"]
    served_after = [end for start, end, s, _ in results if s == 200 and start > kill_t]
    after = replica_info(http, stale=before, timeout_s=120)
    assert after["pid"] != pid
    recovery = (min(served_after) if served_after else time.monotonic()) - kill_t
    assert _serve_every_adapter(http) == names  # every registered adapter is still served
    record("sigkill_requests", len(results))
    record("sigkill_failed_503", statuses.count(503))
    record("sigkill_5xx_other_than_503", sum(s >= 500 and s != 503 for s in statuses))
    record("sigkill_recovery_seconds", round(recovery, 2))


def test_failing_check_health_gets_the_replica_replaced(server, http, registered):
    before = replica_info(http)
    t0 = time.monotonic()
    (Path(server["faults"]) / f"unhealthy-{before['pid']}").touch()
    after = replica_info(http, stale=before, timeout_s=120)
    record("health_check_replacement_seconds", round(time.monotonic() - t0, 2))
    assert after["pid"] != before["pid"]
    _serve_every_adapter(http)


def test_request_deadline_is_408_and_the_work_is_cancelled(server, http, registered):
    from serve.app import local

    args = {**server["args"], "engine": {**server["args"]["engine"], "request_timeout_s": 0.2,
                                         "max_batch_rows": 1}}
    local.redeploy(server["build"](args), server["url"], ready_timeout_s=180)
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=server["url"], timeout=60) as c:
                return await asyncio.gather(*(c.post("/generate", json={"inputs": "summarize: " + "data " * 30,
                                                                        "parameters": {"max_new_tokens": 256}})
                                              for _ in range(6)))

        rs = asyncio.run(burst())
        statuses = [r.status_code for r in rs]
        assert set(statuses) <= {200, 408} and statuses.count(408) >= 3, statuses
        for r in rs:
            if r.status_code == 408:
                assert "timed out" in r.json()["error"]
        timeouts = wait_metric(http, "peftserve_request_failures_total", statuses.count(408),
                               error="RequestTimeoutError")
        assert timeouts >= statuses.count(408)  # the engine dropped the rows (cancelled), not just the HTTP reply
        tokens = metric_sum(scrape(http), "peftserve_decode_tokens_total")
        time.sleep(1.5)
        assert metric_sum(scrape(http), "peftserve_decode_tokens_total") == tokens, "timed-out work kept decoding"
        record("timeout_408", statuses.count(408))
    finally:
        local.redeploy(server["build"](server["args"]), server["url"], ready_timeout_s=180)
    _serve_every_adapter(http)


def test_disk_full_during_registration_is_clean(server, http, registered, zoo):
    if not server["tmpfs"]:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root); disk-full is not simulated")
    registry = Path(server["registry"])
    st = os.statvfs(registry)
    free = st.f_bavail * st.f_frsize
    ballast = registry / "ballast.bin"
    before = registry_state(http, registry)
    try:
        with open(ballast, "wb") as f:  # leave ~40 KiB: the ~105 KiB LoRA cannot fit
            f.write(b"\0" * max(0, free - 40 * 1024))
        for how in ("path", "upload"):
            if how == "path":
                r = register(http, "no-space", zoo["lora-a"])
            else:
                r = upload_files(http, "no-space", adapter_files(zoo["lora-a"]))
            record(f"disk_full_status_{how}", r.status_code)
            assert r.status_code == 507, r.text
            assert "full" in r.json()["error"]
            after = registry_state(http, registry)
            assert after == before, "a failed registration left an entry or files behind"
            assert not list((registry / "store" / "tmp").iterdir())
    finally:
        ballast.unlink(missing_ok=True)
    r = register(http, "no-space", zoo["lora-a"])
    assert r.status_code == 201, r.text
    assert gen(http, adapter="no-space").status_code == 200
    assert http.delete("/adapters/no-space", headers=AUTH).status_code == 200
