"""`Datapath` against the in-memory kernel: ordering, rollback, leases, read back."""

from __future__ import annotations

import ipaddress
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.kernel import FakeKernel
from vipfarm.datapath.datapath import Datapath, sysctl_settings
from vipfarm.datapath.kernel import DatapathError
from vipfarm.datapath.spec import DatapathSpec, Rule
from vipfarm.datapath.sweeper import Sweeper

V4 = ipaddress.ip_address("198.51.100.100")
V4B = ipaddress.ip_address("198.51.100.101")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path) -> tuple[Datapath, FakeKernel, Clock]:
    clock = Clock()
    k = FakeKernel(clock, links={"lo": "00:00:00:00:00:00", "eth0": "52:54:00:00:00:01"})
    k.sysctls = {name: "0" for name in sysctl_settings("eth0")}
    k.sysctls["net.netfilter.nf_conntrack_tcp_loose"] = "1"
    spec = DatapathSpec(farm="web", interface="eth0", rules=[Rule(vip=V4, port=80)], lease_s=3)
    return Datapath(spec, k, tmp_path), k, clock


def test_start_applies_everything_and_stop_removes_it(tmp_path: Path) -> None:
    dp, k, _ = make(tmp_path)
    before = dict(k.sysctls)
    assert dp.start([1, 2, 3]) == {1, 2, 3}
    assert ("inet", "vipfarm_web") in k.tables and ("netdev", "vipfarm_web") in k.tables
    assert V4 in k.addrs["lo"]
    assert k.sysctls["net.ipv4.conf.eth0.arp_ignore"] == "1"
    assert k.sysctls["net.ipv4.conf.all.arp_announce"] == "2"
    assert k.sysctls["net.netfilter.nf_conntrack_tcp_loose"] == "0"
    assert k.uc_macs["eth0"] == {dp.spec.vmac(V4)}
    dp.stop()
    assert k.tables == set() and k.addrs["lo"] == [] and k.uc_macs["eth0"] == set()
    assert k.sysctls == before
    assert list(tmp_path.iterdir()) == []


def test_failed_start_leaves_nothing(tmp_path: Path) -> None:
    dp, k, _ = make(tmp_path)
    before = dict(k.sysctls)
    k.fail_on.add("add_address")
    with pytest.raises(DatapathError, match="injected"):
        dp.start([1])
    assert k.tables == set() and k.addrs["lo"] == [] and k.sysctls == before
    assert k.uc_macs.get("eth0", set()) == set()


def test_lease_expires_unless_refreshed(tmp_path: Path) -> None:
    dp, _, clock = make(tmp_path)
    dp.start(range(10))
    clock.t += 2
    assert dp.refresh() == set(range(10))
    clock.t += 2.9
    assert dp.read_owned() == set(range(10))
    clock.t += 0.2
    assert dp.read_owned() == set()


def test_set_owned_replaces_and_reads_back(tmp_path: Path) -> None:
    dp, _, _ = make(tmp_path)
    dp.start([1, 2])
    assert dp.set_owned([2, 3]) == {2, 3}
    with pytest.raises(DatapathError, match=r"out of range: buckets are 0\.\.255"):
        dp.set_owned([256])
    assert dp.read_owned() == {2, 3}


def test_vip_on_another_interface_is_refused(tmp_path: Path) -> None:
    dp, k, _ = make(tmp_path)
    k.addrs["eth0"] = [V4]
    with pytest.raises(DatapathError, match="already an address of eth0"):
        dp.start()
    assert k.tables == set()


def test_missing_interface_is_refused(tmp_path: Path) -> None:
    dp, k, _ = make(tmp_path)
    del k.links["eth0"]
    with pytest.raises(DatapathError, match="interface 'eth0' does not exist"):
        dp.start()


def test_crash_keeps_original_sysctls(tmp_path: Path) -> None:
    dp, k, _ = make(tmp_path)
    before = dict(k.sysctls)
    dp.start([1])
    # the process dies without stop(); a new one starts over the leftovers
    dp2 = Datapath(dp.spec, k, tmp_path)
    dp2.start([1])
    dp2.stop()
    assert k.sysctls == before and k.addrs["lo"] == [] and k.tables == set()


