"""The render budget of the HTTP listener (``_web/render_budget.py``): fresh renders within the budget, the
newest rendering again beyond it (with ``Age``), 429 when there is none, one render for concurrent requests,
and a bounded number of renderings kept. Deterministic: a fake clock and counting render functions."""

from __future__ import annotations

import asyncio

import pytest

from lookaside_server._web.http import HTTP_RENDER_BUDGET, HttpResponse
from lookaside_server._web.render_budget import RenderBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Renders:
    """A render function that answers its call number."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> HttpResponse:
        self.calls += 1
        return HttpResponse(200, str(self.calls).encode())


def budget(clock: Clock, hits: list[str], rate: float = 4.0, max_keys: int = 16) -> RenderBudget:
    return RenderBudget(rate, max_keys=max_keys, on_limit=hits.append, clock=clock)


async def test_fresh_within_the_budget_then_the_newest_rendering_with_its_age() -> None:
    clock, hits, render = Clock(), [], Renders()
    b = budget(clock, hits)
    bodies = [(await b.get("json", render)).body for _ in range(4)]
    assert bodies == [b"1", b"2", b"3", b"4"] and hits == []  # the burst: every request fresh
    clock.now += 2.0
    again = await b.get("json", render)  # refilled
    assert again.body == b"5" and "Age" not in again.headers
    for _ in range(3):
        await b.get("json", render)
    over = await b.get("json", render)  # spent: the newest rendering, rendered 0 s ago
    assert over.body == b"8" and over.headers["Age"] == "0" and hits == [HTTP_RENDER_BUDGET]
    clock.now += 0.2  # under one token: still the old one, now older
    assert (await b.get("json", render)).headers["Age"] == "0"
    clock.now += 0.1  # 0.3 s at 4/s: a token again
    assert (await b.get("json", render)).body == b"9"
    assert render.calls == 9 and b.reused == 2


async def test_concurrent_requests_share_one_render() -> None:
    clock, hits = Clock(), []
    b = budget(clock, hits)
    started, release, calls = asyncio.Event(), asyncio.Event(), []

    async def slow() -> HttpResponse:
        calls.append(1)
        started.set()
        await release.wait()
        return HttpResponse(200, b"shared")

    first = asyncio.create_task(b.get("page", slow))
    await started.wait()
    others = [asyncio.create_task(b.get("page", slow)) for _ in range(20)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(first, *others)
    assert len(calls) == 1 and {r.body for r in results} == {b"shared"} and hits == []


async def test_a_requester_going_away_does_not_cancel_the_render_others_wait_for() -> None:
    clock, hits = Clock(), []
    b = budget(clock, hits)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> HttpResponse:
        started.set()
        await release.wait()
        return HttpResponse(200, b"done")

    first = asyncio.create_task(b.get("page", slow))
    await started.wait()
    second = asyncio.create_task(b.get("page", slow))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert (await second).body == b"done"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_varying_the_key_buys_no_more_renders_and_keys_are_bounded() -> None:
    clock, hits, render = Clock(), [], Renders()
    b = budget(clock, hits, rate=1.0, max_keys=3)
    answers = [await b.get(f"/metrics?name[]={i}", render) for i in range(10)]
    fresh = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 429]
    assert len(fresh) == 4 and render.calls == 4  # all keys together: 4x the per-key burst of 1
    assert len(refused) == 6 and all(a.headers["Retry-After"] == "1" for a in refused)
    assert hits == [HTTP_RENDER_BUDGET] * 6
    assert len(b._entries) == 3  # the newest keys only


async def test_errors_are_not_kept_and_do_not_hide_the_last_good_rendering() -> None:
    clock, hits = Clock(), []
    b = budget(clock, hits, rate=1.0)
    await b.get("page", Renders())

    async def failing() -> HttpResponse:
        return HttpResponse(503, b"not now")

    clock.now += 1.0
    assert (await b.get("page", failing)).status == 503
    over = await b.get("page", failing)  # over the budget: the last good one, not the 503
    assert over.status == 200 and over.body == b"1"


def test_a_budget_needs_a_positive_rate() -> None:
    for rate in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rate"):
            RenderBudget(rate)
