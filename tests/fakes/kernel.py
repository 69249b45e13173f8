"""In-memory stand-in for `LinuxKernel`, for unit tests of the data path logic.

It models what the logic relies on: tables appear and disappear with the JSON batches, the sets
live in the netdev table, owned buckets expire with their lease on an injected clock, kept ones
never do, and `frame` decides as the ingress chain (and the prefilter, when attached: its
`prefilter` bitmap per farm, with `prefilter_spec`) would; `conntrack` counts
this node's live connections per bucket (what `ct_scan` reads); addresses and sysctls are
dictionaries. `fail_on` makes a named operation raise, to test rollback; `scan_hook` runs in the
middle of a scan, to test races with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vipfarm.datapath import ruleset
from vipfarm.datapath.conntrack import Scan
from vipfarm.datapath.kernel import DatapathError
from vipfarm.datapath.spec import DatapathSpec, IPAddress


class FakeKernel:
    def __init__(self, clock: Callable[[], float], links: dict[str, str] | None = None) -> None:
        self.clock = clock
        self.links = links if links is not None else {"lo": "00:00:00:00:00:00"}
        self.neigh: dict[str, dict[str, str]] = {}  # ifname -> address -> MAC
        self.tables: set[tuple[str, str]] = set()
        self.batches: list[list[dict[str, Any]]] = []
        self.owned: dict[str, dict[int, float]] = {}  # table -> bucket -> expiry
        self.kept: dict[str, set[int]] = {}  # table -> buckets
        self.conntrack: dict[int, int] = {}  # bucket -> live connections of this node
        self.scan_hook: Callable[[], None] | None = None
        self.addrs: dict[str, list[IPAddress]] = {name: [] for name in self.links}
        self.sysctls: dict[str, str] = {}
        self.uc_macs: dict[str, set[str]] = {}
        self.fail_on: set[str] = set()
        self.prefilter: dict[str, set[int]] = {}  # farm -> the bitmap of its attached prefilter
        self.prefilter_spec: dict[str, DatapathSpec] = {}
        self.prefilter_loads = 0

    def _maybe_fail(self, op: str) -> None:
        if op in self.fail_on:
            raise DatapathError(f"injected failure in {op}")

    def nft_apply(self, batch: list[dict[str, Any]]) -> None:
        self._maybe_fail("nft_apply")
        tables = set(self.tables)
        for cmd in batch:
            for verb, obj in cmd.items():
                if "table" in obj and "name" in obj["table"]:
                    key = (obj["table"]["family"], obj["table"]["name"])
                    if verb == "add":
                        tables.add(key)
                    elif verb == "delete":
                        tables.discard(key)
                        if key[0] == ruleset.SETS_FAMILY:
                            self.owned.pop(key[1], None)
                            self.kept.pop(key[1], None)
        self.tables = tables
        self.batches.append(batch)

    def _table(self, farm: str) -> str:
        t = ruleset.table_name(farm)
        if (ruleset.SETS_FAMILY, t) not in self.tables:
            raise DatapathError(f"no table for farm {farm}")
        return t

    def nft_set_owned(
        self,
        farm: str,
        buckets: frozenset[int],
        lease_s: float,
        keep: frozenset[int] = frozenset(),
        unkeep: frozenset[int] = frozenset(),
    ) -> None:
        self._maybe_fail("nft_set_owned")
        t = self._table(farm)
        expiry = self.clock() + lease_s
        self.owned[t] = {b: expiry for b in buckets}
        kept = self.kept.setdefault(t, set())
        kept |= buckets | keep  # as `ruleset.sets_text`: kept holds every owned bucket
        kept -= unkeep - buckets

    def nft_renew_owned(self, farm: str, buckets: frozenset[int], lease_s: float) -> None:
        self._maybe_fail("nft_renew_owned")
        t = self._table(farm)
        expiry = self.clock() + lease_s
        self.owned[t] = {b: expiry for b in buckets}

    def nft_update_kept(self, farm: str, add: frozenset[int], remove: frozenset[int]) -> None:
        self._maybe_fail("nft_update_kept")
        kept = self.kept.setdefault(self._table(farm), set())
        kept |= add
        kept -= remove

    def nft_read_owned(self, farm: str) -> frozenset[int] | None:
        t = ruleset.table_name(farm)
        if (ruleset.SETS_FAMILY, t) not in self.tables:
            return None
        now = self.clock()
        return frozenset(b for b, exp in self.owned.get(t, {}).items() if exp > now)

    def nft_read_kept(self, farm: str) -> frozenset[int] | None:
        t = ruleset.table_name(farm)
        if (ruleset.SETS_FAMILY, t) not in self.tables:
            return None
        return frozenset(self.kept.get(t, set()))

    def prefilter_load(self, spec: DatapathSpec, kept: frozenset[int]) -> None:
        self._maybe_fail("prefilter_load")
        self.prefilter[spec.farm] = set(kept)
        self.prefilter_spec[spec.farm] = spec
        self.prefilter_loads += 1

    def prefilter_set_kept(self, farm: str, kept: frozenset[int]) -> None:
        self._maybe_fail("prefilter_set_kept")
        if farm not in self.prefilter:
            raise DatapathError(f"no prefilter for farm {farm}")
        self.prefilter[farm] = set(kept)

    def prefilter_read(self, farm: str) -> tuple[frozenset[int], int] | None:
        got = self.prefilter.get(farm)
        return None if got is None else (frozenset(got), 0)

    def prefilter_unload(self, farm: str) -> None:
        self.prefilter.pop(farm, None)
        self.prefilter_spec.pop(farm, None)

    def frame(self, farm: str, bucket: int) -> str:
        """What the ingress path does with a frame of `bucket`: dropped (by the prefilter, or
        not kept), owned, or kept (`ruleset.bucket_rules`)."""
        t = self._table(farm)
        if farm in self.prefilter and bucket not in self.prefilter[farm]:
            return "dropped"
        if bucket not in self.kept.get(t, set()):
            return "dropped"
        return "owned" if self.owned.get(t, {}).get(bucket, -1.0) > self.clock() else "kept"

    def ct_scan(self, budget: int) -> Scan:
        self._maybe_fail("ct_scan")
        live = frozenset(b for b, n in self.conntrack.items() if n > 0)
        if self.scan_hook is not None:
            self.scan_hook()
        parsed = sum(self.conntrack.values())
        return Scan(live, min(parsed, budget), parsed <= budget)

    def link_exists(self, ifname: str) -> bool:
        return ifname in self.links

    def neighbours(self, ifname: str) -> dict[str, str]:
        return dict(self.neigh.get(ifname, {}))

    def link_mac(self, ifname: str) -> str:
        if ifname not in self.links:
            raise DatapathError(f"interface {ifname!r} does not exist")
        return self.links[ifname]

    def addresses(self) -> dict[str, list[IPAddress]]:
        return {k: list(v) for k, v in self.addrs.items()}

    def add_address(self, ifname: str, addr: IPAddress) -> None:
        self._maybe_fail("add_address")
        if addr in self.addrs.setdefault(ifname, []):
            raise DatapathError(f"address {addr} exists")
        self.addrs[ifname].append(addr)

    def del_address(self, ifname: str, addr: IPAddress) -> None:
        self.addrs.get(ifname, []).remove(addr)

    def read_sysctl(self, name: str) -> str | None:
        return self.sysctls.get(name)

    def write_sysctl(self, name: str, value: str) -> None:
        self._maybe_fail("write_sysctl")
        if name not in self.sysctls:
            raise DatapathError(f"no sysctl {name}")
        self.sysctls[name] = value

    def add_uc_mac(self, ifname: str, mac: str) -> None:
        self.uc_macs.setdefault(ifname, set()).add(mac)

    def del_uc_mac(self, ifname: str, mac: str) -> None:
        self.uc_macs.get(ifname, set()).discard(mac)