def test_update_changes_vips_and_keeps_leases(tmp_path: Path) -> None:
    dp, k, _ = make(tmp_path)
    dp.start([4, 5])
    new = dp.spec.model_copy(update={"rules": [Rule(vip=V4B, port=443)]})
    assert dp.update(new) == {4, 5}
    assert k.addrs["lo"] == [V4B]
    assert k.uc_macs["eth0"] == {new.vmac(V4B)}
    with pytest.raises(DatapathError, match="interface changed"):
        dp.update(new.model_copy(update={"interface": "eth1"}))


def make_kept(tmp_path: Path) -> tuple[Datapath, FakeKernel, Clock]:
    clock = Clock()
    k = FakeKernel(clock, links={"lo": "00:00:00:00:00:00", "eth0": "52:54:00:00:00:01"})
    k.sysctls = {name: "0" for name in sysctl_settings("eth0")}
    spec = DatapathSpec(farm="web", interface="eth0", rules=[Rule(vip=V4, port=80)], lease_s=3)
    return Datapath(spec, k, tmp_path, clock=clock), k, clock


def test_a_released_bucket_is_kept_in_the_same_transaction(tmp_path: Path) -> None:
    dp, k, _ = make_kept(tmp_path)
    dp.start([1, 2, 3])
    assert dp.kept == {1, 2, 3} and dp.lingering == set()  # kept holds the owned buckets
    calls = len(k.batches)
    assert dp.set_owned([3, 4]) == {3, 4}
    assert dp.kept == {1, 2, 3, 4} and k.kept["vipfarm_web"] == {1, 2, 3, 4}
    assert dp.lingering == {1, 2}
    assert len(k.batches) == calls  # sets only: no ruleset apply
    assert dp.set_owned([1, 3]) == {1, 3}
    assert dp.kept == {1, 2, 3, 4} and dp.lingering == {2, 4}  # 1 is owned again


def test_an_owned_bucket_is_kept_so_its_connections_outlive_the_lease(tmp_path: Path) -> None:
    dp, k, clock = make_kept(tmp_path)
    dp.start([1, 2])
    assert k.frame("web", 1) == "owned" and k.frame("web", 9) == "dropped"
    k.conntrack = {1: 1}
    clock.t += 3.5  # the daemon died: nothing renews the leases
    assert dp.read_owned() == set()
    assert k.frame("web", 1) == "kept"  # its connection goes on
    # Kept too, connection or not: with nobody to sweep, the new owner's frames of it go on to
    # conntrack (which drops them), instead of being dropped at ingress. It costs no connection.
    assert k.frame("web", 2) == "kept"
    clock.t += 5
    assert dp.sweep().released == set()  # still intended: not released


def test_sweep_releases_a_kept_bucket_once_its_last_connection_is_gone(tmp_path: Path) -> None:
    dp, k, clock = make_kept(tmp_path)
    dp.start([1, 2])
    k.conntrack = {1: 3, 2: 1}
    dp.set_owned([])
    assert dp.kept == {1, 2}
    # inside the grace period nothing is released, even with no connection
    k.conntrack = {1: 3}
    assert dp.sweep().released == set()
    clock.t += 1.5
    result = dp.sweep()
    assert result.released == {2} and result.kept == {1} and dp.kept == {1}
    k.conntrack = {1: 0}
    assert dp.sweep().released == {1}
    assert dp.kept == set() and k.kept["vipfarm_web"] == set()


def test_an_incomplete_scan_releases_nothing(tmp_path: Path) -> None:
    dp, k, clock = make_kept(tmp_path)
    dp.start([1, 2])
    dp.set_owned([])
    clock.t += 2
    k.conntrack = {1: 10}
    result = dp.sweep(budget=5)
    assert not result.complete and result.released == set() and dp.kept == {1, 2}
    assert dp.sweep().released == {2}


