"""What the benchmarks share: CPU accounting and resident memory from /proc, a database made afresh
or dropped, and percentiles. No services are started here."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting from /proc ---------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, ppid, cpu seconds user+system) of one process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); utime is field 14, stime field 15 -> indexes 11, 12
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_snapshot() -> dict[int, tuple[str, int, float]]:
    snap = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                snap[int(entry)] = st
    return snap


def total_cpu_seconds() -> tuple[float, float]:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    values = [int(v) for v in parts[:8]]
    return sum(values) / CLK_TCK, (values[3] + values[4]) / CLK_TCK  # (all, idle+iowait)


def cpu_split(
    before: dict[int, tuple[str, int, float]],
    after: dict[int, tuple[str, int, float]],
    roles: dict[int, str],
    pg_backends: set[int] = frozenset(),
    pg_background: set[int] = frozenset(),
) -> tuple[dict[str, float], dict[str, float]]:
    """CPU seconds used between two snapshots, grouped: executor, workers, postgres, rabbitmq, bench, other."""
    def role(pid: int, comm: str, ppid: int, snap) -> str:
        seen = set()
        p = pid
        while p and p not in seen:  # a child of one of our services counts as that service
            if p in roles:
                return roles[p]
            seen.add(p)
            p = snap.get(p, ("", 0, 0.0))[1]
        if comm == "postgres" or comm.startswith("postgres"):
            if pid in pg_backends:
                return "postgres"
            return "postgres (background)" if pid in pg_background else "postgres (other)"
        if comm in ("beam.smp", "epmd", "erl_child_setup", "inet_gethost") or comm.startswith("rabbit"):
            return "rabbitmq"
        if comm.startswith(("kworker", "jbd2", "kdamond", "ksoftirqd", "kswapd")):
            return "kernel"
        return "other"

    split: dict[str, float] = {}
    others: dict[str, float] = {}
    for pid, (comm, ppid, cpu) in after.items():
        prev = before.get(pid)
        delta = cpu - prev[2] if prev and prev[0] == comm else cpu
        if delta <= 0:
            continue
        key = role(pid, comm, ppid, after)
        split[key] = split.get(key, 0.0) + delta
        if key == "other":
            others[comm] = others.get(comm, 0.0) + delta
    return split, others


# -- how fast this machine runs Python --------------------------------------------------------------

#: Iterations of `python_speed_ms`'s loop (a few hundred milliseconds on a 2-core test machine).
SPEED_LOOP_ITERATIONS = 2_000_000


def _speed_loop(n: int) -> int:
    table: dict[int, int] = {}
    total = 0
    for i in range(n):
        total += i % 7
        table[i & 1023] = total
    return total


def python_speed_ms(rounds: int = 3) -> float:
    """The milliseconds one core takes for a fixed loop of plain Python, the fastest of ``rounds``
    (taken before any service starts). Machines that report the same CPU model have differed
    two-fold in it, and every figure the benchmarks give moves with it: compare runs side by side,
    or where this agrees."""
    best_s = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        _speed_loop(SPEED_LOOP_ITERATIONS)
        best_s = min(best_s, time.perf_counter() - started)
    return round(best_s * 1000, 1)


# -- resident memory from /proc ------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """Resident set size of one process in MB (VmRSS of /proc/<pid>/status), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """Samples the resident memory of some processes, by role, as [seconds since t0, MB] pairs."""

    def __init__(self, pids: dict[str, int], t0: float) -> None:
        self.pids = pids
        self.t0 = t0
        self.samples: dict[str, list[list[float]]] = {role: [] for role in pids}

    def sample(self) -> None:
        t_s = round(time.time() - self.t0, 1)
        for role, pid in self.pids.items():
            mb = rss_mb(pid)
            if mb is not None:
                self.samples[role].append([t_s, round(mb, 1)])

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.sample()

    def summary(self) -> dict[str, dict]:
        out = {}
        for role, samples in self.samples.items():
            if samples:
                values = [mb for _, mb in samples]
                out[role] = {"first": values[0], "last": values[-1], "max": max(values), "samples": samples}
        return out


# -- database ------------------------------------------------------------------------------------


async def recreate_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    if not name or '"' in name:
        raise SystemExit(f"--database-url names no usable database: {url!r}")
    admin = await asyncpg.connect(url, database="postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(url, database="postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# -- reporting -------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100.0 * (len(s) - 1))))
    return s[k]


def ms(x: float) -> str:
    return f"{x * 1000:8.1f} ms"
