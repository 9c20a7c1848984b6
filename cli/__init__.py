"""`baton`: run the services, post invocations, and look at executions, workflows, schedules and
workers. It sits above `common`, `executor`, `worker` and `dashboard` (which it imports lazily, in
the commands that run them); nothing imports it.

A service command (`baton worker`, `baton executor`, ...) loads only the services' commands: a
process start is mostly imports, and tests and deployments start services often."""

from __future__ import annotations

import importlib
import sys

from cli.app import app

#: Modules that register commands; the first is all a service command needs.
_SERVICE_COMMANDS_MODULE = "cli.services"
_OTHER_COMMAND_MODULES = ("cli.catalogue", "cli.executions", "cli.controls")
#: The commands that `cli.services` registers.
SERVICE_COMMANDS = frozenset({"executor", "worker", "dashboard", "health", "db"})


def command_of(argv: list[str]) -> str | None:
    """The command word of a command line (global options, `--config PATH` and `--debug`, may
    stand before it), or None if there is none."""
    rest = iter(argv)
    for arg in rest:
        if arg == "--config":
            next(rest, None)
        elif not arg.startswith("-"):
            return arg
    return None


def load_commands(argv: list[str] | None = None) -> None:
    """Register on `app` the commands a command line needs: all of them (with no command line, or
    one that does not run a service), else only the services'."""
    importlib.import_module(_SERVICE_COMMANDS_MODULE)
    if argv is None or command_of(argv) not in SERVICE_COMMANDS:
        for module in _OTHER_COMMAND_MODULES:
            importlib.import_module(module)


def main() -> None:  # console script entry
    load_commands(sys.argv[1:])
    from cli.app import main as run

    run()


__all__ = ["app", "load_commands", "main"]
