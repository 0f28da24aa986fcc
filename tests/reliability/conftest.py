"""One real Serve app for the whole reliability package (Ray started once, ~15 s), torn down after its last
test; every module attacks the same server and leaves it as it found it (fault tests restore it).

The registry lives on a 16 MiB tmpfs when this machine lets us mount one (root), so disk-full is real.
`PEFTSERVE_RELIABILITY_FIGURES=<path>` makes the session write its figures there (tests/reliability/report.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.serve.app_fixtures import app_args, make_zoo

from .harness import ADMIN, FAULT_DIR_ENV, FIGURES_ENV, mount_tmpfs, unmount, write_figures

ENGINE = {"max_batch_rows": 4, "max_queue": 12, "max_new_tokens_cap": 256, "default_max_new_tokens": 8,
          "request_timeout_s": 60, "max_input_tokens": 256}
MAX_BODY, MAX_UPLOAD = 64 * 1024, 256 * 1024
# Health checks every second (default 10 s) so that a failing check_health is acted on within CI time.
DEPLOYMENTS = {"EngineReplica": {"health_check_period_s": 1, "health_check_timeout_s": 10}}


def build(args: dict):
    from serve.app.builder import build_app
    from serve.app.config import AppConfig

    return build_app(AppConfig.model_validate(args), {k: dict(v) for k, v in DEPLOYMENTS.items()})


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


def pytest_sessionfinish(session, exitstatus):
    from .harness import FIGURES

    out = os.environ.get(FIGURES_ENV)
    if out and FIGURES:
        write_figures(out)


@pytest.fixture(scope="package")
def zoo(tiny_base, tmp_path_factory):
    return make_zoo(tiny_base, tmp_path_factory.mktemp("rel-zoo"))


@pytest.fixture(scope="package")
def server(tiny_base_dir):
    from serve.app import local

    work = Path(tempfile.mkdtemp(prefix="peftserve-rel-"))
    mnt = work / "registry"
    tmpfs = mount_tmpfs(mnt, "16m")
    fault_dir = work / "faults"
    fault_dir.mkdir()
    old_env = os.environ.get(FAULT_DIR_ENV)
    os.environ[FAULT_DIR_ENV] = str(fault_dir)  # inherited by the Ray workers started below
    args = app_args(tiny_base_dir, mnt, admin_token=ADMIN, max_body_bytes=MAX_BODY, max_upload_bytes=MAX_UPLOAD,
                    engine=dict(ENGINE))
    try:
        url = local.start(build(args), port=local.free_port(), num_cpus=4)
        yield {"url": url, "args": args, "build": build, "registry": mnt, "tmpfs": tmpfs, "faults": fault_dir,
               "port": int(url.rsplit(":", 1)[1])}
    finally:
        local.stop()
        if old_env is None:
            os.environ.pop(FAULT_DIR_ENV, None)
        else:
            os.environ[FAULT_DIR_ENV] = old_env
        if tmpfs:
            unmount(mnt)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="package")
def http(server):
    with httpx.Client(base_url=server["url"], timeout=60) as c:
        yield c


@pytest.fixture(scope="package")
def registered(http, zoo):
    """lora-a, ia3-a, bitfit-a, prompt-a registered once; tests that remove one put it back."""
    from .harness import register

    for name in ("lora-a", "ia3-a", "bitfit-a", "prompt-a"):
        r = register(http, name, zoo[name])
        assert r.status_code in (201, 409), r.text
    return ("lora-a", "ia3-a", "bitfit-a", "prompt-a")
