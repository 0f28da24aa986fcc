"""deploy/kuberay/rayservice.yaml: its serveConfigV2 is a valid Serve config whose args are a valid AppConfig
with an S3 store, and every pod takes the catalog URL and admin token from a secret, never from the file."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_rayservice_manifest_is_a_valid_multi_node_deployment():
    from ray.serve.schema import ServeDeploySchema

    from serve.app.config import AppConfig

    doc = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    config = AppConfig.model_validate(serve_config["applications"][0]["args"])
    assert config.store_url.startswith("s3://") and config.registry_url is None  # the password stays in a secret
    engine = {d["name"]: d for d in serve_config["applications"][0]["deployments"]}["EngineReplica"]
    assert engine["max_replicas_per_node"] == 1 and "num_replicas" not in engine
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(engine["autoscaling_config"])
    cluster = doc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert "secretKeyRef" in env["PEFTSERVE_REGISTRY_URL"]["valueFrom"]
        assert "secretKeyRef" in env["PEFTSERVE_ADMIN_TOKEN"]["valueFrom"]


def test_cluster_config_spreads_engine_replicas_and_pins_the_entry_to_the_head():
    from ray.serve.schema import ServeDeploySchema

    from serve.app.config import AppConfig

    doc = yaml.safe_load((ROOT / "deploy/cluster.yaml").read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    config = AppConfig.model_validate(app["args"])
    assert config.registry_url is None and config.store_url is None  # every node's environment holds them
    deployments = {d["name"]: d for d in app["deployments"]}
    engine = deployments["EngineReplica"]
    assert engine["max_replicas_per_node"] == 1
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(engine["autoscaling_config"])
    for name in ("Ingress", "MetricsHub"):
        assert "node:__internal_head__" in deployments[name]["ray_actor_options"]["resources"]
    assert doc["proxy_location"] == "HeadOnly"
