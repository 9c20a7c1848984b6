"""Fixtures. Integration tests use the real PostgreSQL and RabbitMQ on this machine: each test
gets its own database, cloned from a migrated template, and its own AMQP name prefix."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.harness import REPO, Baton, PrivatePostgres, PrivateRabbit, drop_database, make_template

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


@pytest.fixture
async def private_baton(tmp_path: Path):
    """A world on a PostgreSQL and a RabbitMQ of the test's own, for tests that restart them: the
    machine's shared servers are never touched. `world.private_pg` and `world.private_rabbit`."""
    pg, rabbit = PrivatePostgres(tmp_path), PrivateRabbit(tmp_path)
    await asyncio.gather(asyncio.to_thread(pg.start), asyncio.to_thread(rabbit.start))
    try:
        template = await make_template(pg.url)
        world = Baton(template=template, tmp=tmp_path, pg_url=pg.url, amqp_url=rabbit.url)
        world.private_pg = pg  # type: ignore[attr-defined]
        world.private_rabbit = rabbit  # type: ignore[attr-defined]
        await world.setup()
        try:
            yield world
        finally:
            await world.teardown()
    finally:
        await asyncio.gather(asyncio.to_thread(rabbit.stop), asyncio.to_thread(pg.stop))