def test_a_bucket_acquired_during_the_scan_is_not_released(tmp_path: Path) -> None:
    dp, k, clock = make_kept(tmp_path)
    dp.start([1, 2])
    dp.set_owned([])
    clock.t += 2

    def meanwhile() -> None:  # re-acquired and given away again while the scan ran
        k.scan_hook = None
        dp.set_owned([1])
        dp.set_owned([])

    k.scan_hook = meanwhile
    result = dp.sweep()
    assert result.released == {2} and dp.kept == {1}
    clock.t += 2
    assert dp.sweep().released == {1}


def test_sweep_adopts_connections_whose_bucket_is_in_neither_set(tmp_path: Path) -> None:
    dp, k, clock = make_kept(tmp_path)
    dp.start([1])
    k.conntrack = {1: 2, 7: 1, 9999: 1}  # 9999: not a bucket of this spec, never adopted
    result = dp.sweep()
    assert result.adopted == {7} and dp.kept == {1, 7}  # 1 is owned (so kept): not adopted
    k.conntrack = {1: 2}
    clock.t += 2
    assert dp.sweep().released == {7}


def test_start_keeps_the_kept_buckets_a_crashed_run_left(tmp_path: Path) -> None:
    dp, k, _ = make_kept(tmp_path)
    dp.start([1, 2])
    dp.set_owned([2])
    dp2 = Datapath(dp.spec, k, tmp_path, clock=dp.clock)
    dp2.start([])
    assert dp2.kept == {1, 2}  # both kept when it crashed (2 owned, so kept as well)
    dp2.stop()
    assert dp2.kept == set()


def test_sweeper_counts_failures_and_goes_on(tmp_path: Path) -> None:
    dp, k, clock = make_kept(tmp_path)
    dp.start([1])
    dp.set_owned([])
    sweeper = Sweeper(dp)
    k.fail_on.add("ct_scan")
    assert sweeper.sweep_once() is None and sweeper.sweep_once() is None
    assert sweeper.counters["sweep_errors"] == 2
    k.fail_on.clear()
    clock.t += 2
    result = sweeper.sweep_once()
    assert result is not None and result.released == {1} and sweeper.counters["sweeps"] == 1


