"""The AdapterHub oracle's own virtual environment: `adapters==1.3.0` pins transformers 4.57, which
conflicts with the project's transformers 5, so it never goes into the project's venv.

    python = oracle_python()          # builds the venv once (a few minutes), then reuses it
    subprocess.run([python, "tests/adapterhub/make_fixtures.py", "--out", ...], check=True)

Where: $PEFTSERVE_ORACLE_VENV, else ~/.cache/peftserve/adapterhub-oracle-venv. torch 2.13.0 goes first
so pip takes the local CPU wheel where there is one (a bare `torch` pulls several GB of CUDA packages).
"""

from __future__ import annotations

import os
from pathlib import Path

from loadtests.side_venv import ensure_venv

PINS = ("transformers==4.57.6", "adapters==1.3.0", "safetensors")


def venv_dir() -> Path:
    env = os.environ.get("PEFTSERVE_ORACLE_VENV")
    return Path(env) if env else Path.home() / ".cache" / "peftserve" / "adapterhub-oracle-venv"


def oracle_python() -> str:
    """Path of the oracle venv's python, creating the venv first if needed (file-locked: parallel tests wait)."""
    return ensure_venv(venv_dir(), PINS)


if __name__ == "__main__":
    print(oracle_python())
