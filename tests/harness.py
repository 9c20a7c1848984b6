"""Test harness: each test gets its own database (cloned from a migrated template) and its own
AMQP name prefix, and runs the real `baton executor` / `baton worker` as processes of their own
(forked by `tests.zygote`, which has Baton imported already; or, `forked=False`, started afresh)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from common import amqp, db
from common.client import BatonClient
from common.settings import Settings

REPO = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("BATON_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP_URL = os.environ.get("BATON_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")

#: Short intervals so that a whole suite of real-process tests stays fast.
FAST_ENV = {
    "BATON__WORKER__HEARTBEAT_INTERVAL": "0.2",
    # Stale after 1 s (5 heartbeats), not the default 3 (0.6 s): a suite running three at a time
    # on two cores stalls for more than half a second now and then, and a worker declared lost
    # in a test about something else fails that test.
    "BATON__EXECUTOR__HEARTBEAT_STALENESS_MULTIPLIER": "5",
    "BATON__EXECUTOR__SCHEDULER_FALLBACK_INTERVAL": "1",
    "BATON__EXECUTOR__SWEEP_INTERVAL": "0.3",
    "BATON__EXECUTOR__TIMEOUT_CHECK_INTERVAL": "0.5",
    "BATON__WORKER__KILL_GRACE": "0.5",
    "BATON__WORKER__SHUTDOWN_TIMEOUT": "5",
    "BATON__LOGGING__LEVEL": "info",
    "BATON__LOGGING__FORMAT": "json",
}


async def wait_until(predicate: Callable[[], Awaitable[Any]], *, timeout_s: float = 20, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (tests may poll; services may not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


class Zygote:
    """This process's `tests.zygote`: it forks the services, and says when each has ended."""

    _instance: Zygote | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "tests.zygote"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            # Without COLUMNS and LINES: the command line's console, made as the zygote imports it,
            # keeps a size it is given then, and a forked command is to take its own environment's.
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("BATON") and k not in ("COLUMNS", "LINES")},
                "PYTHONPATH": str(REPO),
            },
        )
        self._asking = threading.Lock()
        self._changed = threading.Condition()
        self._pid: int | None = None
        self.returncodes: dict[int, int] = {}
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    @classmethod
    def get(cls) -> Zygote:
        with cls._instance_lock:
            if cls._instance is None or cls._instance.process.poll() is not None:
                cls._instance = cls()
            return cls._instance

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            with self._changed:
                if "pid" in message:
                    self._pid = message["pid"]
                else:
                    self.returncodes[message["exited"]] = message["returncode"]
                self._changed.notify_all()
        with self._changed:  # the zygote is gone: so is any answer it owed
            self._changed.notify_all()

    def spawn(
        self, argv: list[str], env: dict[str, str], cwd: Path, log: Path, err: Path | None = None
    ) -> ForkedProcess:
        """Fork ``argv``, its output to ``log`` and its standard error there too, or to ``err``."""
        assert self.process.stdin is not None
        with self._asking, self._changed:
            self._pid = None
            request = {"argv": argv, "env": env, "cwd": str(cwd), "log": str(log)}
            if err is not None:
                request["err"] = str(err)
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            if not self._changed.wait_for(lambda: self._pid is not None or self.process.poll() is not None, 30):
                raise RuntimeError("the zygote did not fork within 30 s")
            if self._pid is None:
                raise RuntimeError(f"the zygote exited with {self.process.returncode}")
            return ForkedProcess(self, self._pid)

    def wait_for(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self.returncodes or self.process.poll() is not None, timeout)
            return self.returncodes.get(pid)


class ForkedProcess:
    """What the harness uses of `subprocess.Popen`, for a process the zygote forked."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote, self.pid = zygote, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.returncodes.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is None:
            self.returncode = self.zygote.wait_for(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never a signal to a pid reused since
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def log_events(path: Path) -> list[dict[str, Any]]:
    """A service's log events: its lines that are JSON (every line a service itself writes is)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes] | ForkedProcess
    log_path: Path
    #: The log events that say it is up (`Baton.started` waits for them).
    ready_events: tuple[str, ...] = ()

    def log_lines(self) -> list[dict[str, Any]]:
        return log_events(self.log_path)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == name]

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout_s: float = 30) -> int:
        return self.process.wait(timeout=timeout_s)


