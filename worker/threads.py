"""Synchronous actions run on threads of their own, which nothing can stop: cancelling a run ends
its task at once while its thread goes on. So these threads are counted (a drain that finds one
still running leaves the worker `draining`, not `inactive`: the executor takes its run back once
the process is gone) and are daemon threads (the process exits without waiting for them, as a
SIGKILL would stop them; `asyncio.to_thread`'s pool makes the interpreter's exit wait for each)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_alive: set[threading.Thread] = set()
_alive_lock = threading.Lock()


def in_flight() -> int:
    """Action threads still running, their runs cancelled or not."""
    with _alive_lock:
        return len(_alive)


async def run_in_thread(func: Callable[..., T], /, **kwargs: Any) -> T:
    """``func(**kwargs)`` on a daemon thread of its own, in this task's context."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():  # cancelled: nobody waits for it any more
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            try:
                result = context.run(func, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - the action's own error is its outcome
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)
        except RuntimeError:  # the loop has closed: the process is on its way out
            pass
        finally:
            with _alive_lock:
                _alive.discard(threading.current_thread())

    thread = threading.Thread(target=target, name=f"action:{getattr(func, '__name__', 'sync')}", daemon=True)
    with _alive_lock:
        _alive.add(thread)
    thread.start()
    return await done
