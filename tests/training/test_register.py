"""`peftserve train --register URL`: the finished adapter is posted to a real running server and served."""

from __future__ import annotations

import httpx
import pytest

from serve.cli import main

ADMIN = "train-admin"


@pytest.fixture(scope="module")
def server(tiny_base_dir, tmp_path_factory):
    from serve.app import local
    from tests.serve.app_fixtures import app_args, build

    args = app_args(tiny_base_dir, tmp_path_factory.mktemp("train-registry"), admin_token=ADMIN,
                    engine={"device_slots": {"lora": 4, "ia3": 2, "bitfit": 2, "prompt": 2, "prefix": 2}})
    url = local.start(build(args), port=local.free_port(), num_cpus=2)
    yield url
    local.stop()


@pytest.mark.parametrize("kind", ["bitfit", "prompt", "dora", "adalora", "ptuning", "prefix"])
def test_register_on_finish_makes_the_adapter_servable(kind, server, task_files, tiny_base_dir, tmp_path, capsys):
    out = tmp_path / f"reg-{kind}"
    rc = main(["train", "--method", kind, "--base", str(tiny_base_dir), "--train", str(task_files[0]),
               "--eval", str(task_files[1]), "--input-field", "text", "--target-field", "label",
               "--max-steps", "3", "--max-eval-samples", "8", "--output", str(out), "--quiet",
               "--register", server, "--token", ADMIN])
    assert rc == 0, capsys.readouterr().err
    r = httpx.post(f"{server}/generate", timeout=60,
                   json={"inputs": "THE SOUP WAS GREAT.", "parameters": {"adapter_id": f"reg-{kind}",
                                                                        "max_new_tokens": 4}})
    assert r.status_code == 200, r.text
    # a wrong token is refused with the server's reason, and the adapter stays on disk
    rc = main(["train", "--method", kind, "--base", str(tiny_base_dir), "--train", str(task_files[0]),
               "--input-field", "text", "--target-field", "label", "--max-steps", "2", "--output",
               str(tmp_path / "second"), "--quiet", "--register", server, "--token", "wrong"])
    assert rc == 1 and "refused" in capsys.readouterr().err
    assert (tmp_path / "second" / "adapter_config.json").exists()
