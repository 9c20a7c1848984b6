"""The deployment files agree with the code: Dockerfile and docker-compose.yaml against the CLI,
the settings and pyproject.toml.

No Docker and no services are needed: both files are parsed, and every command they would run is
checked against the real `baton` Typer app, parsed (never run) with the arguments the container
would get.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from cli import app, load_commands
from cli import main as cli_main
from common.deadline import STOP_AFTERMATH_S, STOP_STEP_TIMEOUT_S
from common.settings import Settings, WorkerSettings, load_settings

load_commands()  # every command on `app`, as `baton` with any command line but a service's
ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"

INFRA_SERVICES = ("postgres", "rabbitmq")
EXPECTED_APP_SERVICES = {"executor", "worker-shell", "worker-python", "dashboard"}
WORKER_STOP_GRACE_S = 45.0  # DESIGN section 5: 30 s drain + 15 s margin


# -- helpers: the CLI ---------------------------------------------------------------------------


def cli_help_exit_code(argv: list[str]) -> tuple[int, str]:
    """Exit code and output of `baton ARGV --help`: the subcommand and the options must exist."""
    result = CliRunner().invoke(app, [*argv, "--help"])
    return result.exit_code, result.output


def cli_parse_error(argv: list[str]) -> str | None:
    """Parse ARGV the way `baton ARGV` would, without running the command; the error, or None.

    `--help` is eager, so it alone would not notice extra arguments, missing required ones or bad
    values (`--concurrency 0`); building the command's context does all of that.
    """
    command: Any = typer.main.get_command(app)
    ctx = None
    info_name = "baton"
    args = list(argv)
    try:
        while hasattr(command, "list_commands"):  # a group: descend into the named subcommand
            ctx = command.context_class(command, info_name=info_name, parent=ctx)
            if not args or args[0].startswith("-"):
                return f"no subcommand in {argv!r}"
            info_name, *args = args
            sub = command.get_command(ctx, info_name)
            if sub is None:
                return f"no command {info_name!r} (have {sorted(command.list_commands(ctx))})"
            command = sub
        command.make_context(info_name, args, parent=ctx)
    except Exception as exc:  # noqa: BLE001 - the CLI's usage errors; any other failure is just as disqualifying
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        return f"{type(exc).__name__}: {message}"
    return None


def assert_cli_accepts(argv: list[str], where: str) -> None:
    code, output = cli_help_exit_code(argv)
    assert code == 0, f"{where}: `baton {shlex.join(argv)} --help` exited {code}:\n{output}"
    error = cli_parse_error(argv)
    assert error is None, f"{where}: `baton {shlex.join(argv)}` is not a valid command line: {error}"


def option_value(argv: list[str], option: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


# -- helpers: docker-compose.yaml ---------------------------------------------------------------


ENV_EXAMPLE = ROOT / ".env.example"


def dotenv_example() -> dict[str, str]:
    """The variables `.env.example` tells operators to set, each given a stand-in value."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip() or f"test-{key.strip().lower()}"
    return values


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (`${X}`, `${X:-default}`, `${X:?error}`) over a loaded file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op in (":?", "?"):
            raise LookupError(f"${{{name}}} is required: {arg}")
        return arg if op in (":-", "-") else ""

    return _VARIABLE.sub(one, value)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as `docker compose` sees it with ``env`` (default: `.env.example` filled in)."""
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    data = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), dotenv_example() if env is None else env)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose file has no services"
    return data


def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from this repository's image."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in env)
        return {k: v for k, v in pairs}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


@dataclass(frozen=True)
class Mount:
    type: str  # "bind" or "volume"
    source: str
    target: str
    read_only: bool


def service_mounts(service: dict[str, Any]) -> list[Mount]:
    mounts = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            source = str(item.get("source", ""))
            mounts.append(Mount(item.get("type", "volume"), source, str(item["target"]), bool(item.get("read_only"))))
            continue
        parts = str(item).split(":")
        if len(parts) == 1:  # anonymous volume
            mounts.append(Mount("volume", "", parts[0], False))
            continue
        source, target, *mode = parts
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        read_only = bool(mode) and "ro" in mode[0].split(",")
        mounts.append(Mount(kind, source, target, read_only))
    return mounts


def repo_path(source: str) -> Path:
    """A bind-mount source as a path; relative sources are relative to the compose file."""
    path = Path(source).expanduser()
    return path if path.is_absolute() else (COMPOSE_FILE.parent / path).resolve()


def baton_config_source(name: str, service: dict[str, Any]) -> Path:
    """The repo file that the service's BATON_CONFIG names inside the container."""
    env = service_env(service)
    assert "BATON_CONFIG" in env, f"{name}: BATON_CONFIG is not set"
    target = env["BATON_CONFIG"]
    binds = [m for m in service_mounts(service) if m.type == "bind" and m.target == target]
    assert binds, f"{name}: BATON_CONFIG={target} is not the target of any bind mount"
    source = repo_path(binds[0].source)
    assert source.is_file(), f"{name}: BATON_CONFIG={target} is mounted from {source}, which is not a file"
    return source


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency -> condition (the short list form means `service_started`)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (spec or {}).get("condition", "service_started") for d, spec in deps.items()}


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def compose_duration(value: Any) -> float:
    """Seconds from a compose duration: `45s`, `1m30s`, `1.5s`, `500ms`."""
    text = str(value).strip()
    if not text or _GO_DURATION_PART.sub("", text) != "":
        raise ValueError(f"not a compose duration: {value!r}")
    return sum(float(n) * _GO_UNITS[unit] for n, unit in _GO_DURATION_PART.findall(text))


