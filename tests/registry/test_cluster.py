"""One Serve app on one real multi-node Ray cluster (a head and a worker node started with `ray start`,
separate temp dirs and homes), deployed with `peftserve serve --ray-address ... --replicas 2` and
deploy/cluster.yaml's layout, sharing PostgreSQL + S3:

- replicas spread over the nodes, each node with its own node cache, all listed in /info with node ids;
- a registration through the ingress is prefetched by every replica and served from both nodes;
- an adapter's requests stay on the replica that holds it (adapter-aware routing);
- an S3 outage: held adapters keep serving on both nodes, registration is a 503 naming the store, then heals;
- SIGKILL of the worker node under load: no 500 and no dropped connection, in-flight requests on it get a
  retryable 503, streams that had sent tokens end with an error event, the head's replica serves everything
  within 60 s, no registration is lost, and the replica count returns when the node does;
- autoscaling on queue length (min 1 / max 2): a burst scales up, idle scales down.

The tests share one cluster and run in file order (the fault test changes the cluster; the autoscaling
test redeploys last)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from loadtests.registry_servers import AUTH
from tests.peft_zoo import save_peft
from tests.registry.cluster_app import (
    Load,
    LongStream,
    generate,
    register,
    replicas_by_node,
    start_stack,
    stop_stack,
    until,
)

VISIBLE_S = 1.0  # registration -> prefetched on every replica
RECOVER_S = 60.0  # node lost -> every request served again
NAMES = [f"spread-{i}" for i in range(6)]


@pytest.fixture(scope="module")
def stack(postgres, moto, tiny_base, tiny_base_dir, tmp_path_factory):
    from peft import LoraConfig

    work = tmp_path_factory.mktemp("cluster")
    adapters = {name: save_peft(tiny_base.model, LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, lora_alpha=8,
                                                            init_lora_weights=False, target_modules=["q", "v"]),
                                work / "src" / name, 60 + i)
                for i, name in enumerate([*NAMES, "late-0", "late-1", "fault-reg"])}
    s = start_stack(work, postgres, moto, tiny_base_dir, adapters)
    try:
        s.deploy(replicas=2)
        yield s
    finally:
        stop_stack(s)


@pytest.fixture(scope="module")
def http(stack):
    return stack.app.http


def test_replicas_spread_over_the_nodes_and_info_lists_them(stack, http):
    nodes, _ = until(lambda: n if len(n := replicas_by_node(http)) == 2 else None, 30)
    assert nodes and set(nodes) == {stack.head.node_id, stack.worker.node_id}, nodes
    replicas = [r for rs in nodes.values() for r in rs]
    assert len(replicas) == 2 and len({r["pid"] for r in replicas}) == 2
    assert {r["sync"]["mode"] for r in replicas} == {"notify"}  # LISTEN/NOTIFY on both nodes
    caches = {r["node_id"]: r["node_cache"] for r in replicas}
    assert caches[stack.head.node_id].startswith(str(stack.head.home))  # each node's own cache directory
    assert caches[stack.worker.node_id].startswith(str(stack.worker.home))


def test_a_registration_is_prefetched_by_every_replica_and_served_from_both_nodes(stack, http):
    for name in NAMES:
        r = register(http, name, stack.adapters[name])
        assert r.status_code == 201, r.text
    digest = {name: http.get(f"/adapters/{name}").json()["digest"] for name in NAMES}

    def everywhere():
        reps = [r for rs in replicas_by_node(http).values() for r in rs]
        return len(reps) == 2 and all({c["name"] for c in r["sync"]["recent"]} >= set(NAMES) for r in reps)

    assert until(everywhere, 10)[0]
    lags = [c["lag_s"] for rs in replicas_by_node(http).values() for r in rs for c in r["sync"]["recent"]
            if c["name"] in NAMES]
    assert max(lags) <= VISIBLE_S, lags  # commit -> servable on each replica
    served = {}
    for name in NAMES:
        reply = generate(http, name)
        assert reply.status_code == 200, reply.text
        served[name] = reply.headers["x-peftserve-node"]
        time.sleep(0.3)  # the replica's new id reaches the routers (pushed every 0.1 s): the next goes elsewhere
    assert set(served.values()) == {stack.head.node_id, stack.worker.node_id}, served  # new ids spread
    for node in (stack.head, stack.worker):  # the files were fetched into each node's own cache
        cached = {p.name for p in (node.home / "registry/node-cache/objects").iterdir()}
        assert cached >= set(digest.values())


def test_an_adapters_requests_stay_on_the_replica_that_holds_it(http):
    for name in NAMES[:3]:
        replicas = {generate(http, name).headers["x-peftserve-replica"] for _ in range(8)}
        assert len(replicas) == 1, (name, replicas)


def test_store_outage_on_two_nodes_keeps_held_adapters_serving_then_heals(stack, http):
    stack.store_proxy.stop()
    try:
        nodes = set()
        for name in NAMES:  # held on both nodes' replicas: served without the store
            reply = generate(http, name)
            assert reply.status_code == 200, reply.text
            nodes.add(reply.headers["x-peftserve-node"])
        assert nodes == {stack.head.node_id, stack.worker.node_id}
        r = register(http, "late-0", stack.adapters["late-0"])
        assert r.status_code == 503 and "adapter store (S3" in r.json()["error"], r.text
        assert r.headers.get("retry-after")
    finally:
        stack.store_proxy.start()
    healed, _ = until(lambda: register(http, "late-0", stack.adapters["late-0"]).status_code == 201, 30, 1.0)
    assert healed
    assert generate(http, "late-0").status_code == 200


def test_worker_node_sigkill_under_load_then_it_returns(stack, http):
    on_worker = [n for n in NAMES if generate(http, n).headers["x-peftserve-node"] == stack.worker.node_id]
    assert on_worker  # routing keeps these on the worker's replica
    load = Load(stack.app.url, NAMES[:4], clients=6, tokens=32).start()
    time.sleep(3)
    streams = [LongStream(stack.app.url, on_worker[0]) for _ in range(2)]
    for st in streams:
        st.start()
    for st in streams:
        assert st.first_token.wait(30)
    killed = time.monotonic()
    stack.worker.kill()  # every process of the node: raylet, workers, agents
    dead = time.monotonic()
    registered: dict[str, int] = {}

    def register_during_fault():  # retried on 503 (what a client does); none may be lost
        for i in range(3):
            name = f"during-fault-{i}"
            while time.monotonic() - killed < RECOVER_S:
                code = register(http, name, stack.adapters["fault-reg"]).status_code
                if code != 503:
                    registered[name] = code
                    break
                time.sleep(1)

    writer = threading.Thread(target=register_during_fault)
    writer.start()
    try:
        recovered, _ = until(lambda: _all_ok_since(load, max(dead, time.monotonic() - 5), min_count=8),
                             RECOVER_S + 10, 1.0)
    finally:
        replies = load.stop()
        writer.join()
    for st in streams:  # streams that had sent tokens end with an error event, not a cut connection
        st.join(60)
        assert st.received >= 1 and st.ending[0] == "error" and "unavailable" in st.ending[1], (st.received,
                                                                                               st.ending)
    failures = [r for r in replies if r.status not in (200, 503) or r.status == 0]
    assert not failures, failures[:5]  # never a 500, never a dropped connection
    for r in replies:
        if r.status == 503:
            assert r.retry_after and r.error and '"error"' in r.error, r
    hit = [r for r in replies if r.status == 503 or r.stream_error_after_tokens]
    recovery = max((r.t for r in hit), default=killed)  # when the last failing request started
    assert recovered and recovery - killed <= RECOVER_S, (recovery - killed, len(replies))
    assert sum(r.t > dead and r.node == stack.head.node_id for r in replies) >= 8  # the survivor served
    assert registered == {f"during-fault-{i}": 201 for i in range(3)}, registered
    listed = {a["name"] for a in http.get("/adapters").json()["adapters"]}
    assert listed >= {*NAMES, "late-0", *registered}
    print(f"node SIGKILL: {sum(r.status == 503 for r in hit)} 503s, "
          f"{sum(r.stream_error_after_tokens for r in hit) + len(streams)} stream error events after tokens, "
          f"{len(replies) + len(streams)} requests; "
          f"every request served again {max(0.0, recovery - killed):.1f} s after the kill")

    stack.worker.start()  # the node returns (a new Ray node on the same machine)
    t0 = time.monotonic()
    back, waited = until(lambda: set(replicas_by_node(http)) == {stack.head.node_id, stack.worker.node_id}, 120, 1.0)
    assert back, replicas_by_node(http)
    print(f"replica count restored {waited:.1f} s after the node restarted")
    for name in NAMES:
        assert generate(http, name).status_code == 200
    assert time.monotonic() - t0 < 120


def _all_ok_since(load: Load, since: float, min_count: int) -> bool:
    recent = [r for r in list(load.replies) if r.t >= since]
    return len(recent) >= min_count and all(r.status == 200 and not r.stream_error_after_tokens for r in recent)


def test_autoscaling_on_queue_length_scales_up_under_a_burst_and_back_down(stack):
    app = stack.deploy(replicas=None, name="autoscaled", autoscaling={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
        "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2})
    http = app.http
    assert until(lambda: len(app.replicas()) == 1, 30)[0]
    stop = threading.Event()

    def burst():
        while not stop.is_set():
            generate(http, None, tokens=32)

    with ThreadPoolExecutor(12) as pool:
        for _ in range(12):
            pool.submit(burst)
        up, t_up = until(lambda: len(app.replicas()) == 2, 90, 0.5)
        stop.set()
    assert up, app.replicas()
    down, t_down = until(lambda: len(app.replicas()) == 1, 90, 0.5)
    assert down, app.replicas()
    print(f"autoscaling: 1 -> 2 replicas {t_up:.1f} s into the burst, back to 1 {t_down:.1f} s after it")
    assert http.delete(f"/adapters/{NAMES[0]}", headers=AUTH).status_code == 200  # still a working app
