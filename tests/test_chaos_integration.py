"""The chaos soak's short variant: about a minute of mixed load on two executors and three workers
(on a PostgreSQL and a RabbitMQ of its own) while faults strike on a fixed seed; every invariant
must hold. `make chaos` runs the long one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import REPO

pytestmark = [pytest.mark.integration, pytest.mark.soak]


@pytest.mark.timeout(420)
def test_a_short_chaos_soak_keeps_every_invariant(tmp_path):
    report_path = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, "bench/chaos.py", "--duration", "40", "--rate", "8", "--fault-every", "4", "--min-faults", "5", "--seed", "20261130",
         "--quiet-timeout", "150", "--report", str(report_path)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    assert report_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert not failed, f"{failed}: {json.dumps(report['problems'])}\n{done.stdout[-2000:]}"
    assert done.returncode == 0
    assert report["posted"] > 200 and sum(report["fault_counts"].values()) >= 5
