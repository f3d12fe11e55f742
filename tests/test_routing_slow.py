"""One slow backend at concurrency 16, on real Greet servers in a child process (benchmarks/slow_backend.py):
``least_request`` and ``peak_ewma`` keep the slow backend to probe calls (a 20 ms one gets under 2 % of the
calls, and still some), their p99 is at most half of round_robin's in the same test (with a 50 ms backend,
so that this shared machine's own stalls cannot decide it), and a slow backend that becomes fast again
regains its full share within 5 s."""

from __future__ import annotations

import pytest

from benchmarks.slow_backend import backends, measure, recovery
from lookaside_dev.fakes import RunningLookaside


def test_a_20_ms_backend_gets_probe_calls_only() -> None:
    with backends(0.02) as b, RunningLookaside(b.addresses) as la:
        rr = measure(la.address, b, "round_robin", 1500)
        assert rr["slow_share"] > 0.3, rr
        for policy in ("least_request", "peak_ewma"):
            got = measure(la.address, b, policy, 3000)
            assert 1 <= got["to_slow"] < 0.02 * got["calls"], got


def test_least_loaded_policies_halve_round_robins_p99() -> None:
    with backends(0.05) as b, RunningLookaside(b.addresses) as la:
        rr = measure(la.address, b, "round_robin", 1500)
        for policy in ("least_request", "peak_ewma"):
            got = measure(la.address, b, policy, 3000)
            assert got["p99_ms"] <= 0.5 * rr["p99_ms"], (rr, got)
            assert got["to_slow"] >= 1, got  # still probed


@pytest.mark.parametrize("policy", ["least_request", "peak_ewma"])
def test_a_slow_backend_fast_again_regains_its_full_share_within_5_s(policy: str) -> None:
    with backends(0.02) as b, RunningLookaside(b.addresses) as la:
        got = recovery(la.address, b, policy, after_s=5.5)
    assert got["share_before"] < 0.03, got
    assert got["regained_after_s"] is not None and got["regained_after_s"] <= 4.5, got
    later = [s for t, s in got["shares_per_half_second"].items() if t > got["regained_after_s"]]
    assert later and min(later) >= 0.2, got  # and keeps it (a full share is 1/3)
