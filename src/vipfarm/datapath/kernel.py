"""The narrow interface between the data path logic and the Linux kernel.

`Kernel` lists every kernel operation the data path needs; `LinuxKernel` does them with
libnftables (JSON API for the ruleset, its text syntax for leases and kept buckets), pyroute2
(addresses, unicast MAC filter), ctnetlink (`vipfarm.datapath.conntrack`), bpf(2) (the
prefilter, `vipfarm.datapath.prefilter`) and /proc/sys;
`tests.fakes.kernel.FakeKernel` keeps the same state in memory for unit tests. Every
method acts on the network namespace of the calling process.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from vipfarm.datapath import conntrack, prefilter, ruleset
from vipfarm.datapath.bpf import BpfError
from vipfarm.datapath.conntrack import Scan
from vipfarm.datapath.leases import LeaseError, LeaseRenewer
from vipfarm.datapath.spec import DatapathSpec, IPAddress
from vipfarm.errors import VipfarmError


class DatapathError(VipfarmError):
    """A data path operation failed; the message says what and how to fix it."""


class Kernel(Protocol):
    def nft_apply(self, batch: list[dict[str, Any]]) -> None: ...
    def nft_set_owned(
        self,
        farm: str,
        buckets: frozenset[int],
        lease_s: float,
        keep: frozenset[int] = frozenset(),
        unkeep: frozenset[int] = frozenset(),
    ) -> None:
        """Replace the owned set (each bucket leased for `lease_s`), add `keep` to the kept set
        and take `unkeep` out of it: one transaction."""
        ...

    def nft_renew_owned(self, farm: str, buckets: frozenset[int], lease_s: float) -> None:
        """Renew the leases: the owned set becomes `buckets`, each leased for `lease_s` (one
        transaction; the kept set is untouched). The cheap path of every heartbeat."""
        ...

    def nft_update_kept(self, farm: str, add: frozenset[int], remove: frozenset[int]) -> None: ...
    def nft_read_owned(self, farm: str) -> frozenset[int] | None:
        """The owned set, or None when the farm's table does not exist."""
        ...

    def nft_read_kept(self, farm: str) -> frozenset[int] | None:
        """The kept set, or None when the farm's table does not exist."""
        ...

    def prefilter_load(self, spec: DatapathSpec, kept: frozenset[int]) -> None:
        """Attach the prefilter for `spec` with `kept` in its bitmap, or swap in the program of
        a new spec (`vipfarm.datapath.prefilter`)."""
        ...

    def prefilter_set_kept(self, farm: str, kept: frozenset[int]) -> None: ...
    def prefilter_read(self, farm: str) -> tuple[frozenset[int], int] | None:
        """The prefilter's bitmap and the frames it dropped, or None when it is not attached."""
        ...

    def prefilter_unload(self, farm: str) -> None: ...
    def ct_scan(self, budget: int) -> Scan:
        """The buckets with a live conntrack entry this node accepted (see `conntrack`)."""
        ...

    def link_mac(self, ifname: str) -> str: ...
    def neighbours(self, ifname: str) -> dict[str, str]:
        """The neighbour table of `ifname`: address (as text) -> MAC, entries with one only."""
        ...

    def link_exists(self, ifname: str) -> bool: ...
    def addresses(self) -> dict[str, list[IPAddress]]:
        """Every address of the namespace, by interface name."""
        ...

    def add_address(self, ifname: str, addr: IPAddress) -> None: ...
    def del_address(self, ifname: str, addr: IPAddress) -> None: ...
    def read_sysctl(self, name: str) -> str | None: ...
    def write_sysctl(self, name: str, value: str) -> None: ...
    def add_uc_mac(self, ifname: str, mac: str) -> None: ...
    def del_uc_mac(self, ifname: str, mac: str) -> None: ...


T = TypeVar("T")
NTF_SELF = 0x02
NUD_PERMANENT = 0x80


def _new_iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


