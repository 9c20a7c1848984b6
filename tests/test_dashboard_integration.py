"""The web dashboard in a real browser (Debian's chromium, driven by Playwright) against a real
executor, workers and dashboard process."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
import uuid

import aio_pika
import pytest

from tests.harness import AMQP_URL, Baton, free_port, wait_until

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TOKEN = "s3cret-token"


@pytest.fixture
async def browser():
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: `make test` installs it (scripts/ensure-browser.sh)")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


async def _dashboard(baton: Baton, label: str = "dashboard", **env: str) -> str:
    port = free_port()
    service = baton.spawn(label, "dashboard", "--port", str(port), BATON__DASHBOARD__REFRESH_INTERVAL="0.2", **env)
    url = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        if service.process.poll() is not None:
            raise AssertionError(service.log_path.read_text()[-2000:])
        try:
            await asyncio.to_thread(urllib.request.urlopen, url + "/workers", timeout=2)
        except OSError:
            return False
        return True

    await wait_until(up, what="the dashboard to listen")
    return url


def _post(url: str, data: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_pages_update_live_and_cancel_needs_the_token(baton, browser):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("dash-w", concurrency=2))
    url = await _dashboard(baton, BATON__DASHBOARD__TOKEN=TOKEN)
    client = await baton.client()
    page = await browser.new_page()

    await page.goto(url + "/workers")
    row = page.locator('tr[data-worker="dash-w"]')
    await row.wait_for()
    assert "active" in await row.inner_text()

    # A run goes from running to completed on its page, live, without a reload.
    short = await client.submit("core.sleep", {"seconds": 1.5}, watch=True)
    await baton.wait_status(short.execution_id, "running")
    await page.goto(f"{url}/executions/{short.execution_id}")
    assert await page.inner_text("#status") == "running"
    await page.wait_for_function("document.getElementById('status').textContent === 'completed'", timeout=15_000)
    assert "execution.completed" in await page.inner_text("#timeline")

    # Cancelling needs the token: refused without it, done with it.
    long = await client.submit("core.sleep", {"seconds": 60}, watch=True)
    await baton.wait_status(long.execution_id, "running")
    await page.goto(f"{url}/executions/{long.execution_id}")
    await page.click("#cancel")
    assert "token is missing or wrong" in await page.inner_text("body")
    assert (await baton.execution(long.execution_id))["status"] == "running"
    await page.goto(f"{url}/executions/{long.execution_id}")
    await page.fill("#token", TOKEN)
    await page.click("#cancel")
    await page.wait_for_function("document.getElementById('status').textContent === 'cancelled'", timeout=10_000)
    assert "cancelled" in await page.inner_text(".notice")
    assert (await baton.wait_status(long.execution_id, "cancelled"))["status"] == "cancelled"

    # The list filters by status and finds an id by its prefix; the overview counts.
    await page.goto(f"{url}/executions?status=completed")
    listed = await page.inner_text("#executions")
    assert str(short.execution_id)[:8] in listed and str(long.execution_id)[:8] not in listed
    await page.goto(f"{url}/executions?q={str(long.execution_id)[:6]}")
    assert str(long.execution_id)[:8] in await page.inner_text("#executions")
    await page.goto(f"{url}/executions?status=bogus")
    assert "no status 'bogus'" in await page.inner_text("#live")
    await page.goto(url + "/")
    await page.wait_for_selector("#finished-completed")
    assert int(await page.inner_text("#finished-completed")) >= 1
    await page.screenshot(path=str(baton.tmp / "overview.png"))


async def test_a_workflow_page_shows_steps_and_a_read_only_dashboard_refuses_actions(baton, browser):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("dash-w"))
    url = await _dashboard(baton)  # no token: read-only
    client = await baton.client()
    order = await client.run("examples.order", {"order_id": "d-1", "pack_seconds": 0.1}, wait_timeout_s=30)
    page = await browser.new_page()
    await page.goto(f"{url}/executions/{order['id']}")
    steps = await page.inner_text("#steps")
    for name in ("reserve_stock", "charge_card", "pack", "print_label", "sleep", "send_email"):
        assert name in steps
    assert "workflow.started" in await page.inner_text("#timeline")
    assert await page.is_disabled("#retry")
    status, body = await asyncio.to_thread(_post, f"{url}/executions/{order['id']}/retry", {"token": "anything"})
    assert status == 403 and "read-only" in body


async def test_parked_requests_are_listed_with_their_reason_and_replayed_with_the_token(baton, browser):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("dash-w"))
    url = await _dashboard(baton, BATON__DASHBOARD__TOKEN=TOKEN)
    await baton.publish_raw(b"this is not json", message_id="not-json-1")
    await baton.take_parked(1)  # parked, then taken off to start from a known state
    await baton.publish_raw(b"this is not json", message_id="not-json-2")

    async def parked() -> bool:
        return await baton.queue_depth(baton.names.rejected_requests_queue) >= 1

    await wait_until(parked, what="the bad request to be parked")
    # A request parked by an older deployment's stricter limits, valid today: it can be replayed.
    execution_id = uuid.uuid4()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps({"action_ref": "core.echo", "parameters": {"message": "again"}}).encode(),
                             message_id=str(execution_id), headers={"x-baton-reason": "over an older size limit"}),
            routing_key=baton.names.rejected_requests_queue,
        )
    finally:
        await connection.close()

    page = await browser.new_page()
    await page.goto(url + "/rejected")
    table = await page.inner_text("#rejected")
    assert "not JSON" in table and "over an older size limit" in table
    await page.fill("#token", TOKEN)
    await page.locator("tr", has_text="over an older size limit").locator("button").click()
    assert "posted again" in await page.inner_text(".notice")
    done = await (await baton.client()).wait(execution_id, 20)
    assert done["status"] == "completed" and done["result"] == {"message": "again"}
    await page.goto(url + "/rejected")
    table = await page.inner_text("#rejected")
    assert "over an older size limit" not in table and "not JSON" in table  # the other stays parked
