"""Shared by the reliability modules: the one real Serve app (on 127.0.0.1, registry on a small tmpfs when
this machine allows mounting one), HTTP helpers, registry/store fingerprints, and the figures collector."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx

ADMIN = "reliability-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
FAULT_DIR_ENV = "PEFTSERVE_FAULT_DIR"  # the replica honours fault-injection files only when this is set
FIGURES_ENV = "PEFTSERVE_RELIABILITY_FIGURES"  # where the session writes its figures (report runner sets it)
FIGURES: dict[str, object] = {}


def record(key: str, value) -> None:
    """A figure for loadtests/results/reliability.json (cases tried, 5xx count, recovery s, RSS drift)."""
    FIGURES[key] = value


def bump(key: str, n: int = 1) -> None:
    FIGURES[key] = int(FIGURES.get(key, 0)) + n


def write_figures(path: str | Path) -> None:
    """Merge this session's figures into `path` (a CI run and a soak run each add their keys)."""
    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(FIGURES)
    old["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


# ---- small tmpfs (disk-full tests) ---------------------------------------------------------------

def mount_tmpfs(where: Path, size: str) -> bool:
    """Mount a size-limited tmpfs at `where`; False where this machine does not allow it (not root)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


# ---- HTTP helpers --------------------------------------------------------------------------------

def gen(http: httpx.Client, inputs="translate: hello world", adapter=None, **params) -> httpx.Response:
    params.setdefault("max_new_tokens", 8)
    if adapter:
        params["adapter_id"] = adapter
    return http.post("/generate", json={"inputs": inputs, "parameters": params})


def register(http: httpx.Client, name, source, replace=False, headers=AUTH) -> httpx.Response:
    return http.post("/adapters", json={"name": name, "source": str(source), "replace": replace}, headers=headers)


def upload(http: httpx.Client, name: str, files: list[tuple[str, bytes]], headers=AUTH) -> httpx.Response:
    return http.post("/adapters", data={"name": name}, files=[("files", f) for f in files], headers=headers)


def adapter_files(d: Path) -> list[tuple[str, bytes]]:
    """Every file of an adapter directory as upload parts, except the README.md that PEFT writes."""
    return [(p.name, p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file() and p.name != "README.md"]


def registry_state(http: httpx.Client, registry_dir: Path) -> tuple:
    """What must not change after a refused registration: the listing and every file in the store."""
    listing = http.get("/adapters").json()
    store = sorted(str(p.relative_to(registry_dir)) for p in (registry_dir / "store").rglob("*"))
    return listing["generation"], [(a["name"], a["version"], a["digest"]) for a in listing["adapters"]], store


def replica_info(http: httpx.Client, stale: dict | None = None, timeout_s: float = 30.0) -> dict:
    """/info of an engine replica; with `stale`, wait until it reports another replica (describe is cached)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = http.get("/info", timeout=10)
            if r.status_code == 200:
                info = r.json()
                if stale is None or info.get("pid") != stale.get("pid"):
                    return info
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no fresh engine replica within {timeout_s}s")
        time.sleep(0.25)


def is_engine_replica(pid: int) -> bool:
    """Guard before a SIGKILL: the pid must be a Ray Serve EngineReplica worker (ours: started by this run)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "EngineReplica" in cmd or "ray::" in cmd


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on `port` (IPv4 and IPv6), read from /proc/net."""
    out = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state = parts[1], parts[3]
            addr, _, p = local.partition(":")
            if state == "0A" and int(p, 16) == port:
                out.add(_addr(addr, width))
    return out


def _addr(hexaddr: str, width: int) -> str:
    if width == 8:
        return ".".join(str(int(hexaddr[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return "::1" if hexaddr == "00000000000000000000000001000000" else (
        "::" if set(hexaddr) == {"0"} else hexaddr)


def rss_bytes(pid: int | None = None) -> int:
    for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")
