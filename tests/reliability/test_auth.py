"""Auth and exposure: registry writes need the admin token (401 without, 403 wrong) and change nothing when
refused; the HTTP server listens on 127.0.0.1 only and Ray's dashboard is not exposed by default."""

from __future__ import annotations

import inspect

import pytest

from .harness import ADMIN, adapter_files, bump, listening_addresses, record, registry_state


@pytest.mark.parametrize("headers,status", [
    ({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": f"Bearer {ADMIN}x"}, 403),
    ({"Authorization": f"Basic {ADMIN}"}, 401), ({"Authorization": "Bearer"}, 401),
    ({"Authorization": ADMIN}, 401), ({"Authorization": f"bearer {ADMIN[:-1]}"}, 403),
], ids=["none", "wrong", "longer", "basic", "empty", "no-scheme", "prefix"])
def test_admin_writes_refused_without_the_token(server, http, registered, zoo, headers, status):
    before = registry_state(http, server["registry"])
    attempts = [
        http.post("/adapters", json={"name": "sneaky", "source": str(zoo["lora-a"])}, headers=headers),
        http.post("/adapters", data={"name": "sneaky"}, headers=headers,
                  files=[("files", f) for f in adapter_files(zoo["lora-a"])]),
        http.post("/adapters", json={"name": "lora-a", "source": str(zoo["ia3-a"]), "replace": True},
                  headers=headers),
        http.delete("/adapters/lora-a", headers=headers),
    ]
    for r in attempts:
        bump("auth_cases")
        assert r.status_code == status, r.text
        assert r.json()["error_type"] == "auth" and "token" in r.json()["error"].lower()
    assert registry_state(http, server["registry"]) == before


def test_reads_and_generation_stay_open_without_an_api_token(http, registered):
    assert http.get("/adapters").status_code == 200
    assert http.get("/health").status_code == 200


def test_bound_to_loopback_by_default(server):
    from serve.app import launch, local

    assert listening_addresses(server["port"]) == {"127.0.0.1"}
    assert inspect.signature(local.start).parameters["host"].default == "127.0.0.1"
    import argparse

    parser = argparse.ArgumentParser()
    launch.add_arguments(parser)
    assert parser.parse_args([]).host == "127.0.0.1"
    # Ray's dashboard (port 8265 by default) is not started, so nothing listens on it off-loopback
    assert listening_addresses(8265) <= {"127.0.0.1", "::1"}
    record("http_listen_addresses", sorted(listening_addresses(server["port"])))
