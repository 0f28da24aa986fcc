"""Two server processes (separate homes, separate Ray clusters) sharing one PostgreSQL catalog and one S3
bucket: what one registers or deletes, the other serves or refuses within 2 s; credentials stay out of
/info, errors and logs; a database outage degrades (cached adapters keep serving, writes get 503) and heals.

One pair of nodes for the whole module (two Ray clusters on 2 cores is the expensive part)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest

from loadtests.registry_servers import AUTH, AWS_SECRET, PG_PASSWORD, Node, token_ids, until
from tests.peft_zoo import save_peft

VISIBLE_S = 2.0


@pytest.fixture(scope="module")
def adapters_bucket(moto, tiny_base, tmp_path_factory):
    """Two real PEFT LoRA adapters of the tiny base under s3://<bucket>/lora-{1,2}/ (README excluded)."""
    from peft import LoraConfig

    bucket, root = moto.bucket("src"), tmp_path_factory.mktemp("lora")
    s3 = boto3.client("s3")
    for i in (1, 2):
        d = save_peft(tiny_base.model, LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=16,
                                                  init_lora_weights=False, target_modules=["q", "v"]),
                      root / f"lora-{i}", seed=10 + i)
        for p in d.iterdir():
            if p.name != "README.md":
                s3.put_object(Bucket=bucket, Key=f"lora-{i}/{p.name}", Body=p.read_bytes())
    return bucket


@pytest.fixture(scope="module")
def nodes(postgres, moto, tiny_base_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("two-nodes")
    env = {"PEFTSERVE_REGISTRY_URL": postgres.database("cluster"),
           "PEFTSERVE_STORE_URL": f"s3://{moto.bucket('store')}/registry", **moto.env()}
    a, b = Node("a", tiny_base_dir, work, env), Node("b", tiny_base_dir, work, env)
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        with ThreadPoolExecutor(2) as pool:  # both drain at once
            list(pool.map(Node.stop, (a, b)))


def test_registration_from_s3_on_a_is_served_by_b_with_the_same_tokens(nodes, adapters_bucket):
    a, b = nodes
    r = a.register("shared-lora", f"s3://{adapters_bucket}/lora-1/")
    assert r.status_code == 201, r.text
    served, waited = until(lambda: b.generate("shared-lora").status_code == 200, VISIBLE_S + 1)
    assert served and waited <= VISIBLE_S, waited
    on_a, on_b, base = a.generate("shared-lora"), b.generate("shared-lora"), b.generate(None)
    assert token_ids(on_a) == token_ids(on_b) != token_ids(base)
    assert b.http.get("/adapters/shared-lora").json()["digest"] == r.json()["digest"]


def test_deletion_on_a_is_refused_on_b_within_2s(nodes, adapters_bucket):
    a, b = nodes
    assert a.register("short-lived", f"s3://{adapters_bucket}/lora-2/").status_code == 201
    assert until(lambda: b.generate("short-lived").status_code == 200, VISIBLE_S + 1)[0]
    assert a.http.delete("/adapters/short-lived", headers=AUTH).status_code == 200
    refused, waited = until(lambda: b.generate("short-lived").status_code == 404, VISIBLE_S + 1)
    assert refused and waited <= VISIBLE_S, waited


def test_same_name_on_both_nodes_at_once_one_wins(nodes, adapters_bucket):
    a, b = nodes
    barrier = threading.Barrier(2)

    def go(node, prefix):
        barrier.wait()
        return node.register("contested", f"s3://{adapters_bucket}/{prefix}/").status_code

    with ThreadPoolExecutor(2) as pool:
        codes = sorted(pool.map(go, (a, b), ("lora-1", "lora-2")))
    assert codes == [201, 409], codes
    replaced = b.register("contested", f"s3://{adapters_bucket}/lora-1/", replace=True)
    assert replaced.status_code == 201 and replaced.json()["version"] == 2


def test_credentials_never_appear_in_info_errors_or_logs(nodes):
    a, b = nodes
    for n in nodes:
        info = n.http.get("/info").json()["registry"]
        assert info["catalog"].startswith("PostgreSQL postgresql://peft:***@127.0.0.1:"), info
        assert info["store"].startswith("S3 s3://store-")
    bad = a.register("x", "s3://no-such-bucket-anywhere/x/")
    assert bad.status_code == 400
    for text in (bad.text, a.logs(), b.logs()):
        assert PG_PASSWORD not in text and AWS_SECRET not in text


def test_database_outage_degrades_then_heals(nodes, postgres, adapters_bucket):
    a, b = nodes
    assert b.generate("shared-lora").status_code == 200
    postgres.stop()
    try:
        for n in nodes:  # adapters each node already serves keep serving
            r = n.generate("shared-lora")
            assert r.status_code == 200, r.text
        r = a.register("during-outage", f"s3://{adapters_bucket}/lora-2/")
        assert r.status_code == 503 and "adapter catalog (PostgreSQL" in r.json()["error"], r.text
        assert PG_PASSWORD not in r.text
        d = b.http.delete("/adapters/shared-lora", headers=AUTH)
        assert d.status_code == 503 and "PostgreSQL" in d.json()["error"]
        health = b.http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
        assert "catalog" in health.json()["reason"]
    finally:
        postgres.start()
    healed, _ = until(lambda: a.register("after-outage", f"s3://{adapters_bucket}/lora-2/").status_code == 201, 40,
                      step_s=0.5)
    assert healed
    assert until(lambda: b.generate("after-outage").status_code == 200, VISIBLE_S + 1)[0]
    assert until(lambda: b.http.get("/health").json() == {"status": "ok"}, 10)[0]
