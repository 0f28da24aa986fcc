"""Session-scoped real servers: one PostgreSQL cluster and one moto S3 server for every registry test."""

from __future__ import annotations

import os

import pytest

from loadtests.registry_servers import MotoServer, PostgresServer, moto_bin, pg_bin


@pytest.fixture(scope="session")
def postgres():
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed (apt-get install postgresql)")
    server = PostgresServer(bindir)
    try:
        server.start()
        server.create_role()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def moto():
    binary = moto_bin()
    if binary is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    server = MotoServer(binary)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())  # boto3's standard chain: what the server processes read too
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def pg_url(postgres) -> str:
    return postgres.database()


@pytest.fixture
def store_url(moto) -> str:
    return f"s3://{moto.bucket()}/adapters"