def test_sweeper_rests_long_with_nothing_kept_and_a_poke_wakes_it(tmp_path: Path) -> None:
    dp, _, _ = make_kept(tmp_path)
    dp.start([1])
    sweeper = Sweeper(dp, period_s=0.01, idle_s=3600)
    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while sweeper.counters["sweeps"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sweeper.counters["sweeps"] == 1  # nothing kept: resting for the idle period
        dp.set_owned([])
        sweeper.poke()
        while sweeper.counters["sweeps"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # kept now: sweeping at the short period
        assert sweeper.counters["sweeps"] >= 3
    finally:
        sweeper.stop()


# ---- the prefilter (vipfarm.datapath.prefilter): its bitmap is always a superset of kept


def guarded(k: FakeKernel) -> list[str]:
    """Make `k` check, at every change of the kept set, that the prefilter's bitmap already
    holds what nftables is about to keep (and still holds what it keeps afterwards)."""
    seen: list[str] = []
    set_owned, update_kept = k.nft_set_owned, k.nft_update_kept

    def bits() -> set[int]:
        return k.prefilter.get("web", set(range(4096)))  # no prefilter: nothing is dropped

    def checked_set_owned(
        farm: str,
        buckets: frozenset[int],
        lease_s: float,
        keep: frozenset[int] = frozenset(),
        unkeep: frozenset[int] = frozenset(),
    ) -> None:
        assert buckets | keep <= bits(), "nftables keeps a bucket the prefilter would drop"
        set_owned(farm, buckets, lease_s, keep, unkeep)
        seen.append("set_owned")

    def checked_update_kept(farm: str, add: frozenset[int], remove: frozenset[int]) -> None:
        assert add <= bits(), "nftables adopts a bucket the prefilter would drop"
        update_kept(farm, add, remove)
        assert k.kept["vipfarm_web"] <= bits()
        seen.append("update_kept")

    k.nft_set_owned = checked_set_owned  # type: ignore[method-assign]
    k.nft_update_kept = checked_update_kept  # type: ignore[method-assign]
    return seen


def test_the_prefilter_never_drops_what_nftables_keeps(tmp_path: Path) -> None:
    dp, k, clock = make_kept(tmp_path)
    seen = guarded(k)
    dp.start([1, 2])
    assert dp.prefilter_state() == {"on": True, "kept": 2, "dropped": 0}
    assert k.frame("web", 1) == "owned" and k.frame("web", 9) == "dropped"
    rnd = random.Random(7)
    for _ in range(300):
        step = rnd.random()
        if step < 0.4:
            dp.set_owned(rnd.sample(range(16), rnd.randrange(6)))
        elif step < 0.7:
            k.conntrack = {b: rnd.randrange(2) for b in rnd.sample(range(16), 4)}
        else:
            clock.t += rnd.choice((0.2, 1.5))
            dp.sweep()
        assert k.kept["vipfarm_web"] <= k.prefilter["web"]
        assert {b for b in range(16) if k.frame("web", b) != "dropped"} == k.kept["vipfarm_web"]
    assert {"set_owned", "update_kept"} <= set(seen)
    # released buckets leave the bitmap too (after nftables let them go)
    dp.set_owned([])
    k.conntrack = {}
    clock.t += 2
    dp.sweep()
    assert k.kept["vipfarm_web"] == set() and k.prefilter["web"] == set()
    dp.stop()
    assert k.prefilter == {} and dp.prefilter_state()["on"] is False


def test_without_a_prefilter_nftables_decides_alone_and_says_why(tmp_path: Path) -> None:
    dp, k, _ = make_kept(tmp_path)
    k.fail_on.add("prefilter_load")  # a kernel before 6.6: no tcx
    assert dp.start([1]) == {1}
    assert dp.prefilter_state() == {
        "on": False,
        "off_because": "injected failure in prefilter_load",
        "dropped": 0,
    }
    assert k.frame("web", 1) == "owned" and k.frame("web", 2) == "dropped"  # nftables still
    k.fail_on.clear()
    dp.update(dp.spec.model_copy(update={"lease_s": 2.0}))  # an update tries again
    assert dp.prefilter_state()["on"] is True and k.prefilter["web"] == {1}
    dp.update(dp.spec.model_copy(update={"prefilter": False}))
    assert dp.prefilter_state()["off_because"] == "turned off" and "web" not in k.prefilter
    dp.update(dp.spec.model_copy(update={"prefilter": True, "decide_at": "prerouting"}))
    assert "web" not in k.prefilter  # the old decision point is measured without it


def test_a_failed_bitmap_write_takes_the_prefilter_away_before_nftables_keeps(
    tmp_path: Path,
) -> None:
    dp, k, _ = make_kept(tmp_path)
    guarded(k)
    dp.start([1])
    k.fail_on.add("prefilter_set_kept")
    assert dp.set_owned([1, 5]) == {1, 5}  # the guard saw no bucket the prefilter would drop
    assert "web" not in k.prefilter and k.frame("web", 5) == "owned"
    assert str(dp.prefilter_state()["off_because"]).endswith("prefilter_set_kept")


def test_nftables_decides_alone_while_the_rules_change(tmp_path: Path) -> None:
    dp, k, _ = make_kept(tmp_path)
    dp.start([1])
    attached_at_apply: list[bool] = []
    apply = k.nft_apply

    def watched(batch: list[dict[str, Any]]) -> None:
        attached_at_apply.append("web" in k.prefilter)
        apply(batch)

    k.nft_apply = watched  # type: ignore[method-assign]
    loads = k.prefilter_loads
    new = dp.spec.model_copy(update={"rules": [Rule(vip=V4, port=80, affinity="client-ip-port")]})
    dp.update(new)
    # The old program hashes by the old rules (and nftables trusts its marks): gone meanwhile.
    assert attached_at_apply == [False]
    assert k.prefilter_loads == loads + 1 and k.prefilter_spec["web"] is new
    assert k.prefilter["web"] == {1}  # then back, with the truth: kept, owned included
    dp.update(new.model_copy(update={"lease_s": 2.0}))  # same rules: swapped in place
    assert attached_at_apply == [False, True]
