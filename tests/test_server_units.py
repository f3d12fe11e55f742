"""Unit tests of the server's pure parts: port selection, eligibility, rotation, the registry."""

from __future__ import annotations

import asyncio

import pytest

from lookaside_server import BackendEndpoint, EndpointSource, Target, TargetNotFound
from lookaside_server._core.ports import RoundRobin, UnknownPort, eligible, select_port
from lookaside_server._core.registry import Registry

T = Target("greet", "default")


def ep(ip: str, port: int = 80, name: str = "", **kw: bool) -> BackendEndpoint:
    return BackendEndpoint(ip, port, port_name=name, **kw)


def test_select_port() -> None:
    eps = (ep("a", 80, "http"), ep("a", 81, "grpc"), ep("b", 80, "http"), ep("b", 81, "grpc"))
    assert select_port(eps, "") == ("http", (eps[0], eps[2]))
    assert select_port(eps, "grpc") == ("grpc", (eps[1], eps[3]))
    assert select_port(eps, "81") == ("grpc", (eps[1], eps[3]))  # same rotation as by name
    with pytest.raises(UnknownPort, match="'metrics'.*http, grpc"):
        select_port(eps, "metrics")
    unnamed = (ep("a", 80), ep("a", 81))
    assert select_port(unnamed, "") == ("", unnamed)
    assert select_port(unnamed, "81") == ("81", (unnamed[1],))
    assert select_port((), "") == ("", ())


def test_eligible() -> None:
    ready, not_ready = ep("a"), ep("b", ready=False, serving=False)
    draining = ep("c", ready=False, serving=True, terminating=True)
    dead = ep("d", ready=False, serving=False, terminating=True)
    assert eligible((ready, not_ready, draining)) == (ready,)
    assert eligible((not_ready, draining, dead)) == (draining,)
    assert eligible((not_ready, dead)) == ()


def test_round_robin_counter_never_resets() -> None:
    rr = RoundRobin()
    three, two = (ep("a"), ep("b"), ep("c")), (ep("a"), ep("b"))
    assert [e.ip for e in rr.pick(T, "", three, 4)] == ["a", "b", "c", "a"]
    assert [e.ip for e in rr.pick(T, "", two, 3)] == ["a", "b", "a"]  # positions 4, 5, 6 over two
    assert [e.ip for e in rr.pick(T, "grpc", two, 1)] == ["a"]  # another port has its own rotation


class FakeSource(EndpointSource):
    """A source whose subscribe is slow, to check the registry subscribes each target once."""

    def __init__(self) -> None:
        self.calls = 0
        self.publish = None
        self.gate = asyncio.Event()

    async def start(self, publish):  # type: ignore[no-untyped-def]
        self.publish = publish

    async def subscribe(self, target: Target) -> None:
        self.calls += 1
        await self.gate.wait()
        if target.service == "nope":
            raise TargetNotFound(target)
        self.publish(target, (ep("a"),))

    async def unsubscribe(self, target: Target) -> None:
        pass

    async def stop(self) -> None:
        pass


async def test_registry_subscribes_once_and_versions() -> None:
    src = FakeSource()
    reg = Registry(src)
    await src.start(reg.publish)
    tasks = [asyncio.create_task(reg.get(T)) for _ in range(10)]
    await asyncio.sleep(0)
    src.gate.set()
    states = await asyncio.gather(*tasks)
    assert src.calls == 1 and {s.version for s in states} == {1}
    with pytest.raises(TargetNotFound):
        await reg.get(Target("nope", "default"))
    sub = await reg.watch(T)
    assert (await sub.next()).version == 1
    reg.publish(T, (ep("a"),))  # unchanged: no bump, no notification
    reg.publish(T, (ep("b"),))
    reg.publish(T, (ep("c"),))  # conflated: the watcher sees only the latest
    got = await sub.next()
    assert (got.version, got.endpoints) == (3, (ep("c"),))
    reg.publish(T, None)
    with pytest.raises(TargetNotFound):
        await reg.get(T)
    assert (await sub.next()).endpoints is None
    reg.close()
    assert await sub.next() is None
    assert reg.snapshot()[0].version == 4


def test_select_port_takes_any_spelling_of_a_target_port() -> None:
    eps = (ep("a", 8080, "http"), ep("a", 9090, "grpc"))
    assert select_port(eps, "08080") == ("http", (eps[0],))  # the Target's canonical port
    for bad in ("0", "65536", "9" * 5000, "²", "GRPC", "-x"):
        with pytest.raises(UnknownPort):
            select_port(eps, bad)


async def test_registry_fans_a_change_out_in_batches_and_the_newest_wins() -> None:
    from lookaside_server._core.registry import FANOUT_BATCH

    src = FakeSource()
    src.gate.set()
    reg = Registry(src)
    await src.start(reg.publish)
    subs = [await reg.watch(T) for _ in range(5 * FANOUT_BATCH)]
    for sub in subs:
        assert (await sub.next()).version == 1
    reg.publish(T, (ep("b"),))
    woken = sum(1 for s in subs if s._event.is_set())  # noqa: SLF001 - what the fan-out has reached
    assert woken == 0  # nothing synchronously: the fan-out is a task
    await asyncio.sleep(0)
    assert sum(1 for s in subs if s._event.is_set()) == FANOUT_BATCH  # noqa: SLF001 - one batch per iteration
    reg.publish(T, (ep("c"),))  # a newer state while the first fan-out is under way
    states = await asyncio.gather(*(s.next() for s in subs))
    assert {(s.version, s.endpoints) for s in states} == {(3, (ep("c"),))}
    # a weights resend reaches everyone who holds nothing newer, also in batches
    reg.resend_all(T)
    states = await asyncio.gather(*(s.next() for s in subs))
    assert {s.version for s in states} == {3}
    assert states[0] is states[-1]  # one state object (and its cache) shared by every watcher
    reg.close()
    assert {await s.next() for s in subs} == {None}
