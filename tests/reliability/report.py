"""Run the reliability suite and write its figures: loadtests/results/reliability.json + reliability.md.

    python -m tests.reliability.report            # the CI part (~2-3 min on 2 cores)
    python -m tests.reliability.report --soak     # also the soak runs (10,000 churn cycles: ~20-40 min)

The pytest session writes the JSON (tests/reliability/conftest.py, PEFTSERVE_RELIABILITY_FIGURES); this
runner renders the markdown table from it. Exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "loadtests" / "results"

ROWS = [
    ("bad_input_cases", "bad-input cases tried over HTTP"),
    ("bad_input_5xx", "  ... answered 5xx (must be 0)"),
    ("bad_adapter_cases", "bad-adapter registrations tried (path, upload, schemes, names)"),
    ("bad_adapter_5xx", "  ... answered 5xx (must be 0)"),
    ("auth_cases", "admin writes without / with a wrong token"),
    ("overload_requests", "flood: concurrent requests"),
    ("overload_503", "  ... answered 503 + Retry-After"),
    ("overload_5xx_other_than_503", "  ... other 5xx (must be 0)"),
    ("timeout_408", "deadline: requests answered 408 (work cancelled in the engine)"),
    ("sigkill_requests", "SIGKILL of the engine replica: requests in the load run"),
    ("sigkill_failed_503", "  ... failed cleanly with 503 + Retry-After"),
    ("sigkill_5xx_other_than_503", "  ... other 5xx (must be 0)"),
    ("sigkill_recovery_seconds", "  recovery: kill -> first request served by the new replica (s)"),
    ("health_check_replacement_seconds", "failing check_health -> replica replaced (s)"),
    ("disk_full_status_path", "disk full during registration (server path): status"),
    ("disk_full_status_upload", "disk full during registration (upload): status"),
    ("kill_during_registration_trials", "SIGKILL during registration: trials (only complete adapters listed)"),
    ("concurrent_same_name_ops", "concurrent register/replace/delete of one name"),
    ("concurrent_same_name_5xx", "  ... answered 5xx (must be 0)"),
    ("churn_ci_cycles", "churn (CI): register -> generate -> delete cycles"),
    ("churn_ci_rss_drift_pct", "  RSS drift after warm-up (%, limit 2)"),
    ("churn_soak_cycles", "churn (soak): cycles"),
    ("churn_soak_rss_drift_pct", "  RSS drift after warm-up (%, limit 2)"),
    ("churn_soak_seconds", "  duration (s)"),
]


def render(figures: dict) -> str:
    lines = ["# Reliability figures", "", f"Updated {figures.get('updated_at', '?')} by "
             "`python -m tests.reliability.report` (tiny embedded base, CPU, 127.0.0.1).", "",
             "| check | value |", "| --- | --- |"]
    lines += [f"| {label} | {figures[key]} |" for key, label in ROWS if key in figures]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--soak", action="store_true", help="include the soak runs (10,000 churn cycles)")
    args = ap.parse_args(argv)
    out = RESULTS / "reliability.json"
    env = {**os.environ, "PEFTSERVE_RELIABILITY_FIGURES": str(out)}
    marks = "not gpu" if args.soak else "not soak and not gpu"
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/reliability", "-m", marks,
                          "-p", "no:cacheprovider"], cwd=ROOT, env=env)
    if out.exists():
        (RESULTS / "reliability.md").write_text(render(json.loads(out.read_text())))
        print(f"wrote {out} and {RESULTS / 'reliability.md'}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
