"""Kill the registering process (SIGKILL) at random points of a registration; a restarted registry lists only
complete adapters (store object present, digest matching), and gc() removes what the crash left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from .harness import record

TRIALS = 4

WRITER = r"""
import sys, os
from pathlib import Path
from serve.registry import AdapterRegistry
root, src = Path(sys.argv[1]), Path(sys.argv[2])
reg = AdapterRegistry(root).for_base("sha256:crash-test")
i = int(sys.argv[3])
while True:  # bounded by the parent's SIGKILL (and by its timeout)
    d = src / f"v{i % 4}"
    rec = reg.register(f"a-{i}", d, lambda p: {"kind": "lora"})
    print("ok", rec.name, flush=True)
    i += 1
"""


def _sources(tmp: Path) -> Path:
    """Four 4 MiB adapters (distinct content): each registration copies and fsyncs for a while."""
    src = tmp / "src"
    for k in range(4):
        d = src / f"v{k}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        (d / "adapter_model.safetensors").write_bytes(bytes([k]) * (4 << 20))
    return src


def test_kill_during_registration_lists_only_complete_adapters(tmp_path):
    from serve.registry import AdapterRegistry, directory_digest

    root, src = tmp_path / "registry", _sources(tmp_path)
    rng = random.Random(8)
    committed: set[str] = set()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    start_index, leftovers = 0, 0
    for _trial in range(TRIALS):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(src), str(start_index)],
                                stdout=subprocess.PIPE, text=True, env=env)
        time.sleep(rng.uniform(0.6, 1.6))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        done = [line.split()[1] for line in out.splitlines() if line.startswith("ok ")]
        committed |= set(done)
        start_index += len(done) + 1  # the killed one's name is never reused
        reg = AdapterRegistry(root).for_base("sha256:crash-test")  # "restart"
        listed = {r.name: r for r in reg.list()}
        assert committed <= set(listed), "a committed adapter was lost"
        assert len(set(listed) - committed) <= 1, "more than the in-flight registration appeared"
        for r in listed.values():
            obj = Path(r.path)
            assert {p.name for p in obj.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
            assert directory_digest(obj) == r.digest, f"{r.name}: store object is incomplete"
        committed |= set(listed)
        leftovers += len(list(reg.tmp.iterdir()))
        reg.gc(min_age_s=0)
        assert not list(reg.tmp.iterdir())
        live = {r.digest for r in reg.list()}
        assert {p.name for p in reg.objects.iterdir()} == live
    record("kill_during_registration_trials", TRIALS)
    record("kill_during_registration_committed", len(committed))
    record("kill_during_registration_staging_leftovers_collected", leftovers)
