"""Virtual environments for reference libraries whose pins conflict with the project's (CTranslate2's converter
and AdapterHub need transformers 4; the project runs transformers 5), built once and reused.

`ensure_venv(root, pins)` creates `root` with torch 2.13.0 installed first (pip takes the local CPU wheel where
there is one; a bare `torch` pulls several GB of CUDA packages), then `pins`; a stamp file records what was
installed, and a file lock makes parallel callers wait for one build. Returns the venv's python.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

TORCH = "torch==2.13.0"
STAMP = ".peftserve-venv-ready"


def ensure_venv(root: Path, pins: Sequence[str], progress: Callable[[str], None] | None = None) -> str:
    python, stamp = root / "bin" / "python", root / STAMP
    want = " ".join((TORCH, *pins))
    if stamp.is_file() and stamp.read_text() == want:
        return str(python)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / (root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == want:
            return str(python)
        if progress is not None:
            progress(f"building the venv {root} (once: {', '.join(pins)})")
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, *pins], check=True)
        stamp.write_text(want)
    return str(python)
