"""Health files: a running service rewrites one while it is connected; `baton health` reads it.

A file, not a port, so that a container health check needs no network and no extra listener."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def write(path: str | None, **fields: Any) -> None:
    """Replace the file atomically with ``fields`` plus the pid and the time (None: no file)."""
    if path is None:
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**fields, "pid": os.getpid(), "at": time.time()}))
    os.replace(tmp, target)


def remove(path: str | None) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)


def check(path: str, max_age_s: float) -> tuple[bool, str]:
    """Whether the service that writes ``path`` is alive and connected, and a line saying so."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return False, f"no health file at {path}: the service is not running (or has not started yet)"
    except (OSError, ValueError) as exc:
        return False, f"health file {path} cannot be read: {exc}"
    age_s = time.time() - float(data.get("at", 0))
    pid = int(data.get("pid", 0))
    if pid <= 0 or not _pid_alive(pid):
        return False, f"the process that wrote {path} (pid {pid}) is gone"
    if age_s > max_age_s:
        return False, f"{data.get('service', 'service')} pid {pid} last reported {age_s:.0f} s ago (limit {max_age_s:.0f} s): stuck or cut off from PostgreSQL"
    problems = [k for k in ("db_connected", "amqp_connected") if data.get(k) is False]
    if data.get("stood_down"):
        problems.append("stood down")
    if problems:
        return False, f"{data.get('service', 'service')} pid {pid} is up but not healthy: {', '.join(problems)}"
    return True, f"{data.get('service', 'service')} pid {pid} healthy (reported {age_s:.1f} s ago)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
