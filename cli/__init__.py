"""`baton`: run the services, post invocations, and look at executions, workflows, schedules and
workers. It sits above `common`, `executor`, `worker` and `dashboard` (which it imports lazily, in
the commands that run them); nothing imports it."""

from cli import catalogue, executions, services  # noqa: F401 - each registers its commands
from cli.app import app, main

__all__ = ["app", "main"]
