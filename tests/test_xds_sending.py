"""The xDS sending budget (``_xds/stream.py`` ``SendingBudget``): the bytes of responses being built and
written at once are bounded over all streams, first come first served, and a cancelled waiter neither
leaks its share nor blocks the others. Deterministic: futures released by hand, no timing."""

from __future__ import annotations

import asyncio

import pytest

from lookaside_server._xds.resources import XdsOptions
from lookaside_server._xds.stream import SendingBudget


async def hold_until(
    budget: SendingBudget, size: int, release: asyncio.Event, log: list[str], name: str
) -> None:
    async with budget.hold(size):
        log.append(f"{name} in")
        await release.wait()
    log.append(f"{name} out")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_bytes_in_flight_stay_within_the_budget_in_arrival_order() -> None:
    budget = SendingBudget(100)
    log: list[str] = []
    gates = {name: asyncio.Event() for name in "abcd"}
    sizes = {"a": 60, "b": 50, "c": 30, "d": 10}
    tasks = {n: asyncio.create_task(hold_until(budget, sizes[n], gates[n], log, n)) for n in "abcd"}
    await settle()
    assert log == ["a in"] and budget.used == 60  # b does not fit; c and d queue behind it (no overtaking)
    gates["a"].set()
    await settle()
    assert log == ["a in", "a out", "b in", "c in", "d in"] and budget.used == 90
    for n in "bcd":
        gates[n].set()
    await asyncio.gather(*tasks.values())
    assert budget.used == 0 and budget.waited == 3


async def test_a_response_bigger_than_the_budget_goes_alone() -> None:
    budget = SendingBudget(100)
    log: list[str] = []
    small, big = asyncio.Event(), asyncio.Event()
    t1 = asyncio.create_task(hold_until(budget, 10, small, log, "small"))
    await settle()
    t2 = asyncio.create_task(hold_until(budget, 10_000, big, log, "big"))
    await settle()
    assert log == ["small in"]
    small.set()
    await settle()
    assert log[-1] == "big in" and budget.used == 100
    big.set()
    await asyncio.gather(t1, t2)
    assert budget.used == 0


async def test_a_cancelled_waiter_leaves_no_share_behind() -> None:
    budget = SendingBudget(100)
    log: list[str] = []
    first, third = asyncio.Event(), asyncio.Event()
    t1 = asyncio.create_task(hold_until(budget, 80, first, log, "first"))
    await settle()
    t2 = asyncio.create_task(hold_until(budget, 50, asyncio.Event(), log, "second"))
    t3 = asyncio.create_task(hold_until(budget, 20, third, log, "third"))
    await settle()
    t2.cancel()  # the client of the second stream went away while it waited
    await settle()
    assert log == ["first in", "third in"] and budget.used == 100  # third was only behind second
    first.set()
    third.set()
    await asyncio.gather(t1, t3)
    with pytest.raises(asyncio.CancelledError):
        await t2
    assert budget.used == 0 and not budget._waiting


def test_the_budget_is_an_option_with_a_bound() -> None:
    assert XdsOptions().max_sending_bytes == 32 << 20
    with pytest.raises(ValueError, match="max_sending_bytes"):
        XdsOptions(max_sending_bytes=0)
