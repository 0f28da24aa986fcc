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

from locust import HttpUser, constant, events, task

PLAN: dict = {}
_cursor = {"next": 0, "tokens": 0}


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
            json.dump({"issued": _cursor["next"], "tokens": _cursor["tokens"]}, f)


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
        if req is None:
            self.environment.runner.quit()
            return
        headers = {"Authorization": f"Bearer {PLAN['api_key']}"} if PLAN.get("api_key") else {}
        payload = {"inputs": req["inputs"],
                   "parameters": {"adapter_id": req["adapter"], "max_new_tokens": PLAN["max_new_tokens"]}}
        t0 = time.perf_counter()
        first = None
        with self.client.post(PLAN["path"], json=payload, headers=headers, stream=True,
                              name=req.get("label", "generate"), catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            tokens, done = 0, False
            try:
                for line in resp.iter_lines():
                    event = parse_sse(line)
                    if event is None:
                        continue
                    if "error" in event:
                        resp.failure(f"stream error: {event['error']}")
                        return
                    if first is None:
                        first = time.perf_counter() - t0
                    tokens += 1
                    done = done or event.get("details") is not None
            except Exception as e:  # noqa: BLE001 - a broken stream is a failed request
                resp.failure(f"broken stream: {e!r}")
                return
            if not done:
                resp.failure("stream ended without a final event")
                return
            _cursor["tokens"] += tokens
            resp.success()
        events.request.fire(request_type="TTFT", name="time to first token", response_time=1000 * first,
                            response_length=0, exception=None, context={})
