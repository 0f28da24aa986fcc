"""Shared fixtures: one embedded tiny base per test session, built offline by the project itself."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Keep every test run's caches (embedded base, demo adapters, registry) out of the user's home.
os.environ.setdefault("PEFTSERVE_HOME", tempfile.mkdtemp(prefix="peftserve-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    from serve.engine.base import build_base

    return build_base(tmp_path_factory.mktemp("bases") / "tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir):
    """A LoadedBase (model, tokenizer, fingerprint) of the embedded tiny T5, fp32, CPU, eval mode."""
    from serve.engine.base import load_base

    return load_base(str(tiny_base_dir))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
