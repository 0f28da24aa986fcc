"""Locust scenario for the peftserve HTTP API: walk a precomputed request plan, stream each answer.

Run by `loadtests/http_load.py` (which writes the plan, registers the adapters and scrapes /metrics),
or by hand:

    PEFTSERVE_LOAD_PLAN=plan.json locust -f loadtests/locustfile.py --headless -u 8 -r 8 \
        --run-time 60s --host http://127.0.0.1:8000

The plan (JSON) holds `requests` (list of {"inputs", "adapter"}), `max_new_tokens`, `path` (the TGI
streaming route) and optional `api_key`. Users share one cursor over the plan, so the request budget
is exact; when it is spent the run stops even if --run-time has time left. Each request records two
locust entries: the whole streamed request (its adapter's popularity class as name) and "TTFT" (time
from sending to the first token event). Errors (non-200, malformed stream) are locust failures.
"""

from __future__ import annotations

import json
import os
import time

import gevent
from locust import HttpUser, constant, events, task
from locust.exception import StopUser

PLAN: dict = {}
_cursor = {"next": 0, "ended": 0, "tokens": 0, "finished": 0, "first_start": None, "last_end": None,
           "latencies": [], "ttfts": [], "errors": {}}


def load_plan(path: str) -> dict:
    plan = json.loads(open(path).read())
    if not isinstance(plan.get("requests"), list) or not plan["requests"]:
        raise ValueError(f"{path}: a load plan needs a non-empty 'requests' list")
    plan.setdefault("path", "/generate_stream")
    plan.setdefault("max_new_tokens", 8)
    return plan


@events.init.add_listener
def _on_init(environment, **_):
    path = os.environ.get("PEFTSERVE_LOAD_PLAN")
    if not path:
        raise SystemExit("set PEFTSERVE_LOAD_PLAN to a plan file (see loadtests/http_load.py)")
    PLAN.clear()
    PLAN.update(load_plan(path))


@events.quitting.add_listener
def _on_quit(environment, **_):
    out = os.environ.get("PEFTSERVE_LOAD_SIDE")
    if out:  # what locust's CSV does not know: tokens streamed back, requests issued
        with open(out, "w") as f:
            json.dump({"issued": _cursor.pop("next"), **_cursor}, f)


def next_request() -> dict | None:
    i = _cursor["next"]
    if i >= len(PLAN["requests"]):
        return None
    _cursor["next"] = i + 1
    return PLAN["requests"][i]


def parse_sse(line: bytes) -> dict | None:
    """One `data: {...}` line of a TGI stream -> its JSON; other lines (comments, blanks) -> None."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    body = line[5:].strip()
    if not body or body == b"[DONE]":
        return None
    return json.loads(body)


class StreamingUser(HttpUser):
    wait_time = constant(0)  # closed loop: each user sends its next request when the last one ends

    @task
    def generate(self):
        req = next_request()
        if req is None:  # budget handed out: this user is done; the last request to end stops the run
            raise StopUser()
        try:
            self._send(req)
        finally:
            _cursor["ended"] += 1
            if _cursor["ended"] == len(PLAN["requests"]):  # quit from its own greenlet, not this user's
                gevent.spawn(self.environment.runner.quit)

    def _send(self, req: dict) -> None:
        headers = {"Authorization": f"Bearer {PLAN['api_key']}"} if PLAN.get("api_key") else {}
        payload = {"inputs": req["inputs"],
                   "parameters": {"adapter_id": req["adapter"], "max_new_tokens": PLAN["max_new_tokens"]}}
        t0 = time.perf_counter()
        if _cursor["first_start"] is None:  # wall clock: the span of the whole load
            _cursor["first_start"] = time.time()
        with self.client.post(PLAN["path"], json=payload, headers=headers, stream=True,
                              name=req.get("label", "generate"), catch_response=True) as resp:
            if resp.status_code != 200:
                return _fail(resp, f"HTTP {resp.status_code}", resp.text[:200])
            first, tokens, done = None, 0, False
            try:
                for line in resp.iter_lines():
                    event = parse_sse(line)
                    if event is None:
                        continue
                    if "error" in event:
                        return _fail(resp, "stream error", str(event["error"]))
                    if first is None:
                        first = time.perf_counter() - t0
                    tokens += 1
                    done = done or event.get("details") is not None
            except Exception as e:  # noqa: BLE001 - a broken stream is a failed request
                return _fail(resp, "broken stream", repr(e))
            total = time.perf_counter() - t0
            # locust timed the response headers; the request ends with its last event
            resp.request_meta["response_time"] = 1000 * total
            if not done:
                return _fail(resp, "no final event", "stream ended without a final event")
            _cursor["tokens"] += tokens
            _cursor["finished"] += 1
            _cursor["last_end"] = time.time()
            _cursor["latencies"].append(total)
            _cursor["ttfts"].append(first)
            resp.success()
        events.request.fire(request_type="TTFT", name="time to first token", response_time=1000 * first,
                            response_length=0, exception=None, context={})


def _fail(resp, kind: str, detail: str) -> None:
    _cursor["errors"][kind] = _cursor["errors"].get(kind, 0) + 1
    resp.failure(f"{kind}: {detail}")
