"""Fixtures. Integration tests use the real PostgreSQL and RabbitMQ on this machine: each test
gets its own database, cloned from a migrated template, and its own AMQP name prefix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness import REPO, Baton, drop_database, make_template

os.environ["BATON_CONFIG"] = str(REPO / "config" / "config.yaml")
for key in [k for k in os.environ if k.startswith("BATON__")]:
    del os.environ[key]  # the developer's own overrides must not leak into the tests


@pytest.fixture(scope="session")
async def template_db():
    name = await make_template()
    yield name
    await drop_database(name)


@pytest.fixture
async def baton(template_db: str, tmp_path: Path):
    world = Baton(template=template_db, tmp=tmp_path)
    await world.setup()
    try:
        yield world
    finally:
        await world.teardown()