def settings_for(name: str, service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the service would load them: its config file plus its BATON__ environment."""
    for key in list(os.environ):
        if key.startswith("BATON__"):
            monkeypatch.delenv(key)
    for key, value in service_env(service).items():
        if key.startswith("BATON__"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("BATON_CONFIG", str(baton_config_source(name, service)))
    return load_settings()


# -- helpers: Dockerfile ------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue  # comments are dropped, even inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        joined = " ".join(part.strip() for part in buffer if part.strip())
        buffer = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    if buffer:
        raise ValueError(f"Dockerfile ends inside a continued instruction (line {start})")
    return instructions


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def copy_sources(instruction: Instruction) -> tuple[list[str], str, dict[str, str]]:
    tokens = exec_form(instruction.args) or shlex.split(instruction.args)
    flags = {}
    while tokens and tokens[0].startswith("--"):
        key, _, value = tokens.pop(0)[2:].partition("=")
        flags[key] = value
    assert len(tokens) >= 2, f"line {instruction.line}: {instruction.keyword} needs a source and a destination"
    return tokens[:-1], tokens[-1], flags


def env_assignments(instruction: Instruction) -> dict[str, str]:
    tokens = shlex.split(instruction.args)
    if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value with spaces`
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) for t in tokens)


def load_dockerfile() -> list[Instruction]:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    assert instructions and instructions[0].keyword in {"FROM", "ARG"}, "a Dockerfile starts with FROM"
    return instructions


def last(instructions: list[Instruction], keyword: str) -> Instruction | None:
    found = [i for i in instructions if i.keyword == keyword]
    return found[-1] if found else None


def load_pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def dockerfile_entrypoint() -> list[str]:
    entrypoint = last(load_dockerfile(), "ENTRYPOINT")
    assert entrypoint is not None, "the Dockerfile has no ENTRYPOINT"
    argv = exec_form(entrypoint.args)
    # The shell form runs `/bin/sh -c`, which does not pass SIGTERM on: no graceful drain.
    assert argv is not None, f"ENTRYPOINT must use the exec form (JSON array), got {entrypoint.args!r}"
    return argv


# -- the helpers themselves can say no ----------------------------------------------------------


def test_cli_checks_reject_what_the_cli_rejects() -> None:
    assert cli_help_exit_code(["no-such-command"])[0] != 0
    assert cli_help_exit_code(["worker", "--no-such-option", "x"])[0] != 0
    assert cli_parse_error(["no-such-command"]) is not None
    assert cli_parse_error(["executor", "unexpected-extra-argument"]) is not None
    assert cli_parse_error(["worker", "--concurrency", "0"]) is not None
    assert cli_parse_error([]) is not None
    assert cli_parse_error(["worker", "--name", "w", "--runtimes", "python"]) is None
    assert cli_parse_error(["db", "migrate"]) is None


def test_parsers_read_what_they_claim() -> None:
    text = (
        "# comment\nFROM python:3.11-slim\nCOPY --chown=a:b x/ \\\n  y/ /dest/\n"
        "RUN a \\\n# inner comment\n && b\nENTRYPOINT [\"baton\"]\nCMD executor\n"
    )
    ins = parse_dockerfile(text)
    assert [i.keyword for i in ins] == ["FROM", "COPY", "RUN", "ENTRYPOINT", "CMD"]
    assert copy_sources(ins[1]) == (["x/", "y/"], "/dest/", {"chown": "a:b"})
    assert ins[2].args == "a && b"
    assert exec_form(ins[3].args) == ["baton"] and exec_form(ins[4].args) is None
    assert compose_duration("45s") == 45 and compose_duration("1m30s") == 90
    assert compose_duration("500ms") == 0.5
    with pytest.raises(ValueError):
        compose_duration("45")
    assert service_mounts({"volumes": ["./a.yaml:/b.yaml:ro", "data:/var/lib"]}) == [
        Mount("bind", "./a.yaml", "/b.yaml", True),
        Mount("volume", "data", "/var/lib", False),
    ]
    assert depends_on({"depends_on": ["x"]}) == {"x": "service_started"}


# -- docker-compose.yaml ------------------------------------------------------------------------


def test_compose_has_the_expected_services() -> None:
    compose = load_compose()
    assert set(INFRA_SERVICES) <= set(compose["services"]), "postgres and rabbitmq are missing"
    assert set(app_services(compose)) >= EXPECTED_APP_SERVICES, (
        f"app services built from the repo: {sorted(app_services(compose))}"
    )


def test_compose_builds_this_repository_with_its_dockerfile() -> None:
    for name, svc in app_services(load_compose()).items():
        build = svc["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert repo_path(context) == ROOT, f"{name}: build context {context!r} is not the repo root"
        assert (ROOT / dockerfile).resolve() == DOCKERFILE, f"{name}: builds {dockerfile!r}, not ./Dockerfile"


def test_compose_commands_are_accepted_by_the_cli() -> None:
    image_entrypoint = dockerfile_entrypoint()
    for name, svc in app_services(load_compose()).items():
        entrypoint = as_argv(svc["entrypoint"]) if "entrypoint" in svc else image_entrypoint
        assert entrypoint == ["baton"], f"{name}: runs {entrypoint!r}, not the baton CLI"
        command = as_argv(svc.get("command"))
        assert command, f"{name}: no command (it would fall back to the image's CMD silently)"
        assert_cli_accepts(command, f"compose service {name}")


def test_compose_worker_options_are_valid_settings() -> None:
    """`--help` does not check the values of --runtimes; the settings model does."""
    workers = 0
    for svc in app_services(load_compose()).values():
        command = as_argv(svc.get("command"))
        if command[:1] != ["worker"]:
            continue
        workers += 1
        runtimes = option_value(command, "--runtimes")
        values: dict[str, Any] = {}
        if runtimes is not None:
            values["runtimes"] = [r.strip() for r in runtimes.split(",") if r.strip()]
        WorkerSettings.model_validate(values)
    assert workers >= 1, "no worker service"


def test_compose_workers_scale_without_sharing_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--scale worker-python=3` starts three processes from one service: none may carry a fixed
    name (from --name or the mounted config), so that each takes `<hostname>-<pid>`."""
    for name, svc in app_services(load_compose()).items():
        command = as_argv(svc.get("command"))
        if command[:1] != ["worker"]:
            continue
        assert option_value(command, "--name") is None, f"{name}: a fixed --name breaks scaling"
        with monkeypatch.context() as mp:
            assert settings_for(name, svc, mp).worker.name is None, f"{name}: worker.name is fixed in its config"


def test_only_the_opt_in_shell_worker_serves_the_shell_runtime_and_it_is_sandboxed() -> None:
    for name, svc in app_services(load_compose()).items():
        command = as_argv(svc.get("command"))
        if command[:1] != ["worker"]:
            continue
        runtimes = option_value(command, "--runtimes") or "python"
        if "shell" not in runtimes:
            continue
        assert name == "worker-shell", f"{name} serves the shell runtime"
        assert svc.get("read_only") is True and "ALL" in (svc.get("cap_drop") or []), f"{name} is not sandboxed"
        assert "no-new-privileges:true" in (svc.get("security_opt") or []), f"{name} may gain privileges"


def test_no_broker_or_database_port_is_published() -> None:
    for name, svc in load_compose()["services"].items():
        for port in svc.get("ports") or []:
            published = str(port)
            assert published.startswith("127.0.0.1:"), f"{name} publishes {published} beyond this host"
            assert not published.endswith((":5432", ":5672")), f"{name} publishes a database or broker port"


def test_compose_needs_every_credential_from_env() -> None:
    """No password is written in the compose file: each comes from .env, which .env.example lists,
    and compose refuses to start without it."""
    raw = COMPOSE_FILE.read_text()
    assert "guest" not in raw and "baton:baton" not in raw, "a default credential is written in the compose file"
    required = set(re.findall(r"\$\{([A-Z_]+):\?", raw))
    assert {"POSTGRES_PASSWORD", "BATON_DB_PASSWORD", "RABBITMQ_PASSWORD"} <= required
    assert required <= set(dotenv_example()), f".env.example does not list {sorted(required - set(dotenv_example()))}"
    with pytest.raises(LookupError, match="is required"):
        load_compose(env={})
    assert ".env" in (ROOT / ".gitignore").read_text().split(), ".env is not ignored by git"


def test_compose_config_paths_exist() -> None:
    compose = load_compose()
    declared_volumes = set((compose.get("volumes") or {}).keys())
    for name, svc in compose["services"].items():
        for mount in service_mounts(svc):
            if mount.type == "bind":
                assert repo_path(mount.source).exists(), f"{name}: mounts {mount.source}, which does not exist"
            elif mount.source:
                assert mount.source in declared_volumes, f"{name}: volume {mount.source!r} is not declared"
    for name, svc in app_services(compose).items():
        source = baton_config_source(name, svc)
        assert source.is_relative_to(ROOT), f"{name}: config {source} is outside the repository"
        target = service_env(svc)["BATON_CONFIG"]
        mount = next(m for m in service_mounts(svc) if m.target == target)
        assert mount.read_only, f"{name}: the config mount {mount.source} should be read-only (:ro)"


def test_mounted_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    services = app_services(load_compose())
    assert services, "no app service"
    for name, svc in services.items():
        mounted = yaml.safe_load(baton_config_source(name, svc).read_text())
        # Sections the service's BATON__ environment overrides are not the file's alone.
        overridden = {k.split("__")[1].lower() for k in service_env(svc) if k.startswith("BATON__")}
        with monkeypatch.context() as mp:
            settings = settings_for(name, svc, mp)
            from_file = Settings(**mounted)
        compared = [section for section in mounted if section not in overridden]
        assert compared, f"{name}: the mounted config sets nothing of its own"
        for section in compared:
            assert getattr(settings, section) == getattr(from_file, section), (
                f"{name}: {section} is not what the mounted {baton_config_source(name, svc).name} says"
            )


def test_mounted_config_reaches_the_compose_services(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load_compose()
    pg_env = service_env(compose["services"]["postgres"])
    mq_env = service_env(compose["services"]["rabbitmq"])
    for name, svc in app_services(compose).items():
        with monkeypatch.context() as mp:
            settings = settings_for(name, svc, mp)
        db = urlsplit(settings.database.url)
        assert db.hostname == "postgres", f"{name}: database.url host is {db.hostname!r}"
        # Baton's own role, which the init script creates with BATON_DB_PASSWORD: not the superuser.
        assert db.username == "baton" != pg_env.get("POSTGRES_USER", "postgres"), f"{name}: connects as a superuser"
        assert db.password == pg_env.get("BATON_DB_PASSWORD"), f"{name}: database password differs"
        assert db.path.lstrip("/") == "baton", f"{name}: database name differs"
        mq = urlsplit(settings.message_queue.url)
        assert mq.hostname == "rabbitmq", f"{name}: message_queue.url host is {mq.hostname!r}"
        assert mq.username == mq_env.get("RABBITMQ_DEFAULT_USER", "guest"), f"{name}: broker user differs"
        assert mq.password == mq_env.get("RABBITMQ_DEFAULT_PASS", "guest"), f"{name}: broker password differs"


def test_config_action_modules_import(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, svc in app_services(load_compose()).items():
        with monkeypatch.context() as mp:
            settings = settings_for(name, svc, mp)
        for module in settings.worker.action_modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - any import failure is the finding
                pytest.fail(f"{name}: worker.action_modules names {module!r}, which does not import: {exc!r}")


def test_workers_outlast_their_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    workers = {
        name: svc
        for name, svc in app_services(load_compose()).items()
        if as_argv(svc.get("command"))[:1] == ["worker"]
    }
    assert workers, "no worker service"
    for name, svc in workers.items():
        assert "stop_grace_period" in svc, f"{name}: no stop_grace_period (Docker's 10 s cuts the drain short)"
        grace = compose_duration(svc["stop_grace_period"])
        assert grace == WORKER_STOP_GRACE_S, f"{name}: stop_grace_period is {grace}s, DESIGN says 45s"
        assert svc.get("stop_signal", "SIGTERM") in {"SIGTERM", "TERM", "15"}, f"{name}: stop_signal is not SIGTERM"
        with monkeypatch.context() as mp:
            drain = settings_for(name, svc, mp).worker.shutdown_timeout_s
        # The drain, what follows its deadline, and the runner's wait for what that left behind.
        need = drain + STOP_AFTERMATH_S + STOP_STEP_TIMEOUT_S
        assert grace >= need, f"{name}: stop_grace_period {grace}s is shorter than a worst-case stop, {need}s"


def test_the_executor_outlasts_its_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its loops' deadline, the steps after it, and the runner's wait for what they left behind:
    Docker's default grace (10 s) SIGKILLed an executor whose loops took their deadline, with the
    dispatches it was handing over."""
    [(name, svc)] = [(n, s) for n, s in app_services(load_compose()).items() if as_argv(s.get("command"))[:1] == ["executor"]]
    assert "stop_grace_period" in svc, f"{name}: no stop_grace_period"
    grace = compose_duration(svc["stop_grace_period"])
    with monkeypatch.context() as mp:
        deadline = settings_for(name, svc, mp).executor.shutdown_timeout_s
    need = deadline + STOP_AFTERMATH_S + STOP_STEP_TIMEOUT_S
    assert grace >= need, f"{name}: stop_grace_period {grace}s is shorter than a worst-case stop, {need}s"


def test_infrastructure_is_health_checked_and_waited_for() -> None:
    compose = load_compose()
    probes = {"postgres": "pg_isready", "rabbitmq": "rabbitmq-diagnostics"}
    for infra, probe in probes.items():
        check = compose["services"][infra].get("healthcheck")
        assert check and not check.get("disable"), f"{infra}: no healthcheck"
        test = check.get("test")
        assert test and probe in " ".join(as_argv(test)), f"{infra}: healthcheck {test!r} does not use {probe}"
    for name, svc in app_services(compose).items():
        deps = depends_on(svc)
        for infra in INFRA_SERVICES:
            assert deps.get(infra) == "service_healthy", (
                f"{name}: depends_on {infra} should have condition service_healthy, has {deps.get(infra)!r}"
            )


# -- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_base_image_and_user() -> None:
    instructions = load_dockerfile()
    base = last(instructions, "FROM")
    assert base is not None and re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base.args.split()[0]), (
        f"base image not pinned by digest: {base}"
    )
    user = last(instructions, "USER")
    assert user is not None, "the image runs as root (no USER)"
    assert user.args.split(":")[0] not in {"root", "0"}, f"the image runs as {user.args}"
    workdir = last(instructions, "WORKDIR")
    assert workdir is not None and workdir.args == "/app", f"WORKDIR: {workdir}"


def test_dockerfile_copies_existing_paths() -> None:
    copies = [i for i in load_dockerfile() if i.keyword in {"COPY", "ADD"}]
    assert copies, "the Dockerfile copies nothing"
    for instruction in copies:
        sources, _, flags = copy_sources(instruction)
        if "from" in flags:
            continue  # from another build stage or image
        for source in sources:
            assert not source.startswith(("http://", "https://")), f"line {instruction.line}: fetches {source}"
            matches = list(ROOT.glob(source.rstrip("/"))) if any(c in source for c in "*?[") else [ROOT / source]
            assert matches and all(m.exists() for m in matches), (
                f"line {instruction.line}: {instruction.keyword} {source}: no such path in the repository"
            )


def test_dockerfile_copies_what_pip_install_needs_first() -> None:
    """`pip install .` needs pyproject.toml, its readme and every package before it runs."""
    instructions = load_dockerfile()
    install = next((i for i in instructions if i.keyword == "RUN" and re.search(r"pip install\b.*\s\.", i.args)), None)
    assert install is not None, "the Dockerfile never runs `pip install .`"
    copied: set[str] = set()
    for instruction in instructions:
        if instruction.line >= install.line:
            break
        if instruction.keyword in {"COPY", "ADD"}:
            sources, _, flags = copy_sources(instruction)
            if "from" not in flags:
                copied |= {s.rstrip("/") for s in sources}
    if "." in copied:
        return  # the whole context was copied
    project = load_pyproject()["project"]
    readme = project.get("readme")
    needed = {"pyproject.toml"} | ({readme} if isinstance(readme, str) else set())
    includes = load_pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(Path(p.name).match(pattern) for pattern in includes)
    }
    assert packages, f"no package in the repo matches {includes}"
    missing = sorted((needed | packages) - copied)
    assert not missing, f"copied only after (or never before) `pip install .` on line {install.line}: {missing}"


def test_dockerfile_baton_config_names_a_copied_file() -> None:
    instructions = load_dockerfile()
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            env.update(env_assignments(instruction))
    if "BATON_CONFIG" not in env:
        pytest.skip("the image leaves BATON_CONFIG at its default")
    workdir = Path(last(instructions, "WORKDIR").args)
    target = Path(env["BATON_CONFIG"])
    target = target if target.is_absolute() else workdir / target
    assert target.is_relative_to(workdir), f"BATON_CONFIG={target} is outside WORKDIR {workdir}"
    repo_file = ROOT / target.relative_to(workdir)
    assert repo_file.is_file(), f"BATON_CONFIG={target}, but {repo_file} does not exist"


def test_dockerfile_entrypoint_is_the_baton_script() -> None:
    entrypoint = dockerfile_entrypoint()
    scripts = load_pyproject()["project"].get("scripts", {})
    assert entrypoint[:1] == ["baton"] and len(entrypoint) == 1, f"ENTRYPOINT is {entrypoint}"
    assert "baton" in scripts, "pyproject.toml declares no `baton` script"
    module_name, _, attr = scripts["baton"].partition(":")
    target = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    # `main` takes --config and --debug wherever they stand, then runs the typer app.
    assert target is cli_main, f"the baton script runs {scripts['baton']}, which is not cli.main"


def test_dockerfile_default_command_is_accepted_by_the_cli() -> None:
    cmd = last(load_dockerfile(), "CMD")
    assert cmd is not None, "the Dockerfile has no default CMD"
    argv = exec_form(cmd.args)
    assert argv is not None, f"CMD must use the exec form to extend ENTRYPOINT, got {cmd.args!r}"
    assert_cli_accepts(argv, "Dockerfile CMD")


def test_the_image_installs_locked_hash_checked_dependencies() -> None:
    instructions = load_dockerfile()
    assert any(
        i.keyword == "RUN" and "--require-hashes" in i.args and "requirements.lock" in i.args for i in instructions
    ), "the image does not install from the hash-checked lock file"
    lock = (ROOT / "requirements.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==", lock, re.MULTILINE)
    assert pins and lock.count("--hash=sha256:") >= len(pins), "a locked dependency has no hash"
    dependencies = {re.split(r"[<>=\[; ]", d)[0].lower() for d in load_pyproject()["project"]["dependencies"]}
    assert dependencies <= {p.lower() for p in pins}, f"not locked: {sorted(dependencies - {p.lower() for p in pins})}"


def test_app_services_are_health_checked_by_baton_health() -> None:
    for name, svc in app_services(load_compose()).items():
        test = (svc.get("healthcheck") or {}).get("test") or []
        assert test[:2] == ["CMD", "baton"], f"{name}: no `baton health` health check"
        argv = test[2:]
        assert argv[:1] == ["health"] and option_value(argv, "--service") in {"executor", "worker", "dashboard"}, (
            f"{name}: {test}"
        )
        assert_cli_accepts(argv, f"{name} health check")