class LinuxKernel:
    """The real kernel of the current network namespace."""

    def __init__(self) -> None:
        try:
            import nftables
        except ImportError as e:  # pragma: no cover - depends on the host
            raise DatapathError(
                "the nftables Python binding is missing: install the project's dependencies "
                "(pip install pip-nftables) and the nftables package (apt-get install nftables)"
            ) from e
        # Two contexts: a large ruleset update may run in a worker thread (libnftables releases
        # the GIL) while the lease path keeps renewing the owned set from the pulse's loop.
        try:
            self._nft = nftables.Nftables()
            self._lease_nft = nftables.Nftables()
        except OSError as e:  # libnftables.so.1 not found
            raise DatapathError(
                f"libnftables cannot be loaded ({e}): apt-get install nftables"
            ) from e
        for ctx in (self._nft, self._lease_nft):
            ctx.set_json_output(True)
            ctx.set_handle_output(False)
        self._apply_lock = threading.Lock()
        self._lease_lock = threading.Lock()
        self._renewers: dict[str, LeaseRenewer] = {}
        self._prefilters: dict[str, prefilter.Loaded] = {}
        # A program may be loaded in a worker thread while the pulse's loop reads the counters:
        # a read must never use a descriptor being closed (its number could be another map's).
        self._pf_lock = threading.Lock()
        self._pf_read: dict[str, tuple[frozenset[int], int]] = {}
        # pyroute2 0.9's synchronous IPRoute runs its own event loop and refuses to work in a
        # thread where one is already running (the daemon's), so it lives in a thread of its own.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._ipr: Any = self._pool.submit(_new_iproute).result()

    def _nl(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        for renewer in self._renewers.values():
            renewer.close()
        with self._pf_lock:
            for loaded in self._prefilters.values():
                loaded.close()  # detaches: nftables decides alone from now on
            self._prefilters.clear()
        self._nl(self._ipr.close)
        self._pool.shutdown()

    # nftables
    def _check(self, rc: int, err: str, what: str) -> None:
        if rc != 0:
            msg = err.strip() or f"exit code {rc}"
            if "Operation not permitted" in msg:
                msg += " (run as root, or with CAP_NET_ADMIN)"
            raise DatapathError(f"nftables refused to {what}: {msg}")

    def nft_apply(self, batch: list[dict[str, Any]]) -> None:
        # One json.dumps of a large batch holds the GIL for its whole run (300 ms for 3,000
        # rules); a dumps per command lets the pulse's loop run between them when this runs in
        # a worker thread. With JSON output on, libnftables parses the buffer as JSON.
        text = '{"nftables":[' + ",".join(json.dumps(c) for c in batch) + "]}"
        with self._apply_lock:
            rc, _out, err = self._nft.cmd(text)
        self._check(rc, err, "apply the ruleset")

    def _lease_cmd(self, text: str, what: str) -> None:
        with self._lease_lock:
            rc, _out, err = self._lease_nft.cmd(text)
        self._check(rc, err, what)

    def nft_set_owned(
        self,
        farm: str,
        buckets: frozenset[int],
        lease_s: float,
        keep: frozenset[int] = frozenset(),
        unkeep: frozenset[int] = frozenset(),
    ) -> None:
        text = ruleset.sets_text(farm, buckets, lease_s, keep, unkeep)
        self._lease_cmd(text, "update the owned buckets")

    def nft_renew_owned(self, farm: str, buckets: frozenset[int], lease_s: float) -> None:
        renewer = self._renewers.get(farm)
        if renewer is None:
            renewer = self._renewers[farm] = LeaseRenewer(
                ruleset.table_name(farm), ruleset.OWNED_SET
            )
        try:
            renewer.renew(buckets, lease_s)
        except LeaseError as e:
            raise DatapathError(str(e)) from e

    def nft_update_kept(self, farm: str, add: frozenset[int], remove: frozenset[int]) -> None:
        if add or remove:
            text = ruleset.sets_text(farm, None, 0, add, remove)
            self._lease_cmd(text, "update the kept buckets")

    def _read_set(self, farm: str, name: str) -> frozenset[int] | None:
        with self._lease_lock:
            rc, out, err = self._lease_nft.cmd(ruleset.list_set_command(farm, name))
        if rc != 0:
            if "No such file or directory" in err or "does not exist" in err:
                return None
            self._check(rc, err, f"read the {name} buckets")
        return ruleset.parse_owned(json.loads(out))

    def nft_read_owned(self, farm: str) -> frozenset[int] | None:
        return self._read_set(farm, ruleset.OWNED_SET)

    def nft_read_kept(self, farm: str) -> frozenset[int] | None:
        return self._read_set(farm, ruleset.KEPT_SET)

    def prefilter_load(self, spec: DatapathSpec, kept: frozenset[int]) -> None:
        with self._pf_lock:
            current = self._prefilters.get(spec.farm)
            try:
                self._prefilters[spec.farm] = prefilter.load(spec, kept, current)
            except (BpfError, OSError, ValueError) as e:  # Unsupported is a ValueError
                raise DatapathError(f"prefilter not attached to {spec.interface}: {e}") from e

    def prefilter_set_kept(self, farm: str, kept: frozenset[int]) -> None:
        with self._pf_lock:
            loaded = self._prefilters.get(farm)
            if loaded is None:
                raise DatapathError(f"no prefilter for farm {farm}")
            try:
                prefilter.set_kept(loaded, kept)
            except BpfError as e:
                raise DatapathError(f"cannot write the prefilter's kept buckets: {e}") from e

    def prefilter_read(self, farm: str) -> tuple[frozenset[int], int] | None:
        # The pulse's loop asks: it never waits behind a program being verified.
        if not self._pf_lock.acquire(blocking=False):
            return self._pf_read.get(farm)
        try:
            loaded = self._prefilters.get(farm)
            if loaded is None:
                self._pf_read.pop(farm, None)
                return None
            try:
                got = self._pf_read[farm] = prefilter.read(loaded)
            except BpfError as e:
                raise DatapathError(f"cannot read the prefilter's maps: {e}") from e
            return got
        finally:
            self._pf_lock.release()

    def prefilter_unload(self, farm: str) -> None:
        with self._pf_lock:
            loaded = self._prefilters.pop(farm, None)
            if loaded is not None:
                loaded.close()

    def ct_scan(self, budget: int) -> Scan:
        try:
            return conntrack.scan(ruleset.OWNED_MARK, ruleset.BUCKET_MASK, budget)
        except OSError as e:
            raise DatapathError(f"cannot read conntrack over netlink: {e}") from e

    # links and addresses
    def _index(self, ifname: str) -> int:
        idx = self._nl(self._ipr.link_lookup, ifname=ifname)
        if not idx:
            raise DatapathError(f"interface {ifname!r} does not exist (see `ip link`)")
        return int(idx[0])

    def link_exists(self, ifname: str) -> bool:
        return bool(self._nl(self._ipr.link_lookup, ifname=ifname))

    def link_mac(self, ifname: str) -> str:
        idx = self._index(ifname)
        link = self._nl(lambda: list(self._ipr.get_links(idx)))[0]
        return str(link.get_attr("IFLA_ADDRESS"))

    def neighbours(self, ifname: str) -> dict[str, str]:
        idx = self._index(ifname)
        out: dict[str, str] = {}
        for n in self._nl(lambda: list(self._ipr.get_neighbours(ifindex=idx))):
            dst, mac = n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")
            if dst and mac:
                out[str(dst)] = str(mac)
        return out

    def addresses(self) -> dict[str, list[IPAddress]]:
        import ipaddress

        links = self._nl(lambda: list(self._ipr.get_links()))
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        out: dict[str, list[IPAddress]] = {}
        for a in self._nl(lambda: list(self._ipr.get_addr())):
            name = names.get(a["index"], str(a["index"]))
            out.setdefault(name, []).append(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")))
        return out

    def add_address(self, ifname: str, addr: IPAddress) -> None:
        plen = 32 if addr.version == 4 else 128
        idx = self._index(ifname)
        self._nl(self._ipr.addr, "add", index=idx, address=str(addr), prefixlen=plen)

    def del_address(self, ifname: str, addr: IPAddress) -> None:
        plen = 32 if addr.version == 4 else 128
        idx = self._index(ifname)
        self._nl(self._ipr.addr, "del", index=idx, address=str(addr), prefixlen=plen)

    # The VMAC goes into the NIC's unicast filter (like `bridge fdb add MAC dev IF self`), so a real
    # NIC delivers VMAC frames without promiscuous mode.
    def add_uc_mac(self, ifname: str, mac: str) -> None:
        self._fdb("replace", ifname, mac)

    def del_uc_mac(self, ifname: str, mac: str) -> None:
        self._fdb("del", ifname, mac)

    def _fdb(self, verb: str, ifname: str, mac: str) -> None:
        idx = self._index(ifname)
        self._nl(self._ipr.fdb, verb, ifindex=idx, lladdr=mac, state=NUD_PERMANENT, flags=NTF_SELF)

    # sysctl
    @staticmethod
    def _sysctl_path(name: str) -> Path:
        return Path("/proc/sys") / name.replace(".", "/")

    def read_sysctl(self, name: str) -> str | None:
        try:
            return self._sysctl_path(name).read_text().strip()
        except FileNotFoundError:
            return None

    def write_sysctl(self, name: str, value: str) -> None:
        try:
            with open(self._sysctl_path(name), "w") as f:
                f.write(value)
        except OSError as e:
            msg = os.strerror(e.errno or 0)
            raise DatapathError(f"cannot set sysctl {name}={value}: {msg}") from e
