"""Awaiting a blocking call on a thread of its own, which exits afterwards (the daemon's loads,
rollbacks and activations: see ``in_fresh_thread``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_fresh_thread(fn: Callable[[], T], name: str) -> T:
    """Run ``fn`` on a new thread that exits afterwards.

    Loading runs torch on the calling thread, and torch's OpenMP runtime keeps a thread team per
    thread that ran it. A long-lived loader thread would keep its team alive beside the synthesis
    workers' teams: more spinning OpenMP threads than cores, and measured synthesis 20-35 ms slower
    per short request on 2 cores. A thread that exits frees its team.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_set_exception, future, exc)
        else:
            loop.call_soon_threadsafe(_set_result, future, result)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


def _set_result(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
