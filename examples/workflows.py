"""An example durable workflow: processing an order. `from worker import workflow, step` is all a
workflow module needs.

Each step appends a line to a ledger file (`BATON_EXAMPLE_LEDGER`, default a file in the system's
temporary folder) so that the demo can count how often each one really ran: once each, even when
the worker running the order is killed in the middle.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from worker import step, workflow


def _ledger() -> Path:
    return Path(os.environ.get("BATON_EXAMPLE_LEDGER") or Path(tempfile.gettempdir()) / "baton-example-ledger.txt")


def _note(order_id: str, what: str) -> None:
    with _ledger().open("a") as f:
        f.write(f"{order_id} {what} {os.getpid()}\n")


@step
async def reserve_stock(order_id: str, items: int) -> dict[str, int]:
    _note(order_id, "reserve_stock")
    return {"reserved": items}


@step(retries=2, retry_delay_s=0.2)
async def charge_card(order_id: str, amount: float) -> dict[str, str]:
    _note(order_id, "charge_card")
    return {"charge": f"ch_{order_id}", "amount": f"{amount:.2f}"}


@step
async def pack(order_id: str, seconds: float) -> str:
    _note(order_id, "pack")
    await asyncio.sleep(seconds)  # a long step: the demo kills the worker here
    return f"parcel-{order_id}"


@step
async def print_label(order_id: str) -> str:
    _note(order_id, "print_label")
    return f"label-{order_id}"


@step
async def send_email(order_id: str, parcel: str) -> bool:
    _note(order_id, "send_email")
    return True


@workflow("examples.order", durable=True, description="Reserve, charge, pack and label, ship, email.")
async def order(ctx, order_id: str, amount: float = 10.0, items: int = 1, pack_seconds: float = 2.0,
                ship_after_s: float = 0.5) -> dict:
    reservation = await reserve_stock(order_id, items)
    payment = await charge_card(order_id, amount)
    await ctx.store.set("stage", "charged")
    parcel, label = await asyncio.gather(pack(order_id, pack_seconds), print_label(order_id))
    await ctx.sleep(ship_after_s)  # a durable timer: it keeps its wake-up time across a crash
    await ctx.store.set("stage", "shipped")
    emailed = await send_email(order_id, parcel)
    return {"reservation": reservation, "payment": payment, "parcel": parcel, "label": label, "emailed": emailed,
            "stage": await ctx.store.get("stage")}
