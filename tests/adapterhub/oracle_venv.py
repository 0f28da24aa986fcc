"""The AdapterHub oracle's own virtual environment: `adapters==1.3.0` pins transformers 4.57, which
conflicts with the project's transformers 5, so it never goes into the project's venv.

    python = oracle_python()          # builds the venv once (a few minutes), then reuses it
    subprocess.run([python, "tests/adapterhub/make_fixtures.py", "--out", ...], check=True)

Where: $PEFTSERVE_ORACLE_VENV, else ~/.cache/peftserve/adapterhub-oracle-venv. torch 2.13.0 goes first
so pip takes the local CPU wheel where there is one (a bare `torch` pulls several GB of CUDA packages).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

PINS = ("transformers==4.57.6", "adapters==1.3.0", "safetensors")
TORCH = "torch==2.13.0"
READY = ".peftserve-oracle-ready"


def venv_dir() -> Path:
    env = os.environ.get("PEFTSERVE_ORACLE_VENV")
    return Path(env) if env else Path.home() / ".cache" / "peftserve" / "adapterhub-oracle-venv"


def oracle_python() -> str:
    """Path of the oracle venv's python, creating the venv first if needed (file-locked: parallel tests wait)."""
    root = venv_dir()
    python = root / "bin" / "python"
    stamp = root / READY
    want = " ".join((TORCH, *PINS))
    if stamp.is_file() and stamp.read_text() == want:
        return str(python)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / (root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == want:
            return str(python)
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, *PINS], check=True)
        stamp.write_text(want)
    return str(python)


if __name__ == "__main__":
    print(oracle_python())