@dataclass
class Command:
    """A `baton` command line the test started (`Baton.start_cli`), its output and standard error
    each written to a file of its own."""

    args: tuple[str, ...]
    process: subprocess.Popen[bytes] | ForkedProcess
    out_path: Path
    err_path: Path

    async def finished(self, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Wait for it to end (killed, and TimeoutExpired raised, after ``timeout_s``)."""
        try:
            code = await asyncio.to_thread(self.process.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return subprocess.CompletedProcess(
            list(self.args), code, self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace")
        )


@dataclass
class Baton:
    """One test's world: a database, a prefix, services, a client."""

    template: str
    tmp: Path
    db_name: str = field(default_factory=lambda: f"baton_t_{uuid.uuid4().hex[:12]}")
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    services: list[Service] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    #: The servers this world uses: the shared ones, or a test's private instances.
    pg_url: str = PG_URL
    amqp_url: str = AMQP_URL
    worker_names: set[str] = field(default_factory=set)
    #: Services forked by the zygote (fast), or started afresh (`python -m cli`, as a deployment does).
    forked: bool = True
    _client: BatonClient | None = None
    _pool: asyncpg.Pool | None = None
    _amqp: aio_pika.abc.AbstractRobustConnection | None = None

    @property
    def db_url(self) -> str:
        return f"{self.pg_url}/{self.db_name}"

    @property
    def names(self) -> amqp.Names:
        return amqp.Names(self.prefix)

    def settings(self) -> Settings:
        return Settings(
            database={"url": self.db_url},
            message_queue={"url": self.amqp_url, "prefix": self.prefix},
        )

    async def setup(self) -> None:
        admin = await asyncpg.connect(f"{self.pg_url}/postgres")
        try:
            await admin.execute(f'CREATE DATABASE "{self.db_name}" TEMPLATE "{self.template}"')
        finally:
            await admin.close()

    async def teardown(self) -> None:
        for service in self.services:
            if service.process.poll() is None:
                service.process.kill()
                service.process.wait(10)
        if self._client is not None:
            await self._client.close()
        await self.close_amqp()
        workers = set(self.worker_names)
        with contextlib.suppress(Exception):  # also any worker a test registered by other means
            workers |= {r["name"] for r in await (await self.pool()).fetch("SELECT name FROM workers")}
        if self._pool is not None:
            await self._pool.close()
        await amqp.delete_topology(self.amqp_url, self.names, sorted(workers))
        admin = await asyncpg.connect(f"{self.pg_url}/postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        finally:
            await admin.close()

    # -- services --------------------------------------------------------------------------

    def service_env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATON")}
        env.update(FAST_ENV)
        env.update(
            BATON_CONFIG=str(REPO / "config" / "config.yaml"),
            BATON__DATABASE__URL=self.db_url,
            BATON__MESSAGE_QUEUE__URL=self.amqp_url,
            BATON__MESSAGE_QUEUE__PREFIX=self.prefix,
            PYTHONPATH=str(REPO),
        )
        env.update(self.env)
        env.update(overrides)
        return env

    def spawn(self, label: str, *args: str, **env: str) -> Service:
        runs = sum(1 for s in self.services if s.name == label)
        log_path = self.tmp / (f"{label}.log" if not runs else f"{label}.{runs}.log")
        service = Service(label, self._launch(args, env, log_path), log_path)
        self.services.append(service)
        return service

    def _launch(
        self, args: tuple[str, ...], env: dict[str, str], out_path: Path, err_path: Path | None = None
    ) -> subprocess.Popen[bytes] | ForkedProcess:
        """Start `baton <args>` with ``env`` over this world's environment: forked by the zygote,
        or afresh (`python -m cli`) when not ``forked``. Its output goes to ``out_path``, and its
        standard error there too, or to ``err_path``."""
        for path in (out_path, err_path):
            if path is not None:
                path.touch()
        if self.forked:
            return Zygote.get().spawn(list(args), self.service_env(**env), REPO, out_path, err_path)
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(out_path, "wb"))
            err = files.enter_context(open(err_path, "wb")) if err_path is not None else subprocess.STDOUT
            return subprocess.Popen(
                [sys.executable, "-m", "cli", *args], cwd=REPO, env=self.service_env(**env),
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )

    def start_cli(self, *args: str, **env: str) -> Command:
        """Start `baton <args>` (forked by the zygote, or afresh as `python -m cli` when not
        ``forked``) against this world, with ``env`` over its environment."""
        runs = len(list(self.tmp.glob("cli.*.out")))
        out_path, err_path = self.tmp / f"cli.{runs}.out", self.tmp / f"cli.{runs}.err"
        return Command(args, self._launch(args, env, out_path, err_path), out_path, err_path)

    async def cli(self, *args: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        """Run `baton <args>` to its end (see `start_cli`)."""
        return await self.start_cli(*args, **env).finished(timeout_s)

    async def start_executor(self, label: str = "executor", **env: str) -> Service:
        return (await self.started(self.spawn_executor(label, **env)))[0]

    async def start_worker(
        self, name: str, *, concurrency: int = 4, runtimes: str = "python,shell", **env: str
    ) -> Service:
        return (await self.started(self.spawn_worker(name, concurrency=concurrency, runtimes=runtimes, **env)))[0]

    def spawn_executor(self, label: str = "executor", **env: str) -> Service:
        """Start an executor without waiting for it (see `started`)."""
        service = self.spawn(label, "executor", **env)
        service.ready_events = ("scheduler_started", "intake_started")
        return service

    def spawn_worker(self, name: str, *, concurrency: int = 4, runtimes: str = "python,shell", **env: str) -> Service:
        """Start a worker without waiting for it (see `started`)."""
        env.setdefault("BATON__WORKER__ACTION_MODULES", '["examples.actions", "examples.workflows", "tests.actions", "tests.workflows"]')
        self.worker_names.add(name)
        service = self.spawn(name, "worker", "--name", name, "--concurrency", str(concurrency), "--runtimes", runtimes, **env)
        service.ready_events = ("worker_registered",)
        return service

    async def started(self, *services: Service) -> list[Service]:
        """Wait until each of these services is up. Services spawned together boot side by side, as
        a deployment starts them: a start is mostly the interpreter's imports."""

        async def ready() -> bool:
            return all([await self._alive_and_logged(s, event) for s in services for event in s.ready_events])

        await wait_until(ready, what=" and ".join(s.name for s in services) + " to start")
        return list(services)

    async def _alive_and_logged(self, service: Service, event: str) -> bool:
        if service.process.poll() is not None:
            raise AssertionError(
                f"{service.name} exited with {service.process.returncode}:\n{service.log_path.read_text()[-3000:]}"
            )
        return bool(service.events(event))

    # -- clients ---------------------------------------------------------------------------

    async def client(self) -> BatonClient:
        if self._client is None:
            self._client = BatonClient(self.settings())
        return self._client

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await db.connect(self.db_url, max_size=3)
        return self._pool

    async def execution(self, execution_id: Any) -> dict[str, Any]:
        row = await (await self.pool()).fetchrow("SELECT * FROM executions WHERE id = $1", uuid.UUID(str(execution_id)))
        assert row is not None, f"no execution {execution_id}"
        return dict(row)

    async def wait_status(self, execution_id: Any, *statuses: str, timeout_s: float = 20) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            # Not recorded yet (intake is behind, under load) is one more reason to wait.
            row = await (await self.pool()).fetchrow(
                "SELECT * FROM executions WHERE id = $1", uuid.UUID(str(execution_id))
            )
            return dict(row) if row is not None and row["status"] in statuses else None

        return await wait_until(check, timeout_s=timeout_s, what=f"execution {execution_id} to be {statuses}")

    async def publish_raw(
        self, body: bytes, *, message_id: str | None = None, reply_to: str | None = None, correlation_id: str | None = None,
        queue_type: amqp.QueueType = "classic", headers: dict[str, Any] | None = None,
    ) -> None:
        """Post like a client in another language would: just a message on the exchange."""
        if self._amqp is None:
            self._amqp = await aio_pika.connect_robust(self.amqp_url)
        channel = await self._amqp.channel()
        await amqp.declare_requests_queue(channel, self.names, queue_type=queue_type)
        exchange = await channel.get_exchange(self.names.executions_exchange)
        await exchange.publish(
            aio_pika.Message(
                body, message_id=message_id, reply_to=reply_to, correlation_id=correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers,
            ),
            routing_key=amqp.REQUESTED_KEY,
        )
        await channel.close()

    async def queue_depth(self, queue: str) -> int:
        if self._amqp is None:
            self._amqp = await aio_pika.connect_robust(self.amqp_url)
        channel = await self._amqp.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def take_parked(self, count: int, timeout_s: float = 20) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Wait until ``count`` requests are parked, then take every parked request off the queue."""

        async def enough() -> bool:
            return await self.queue_depth(self.names.rejected_requests_queue) >= count

        await wait_until(enough, timeout_s=timeout_s, what=f"{count} parked requests")
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(self.names.rejected_requests_queue)
            messages = []
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                messages.append(message)
            return messages
        finally:
            await connection.close()

    async def close_amqp(self) -> None:
        if self._amqp is not None:
            await self._amqp.close()


async def make_template(pg_url: str = PG_URL) -> str:
    name = f"baton_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(f"{pg_url}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await db.connect_one(f"{pg_url}/{name}", max_wait_s=10)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    return name


async def drop_database(name: str, pg_url: str = PG_URL) -> None:
    admin = await asyncpg.connect(f"{pg_url}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def kill_group(service: Service, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(service.process.pid, sig)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CuttableProxy:
    """A TCP proxy to PostgreSQL that a test can cut (connections reset, new ones refused) or
    blackhole (nothing arrives, nothing is refused), then heal: a network partition between one
    service and the database, while everything else still reaches it."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5432) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        #: Cleared while blackholed: bytes are held, not forwarded, as a network that drops packets
        #: holds them (TCP sends them again until it heals); each side waits on its own timeouts.
        self._flowing = asyncio.Event()
        self._flowing.set()
        #: Bytes held up by a blackhole (a query sent into the void).
        self.held_bytes = 0
        #: Connections a blackhole spares, by the local port of their connection to PostgreSQL (what
        #: `pg_stat_activity.client_port` shows): a partition that cuts some of a process's
        #: connections and not others.
        self.spared_ports: frozenset[int] = frozenset()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        await self._flowing.wait()  # a connection made in a blackhole gets through once it heals
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        port = up_writer.get_extra_info("sockname")[1]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if not self._flowing.is_set() and port not in self.spared_ports:
                        self.held_bytes += len(data)
                        await self._flowing.wait()
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def cut(self) -> None:
        """Stop accepting and drop every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()
        self._flowing.set()  # what a blackhole held meets the closed connections, and ends

    def upstream_ports(self) -> list[int]:
        """The local ports of the proxy's open connections to PostgreSQL (`pg_stat_activity.client_port`)."""
        return [w.get_extra_info("sockname")[1] for w in self._writers if w.get_extra_info("peername") == self.target]

    def blackhole(self, spare_ports: frozenset[int] = frozenset()) -> None:
        """From now on, hold every byte both ways, on open connections and new ones alike, but for
        the open connections named by ``spare_ports`` (see `spared_ports`)."""
        self.spared_ports = spare_ports
        self._flowing.clear()

    async def blackhole_pools(self, pool: asyncpg.Pool) -> bool:
        """Blackhole every connection but the worker's lock connection: its session through this
        proxy that holds a session lock (read through ``pool``, a connection of the test's own).
        A partition of the worker's pools alone. False, and nothing held: no such session now."""
        lock_port = await pool.fetchval(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND a.client_port = ANY($1::int[])",
            self.upstream_ports(),
        )
        if lock_port is None:
            return False
        self.blackhole(spare_ports=frozenset({lock_port}))
        return True

    async def heal(self) -> None:
        self._flowing.set()
        if self._server is None:
            await self.start()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


# -- private servers, for tests that restart them ------------------------------------------------


def _pg_bin(tool: str) -> str:
    found = shutil.which(tool)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/" + tool))
    if not versions:
        raise RuntimeError(f"PostgreSQL's {tool} is not installed")
    return str(versions[-1])


class PrivatePostgres:
    """A PostgreSQL of the test's own (its own port and data directory, trust auth), so that a
    test can restart it without touching the shared server."""

    def __init__(self, tmp: Path) -> None:
        # Not under the test's own folder: its parents are private to root, and PostgreSQL runs
        # as its own user. Removed when it stops.
        del tmp
        self.dir = Path(tempfile.mkdtemp(prefix="baton-test-pg-"))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"
        # PostgreSQL refuses to run as root: run it as its own user when we are root.
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.user, *argv], check=True, capture_output=True, timeout=120)

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o", options, *args)

    def start(self) -> None:
        if self.user:
            shutil.chown(self.dir, "postgres")
        self._run(_pg_bin("initdb"), "-D", str(self.dir / "data"), "--auth=trust", "-U", "postgres", "-E", "UTF8")
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("-m", "fast", "restart")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._ctl("-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of the test's own (its own node name, ports and data directory)."""

    BIN = Path("/usr/lib/rabbitmq/bin")

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "rabbit"
        self.port = free_port()
        self.node = f"baton_t{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()), "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"), "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"), "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
        }

    def ctl(self, *args: str) -> None:
        subprocess.run([str(self.BIN / "rabbitmqctl"), "-n", self.node, "-q", *args], env=self.env, check=True,
                       capture_output=True, timeout=120, cwd=self.dir)

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        (self.dir / "plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text("")
        # Run from its own directory: the Erlang VM writes crash dumps (MnesiaCore.*) where it runs.
        subprocess.run([str(self.BIN / "rabbitmq-server"), "-detached"], env=self.env, check=True, timeout=60,
                       capture_output=True, cwd=self.dir)
        self.ctl("wait", "--timeout", "90", str(self.dir / "pid"))

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.ctl("stop")
