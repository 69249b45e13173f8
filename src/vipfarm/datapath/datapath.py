"""The data path of one node: ruleset, owned buckets with leases, VIPs on `lo`, sysctls.

`Datapath` turns a `DatapathSpec` into kernel state through a `Kernel` and takes it away again.
`start` applies in an order where every intermediate state is safe (ARP sysctls before the VIP
exists, the ruleset before the VIP so nothing is accepted unfiltered, an empty owned set before
the real one), and undoes what it did if any step fails, so a failed start leaves nothing behind.
Original sysctl values are saved in a state file before the first change and that file survives a
crash, so a later `stop` (or the next start's cleanup) restores the operator's values, not ours.

Owned buckets are leases: `set_owned` replaces the whole set in one transaction and `refresh`
re-leases it; the return value is always read back from the kernel.

Kept buckets: every owned bucket is in the kept set too (added by each `set_owned`, in the same
transaction, and never released while owned), so the connections of a node whose daemon died go
on after its lease ran out, and the ingress decision drops what is not kept with one lookup; a
bucket that leaves the owned set stays kept. `sweep` (run by `vipfarm.datapath.sweeper`,
outside the lock that orders ownership changes) reads conntrack and takes out of the kept set
every bucket that is not owned, has held no live connection of this node, and left the owned
set at least `KEEP_GRACE_S` before the scan began (packets accepted just before the release may
still be on their way to conntrack; a bucket owned again meanwhile may have new connections the
scan did not see). It also adopts buckets that hold live connections but are in neither set (a
restart after a crash), so their connections go on. `kept` is the kept set as last read back
from the kernel (owned buckets included); `lingering` the kept buckets this node does not own.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vipfarm.datapath import ruleset
from vipfarm.datapath.kernel import DatapathError, Kernel
from vipfarm.datapath.spec import DatapathSpec, DecisionPoint, IPAddress
from vipfarm.files import write_atomic
from vipfarm.log import event

log = logging.getLogger("vipfarm.datapath")

VIP_INTERFACE = "lo"
KEEP_GRACE_S = 1.0
READBACK_S = 1.0  # a renewal reads the owned set back at most this often
SCAN_BUDGET = 250_000  # conntrack entries one sweep parses at most (about 5 µs each)


@dataclass(frozen=True)
class SweepResult:
    released: frozenset[int]
    adopted: frozenset[int]
    kept: frozenset[int]  # read back
    parsed: int  # conntrack entries
    complete: bool  # every entry read: releases were possible


def sysctl_settings(interface: str) -> dict[str, str]:
    """DESIGN section 3: never answer ARP for the VIP from the kernel, never announce it, and never
    pick up a TCP flow from its middle."""
    return {
        "net.ipv4.conf.all.arp_ignore": "1",
        f"net.ipv4.conf.{interface}.arp_ignore": "1",
        "net.ipv4.conf.all.arp_announce": "2",
        f"net.ipv4.conf.{interface}.arp_announce": "2",
        "net.netfilter.nf_conntrack_tcp_loose": "0",
    }


class Datapath:
    def __init__(
        self,
        spec: DatapathSpec,
        kernel: Kernel,
        state_dir: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.kernel = kernel
        self.state_dir = state_dir
        self.clock = clock
        self._owned: frozenset[int] = frozenset()
        # When each bucket not owned now last left the owned set (or, for a bucket this run
        # never owned, when it was found kept): the sweeper's grace counts from there.
        self._left_owned: dict[int, float] = {}
        self.kept: frozenset[int] = frozenset()  # read back
        # A renewal may run in another thread than a change of ownership: each writes the owned
        # set whole, so the later one must also be the one that read the latest `_owned`, or a
        # renewal could put back a bucket just released.
        self._owned_lock = threading.Lock()
        self._read_back_at = -math.inf
        # Directed delivery: the steering plan in the kernel and the chains it made (for the
        # next plan to remove), behind their own lock (a plan and an update may come from two
        # threads; the kernel layer serialises the transactions themselves).
        self._steer: ruleset.SteerPlan | None = None
        self._steer_chains: frozenset[str] = frozenset()
        self._steer_lock = threading.Lock()
        self._vips_added: list[IPAddress] = []
        self._macs_added: list[str] = []
        # The prefilter's bitmap as written (None: no prefilter), always a superset of the
        # kernel's kept set (`vipfarm.datapath.prefilter`); changed under `_owned_lock`.
        self._pf_bits: frozenset[int] | None = None
        self.prefilter_off: str | None = None  # why there is no prefilter, if there is none

    @property
    def _sysctl_file(self) -> Path:
        return self.state_dir / f"{self.spec.farm}.sysctl.json"

    # checks
    def preflight(self) -> None:
        """Refuse to start when the node cannot host this spec; names the fix."""
        spec = self.spec
        if not self.kernel.link_exists(spec.interface):
            raise DatapathError(
                f"interface {spec.interface!r} does not exist on this node: set the node's "
                "LAN interface to one shown by `ip link`"
            )
        for ifname, addrs in self.kernel.addresses().items():
            if ifname == VIP_INTERFACE:
                continue
            for vip in spec.vips:
                if vip in addrs:
                    raise DatapathError(
                        f"VIP {vip} is already an address of {ifname} on this node: a VIP must "
                        f"live on lo only (ip addr del {vip} dev {ifname}) or choose another VIP"
                    )
        if spec.vips and any(v.version == 4 for v in spec.vips):
            for name in sysctl_settings(spec.interface):
                if name.startswith("net.ipv4") and self.kernel.read_sysctl(name) is None:
                    raise DatapathError(f"sysctl {name} is missing: is IPv4 disabled here?")

    # start / stop
    def start(self, owned: Iterable[int] = ()) -> frozenset[int]:
        self.preflight()
        undo: list[Callable[[], None]] = []
        try:
            self._save_sysctls()
            undo.append(self._restore_sysctls)
            for name, value in sysctl_settings(self.spec.interface).items():
                if not name.startswith("net.netfilter"):
                    self.kernel.write_sysctl(name, value)
            kept_exists = self.kernel.nft_read_kept(self.spec.farm) is not None
            with self._steer_lock:
                plan = self._initial_plan(self.spec)
                self.kernel.nft_apply(ruleset.ruleset_batch(self.spec, True, kept_exists, plan))
                self._set_steered(self.spec, plan)
            undo.append(lambda: self.kernel.nft_apply(ruleset.remove_batch(self.spec.farm)))
            # A crashed run's owned and kept buckets still hold its connections: the first
            # `set_owned` keeps them (the sweeper releases the empty ones).
            self._left_owned = dict.fromkeys(self.read_kept(), self.clock())
            self._owned = self.read_owned()
            undo.append(lambda: self._prefilter_stop(None))
            self._prefilter(self.spec)
            # conntrack is loaded by the ruleset's `ct` expressions, so its sysctl exists only now.
            self.kernel.write_sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
            undo.append(self._remove_macs)
            self._add_macs(self.spec)
            undo.append(self._remove_vips)
            self._add_vips(self.spec)
            result = self.set_owned(owned)
        except Exception:
            for step in reversed(undo):
                try:
                    step()
                except Exception as e:  # keep undoing: a partial undo is worse
                    event(log, "undo_failed", logging.ERROR, error=e)
            raise
        event(
            log,
            "datapath_started",
            farm=self.spec.farm,
            interface=self.spec.interface,
            vips=",".join(map(str, self.spec.vips)),
            rules=len(self.spec.rules),
            owned=len(result),
        )
        return result

    def stop(self) -> None:
        """Remove every trace; keeps going past failures and reports them all at the end."""
        errors: list[str] = []
        for step in (
            self._remove_vips,
            self._remove_macs,
            lambda: self._prefilter_stop(None),
            lambda: self.kernel.nft_apply(ruleset.remove_batch(self.spec.farm)),
            self._restore_sysctls,
        ):
            try:
                step()
            except Exception as e:
                errors.append(str(e))
        self._owned = frozenset()
        self._left_owned = {}
        self.kept = frozenset()
        self._steer, self._steer_chains = None, frozenset()
        event(log, "datapath_stopped", farm=self.spec.farm, errors=len(errors))
        if errors:
            raise DatapathError("; ".join(errors))

    def update(self, spec: DatapathSpec) -> frozenset[int]:
        """Apply new rules or VIPs in place; owned buckets and their leases survive."""
        if spec.farm != self.spec.farm or spec.interface != self.spec.interface:
            raise DatapathError(
                "farm name or interface changed: stop the data path and start it again"
            )
        if spec.buckets != self.spec.buckets or spec.seed != self.spec.seed:
            # Every bucket means something else now: start from nothing owned. Existing
            # connections hash into new buckets too, and ingress drops those this node neither
            # owns nor keeps: a change of buckets or seed breaks connections (documented).
            self._owned = frozenset()
        old = self.spec
        if (old.rules, old.buckets, old.seed) != (spec.rules, spec.buckets, spec.seed):
            # The program hashes by the old rules, and nftables trusts the buckets it marks:
            # nftables alone decides until the new program is in.
            with self._owned_lock:
                self._prefilter_stop(None)
        with self._steer_lock:
            plan = self._initial_plan(spec)
            stale = self._steer_chains if old.delivery.steers else None
            self.kernel.nft_apply(ruleset.ruleset_batch(spec, False, True, plan, stale))
            self._set_steered(spec, plan)
        self.spec = spec
        self._prefilter(spec)
        self._add_macs(spec)
        self._add_vips(spec)
        for vip in set(old.vips) - set(spec.vips):
            self._del_vip(vip)
        self._remove_macs(keep={spec.vmac(v) for v in spec.vips})
        return self.set_owned(self._owned)

    # directed delivery
    def _initial_plan(self, spec: DatapathSpec) -> ruleset.SteerPlan | None:
        if not spec.delivery.steers:
            return None
        return self._steer or ruleset.SteerPlan(mac=self.kernel.link_mac(spec.interface))

    def _set_steered(self, spec: DatapathSpec, plan: ruleset.SteerPlan | None) -> None:
        self._steer = plan
        self._steer_chains = (
            ruleset.steer_chain_names(spec, plan) if plan is not None else frozenset()
        )

    def set_steer(self, plan: ruleset.SteerPlan) -> bool:
        """Put a new steering plan in the kernel (one transaction); False (and nothing done)
        when it is the one there already or the spec does not deliver directed."""
        with self._steer_lock:
            spec = self.spec
            if not spec.delivery.steers or plan == self._steer:
                return False
            self.kernel.nft_apply(ruleset.steer_batch(spec, plan, self._steer_chains))
            self._set_steered(spec, plan)
        return True

    @property
    def steer(self) -> ruleset.SteerPlan | None:
        return self._steer

    # owned and kept buckets
    def set_owned(self, buckets: Iterable[int]) -> frozenset[int]:
        """Replace the owned set; the owned and the released buckets are kept, in the same
        transaction. Returns the owned set read back (and updates `kept`)."""
        wanted = frozenset(buckets)
        bad = sorted(b for b in wanted if not 0 <= b < self.spec.buckets)
        if bad:
            raise DatapathError(
                f"bucket(s) {bad[:5]} out of range: buckets are 0..{self.spec.buckets - 1}"
            )
        with self._owned_lock:
            released = self._owned - wanted
            self._prefilter_keep(wanted | released)  # before nftables keeps them
            self.kernel.nft_set_owned(self.spec.farm, wanted, self.spec.lease_s, released)
            self._owned = wanted
            now = self.clock()
            for b in wanted:
                self._left_owned.pop(b, None)
            for b in released:
                self._left_owned[b] = now
        owned = self.read_owned()
        self.read_kept()
        return owned

    def refresh(self) -> frozenset[int]:
        """Renew the lease of every owned bucket (safe from another thread than `set_owned`).

        The kernel's acknowledgement confirms the renewal; the set is read back (a dump, as
        costly as the renewal) at most every `READBACK_S`, which still catches a set changed
        behind the daemon's back within a second."""
        with self._owned_lock:
            self.kernel.nft_renew_owned(self.spec.farm, self._owned, self.spec.lease_s)
            owned = self._owned
        now = self.clock()
        if now - self._read_back_at < READBACK_S:
            return owned
        self._read_back_at = now
        return self.read_owned()

    def read_owned(self) -> frozenset[int]:
        got = self.kernel.nft_read_owned(self.spec.farm)
        return got if got is not None else frozenset()

    def read_kept(self) -> frozenset[int]:
        got = self.kernel.nft_read_kept(self.spec.farm)
        self.kept = got if got is not None else frozenset()
        return self.kept

    @property
    def lingering(self) -> frozenset[int]:
        """Kept buckets this node does not own: given away, connections still served."""
        return self.kept - self._owned

    def sweep(self, budget: int = SCAN_BUDGET) -> SweepResult:
        """Release kept buckets whose last connection ended; adopt buckets whose connections
        lost their way into the sets. Blocking (a conntrack dump): call it from a worker."""
        t0 = self.clock()
        kept = self.read_kept()
        scan = self.kernel.ct_scan(budget)
        kernel_owned = self.read_owned()
        with self._owned_lock:
            release = frozenset(
                b
                for b in kept
                if scan.complete
                and b not in scan.live
                and b not in self._owned
                and b not in kernel_owned
                and t0 - self._left_owned.setdefault(b, t0) >= KEEP_GRACE_S
            )
            adopt = frozenset(
                b
                for b in scan.live - kernel_owned - kept
                if 0 <= b < self.spec.buckets and b not in self._owned
            )
            if release or adopt:
                self._prefilter_keep(adopt)
                self.kernel.nft_update_kept(self.spec.farm, adopt, release)
                self._prefilter_release(release)  # after nftables released them
                now = self.clock()
                for b in adopt:
                    self._left_owned[b] = now
                for b in release:
                    self._left_owned.pop(b, None)
        kept = self.read_kept()
        if release or adopt:
            event(
                log,
                "kept_buckets_changed",
                released=len(release),
                adopted=len(adopt),
                kept=len(kept),
            )
        return SweepResult(release, adopt, kept, scan.parsed, scan.complete)

    @property
    def intended(self) -> frozenset[int]:
        return self._owned

    # the prefilter (vipfarm.datapath.prefilter): its bitmap only ever errs on the side of
    # keeping, so it drops nothing nftables would not
    def _prefilter(self, spec: DatapathSpec) -> None:
        """Attach, swap or take away the prefilter for `spec`; a kernel that cannot take it
        leaves nftables to decide alone, and says why (`prefilter_off`).

        The program is loaded (the verifier may take milliseconds) outside the lock that lease
        renewals take, with a bitmap that passes every bucket: nftables then decides each frame
        itself, which is always right. The true bitmap is written under the lock."""
        if not spec.prefilter or spec.decide_at is not DecisionPoint.INGRESS:
            why = "turned off" if not spec.prefilter else f"decide_at is {spec.decide_at}"
            with self._owned_lock:
                self._prefilter_stop(why)
            return
        everything = frozenset(range(spec.buckets))
        try:
            self.kernel.prefilter_load(spec, everything)
        except DatapathError as e:
            with self._owned_lock:
                self._prefilter_stop(str(e))
            return
        with self._owned_lock:
            bits = self.read_kept() | self._owned  # nothing changes them but under this lock
            first = self._pf_bits is None
            self._pf_bits = everything  # what the kernel holds: set_owned may add to it
            try:
                self.kernel.prefilter_set_kept(spec.farm, bits)
            except DatapathError as e:  # it passes everything: safe, but useless
                self._prefilter_stop(str(e))
                return
            self._pf_bits, self.prefilter_off = bits, None
        if first:
            event(log, "prefilter_attached", farm=spec.farm, interface=spec.interface)

    def _prefilter_stop(self, why: str | None) -> None:
        if self._pf_bits is not None and why is not None:
            event(log, "prefilter_detached", logging.WARNING, farm=self.spec.farm, reason=why)
        elif self._pf_bits is None and why is not None and why != self.prefilter_off:
            event(log, "prefilter_off", farm=self.spec.farm, reason=why)
        self.kernel.prefilter_unload(self.spec.farm)
        self._pf_bits, self.prefilter_off = None, why

    def _prefilter_keep(self, buckets: frozenset[int]) -> None:
        if self._pf_bits is None or buckets <= self._pf_bits:
            return
        bits = self._pf_bits | buckets
        try:
            self.kernel.prefilter_set_kept(self.spec.farm, bits)
        except DatapathError as e:
            # It may now drop frames nftables is about to keep: take it away first.
            self._prefilter_stop(str(e))
            return
        self._pf_bits = bits

    def _prefilter_release(self, buckets: frozenset[int]) -> None:
        if self._pf_bits is None or not buckets & self._pf_bits:
            return
        bits = self._pf_bits - buckets
        try:
            self.kernel.prefilter_set_kept(self.spec.farm, bits)
        except DatapathError as e:  # extra bits are safe: it drops less, nftables the rest
            event(log, "prefilter_write_failed", logging.WARNING, error=e)
            return
        self._pf_bits = bits

    def prefilter_state(self) -> dict[str, object]:
        """Whether the prefilter is on and what it dropped, read back from the kernel."""
        got = self.kernel.prefilter_read(self.spec.farm)
        if got is None:
            return {"on": False, "off_because": self.prefilter_off, "dropped": 0}
        kept, dropped = got
        return {"on": True, "kept": len(kept), "dropped": dropped}

    # pieces
    def _save_sysctls(self) -> None:
        if self._sysctl_file.exists():  # left by a crashed run: it holds the true originals
            return
        saved = {
            name: value
            for name in sysctl_settings(self.spec.interface)
            if (value := self.kernel.read_sysctl(name)) is not None
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self._sysctl_file, json.dumps(saved))

    def _restore_sysctls(self) -> None:
        try:
            saved: dict[str, str] = json.loads(self._sysctl_file.read_text())
        except FileNotFoundError:
            return
        for name, value in saved.items():
            if self.kernel.read_sysctl(name) is not None:
                self.kernel.write_sysctl(name, value)
        self._sysctl_file.unlink()

    def _add_vips(self, spec: DatapathSpec) -> None:
        present = set(self.kernel.addresses().get(VIP_INTERFACE, []))
        for vip in spec.vips:
            if vip not in present:
                self.kernel.add_address(VIP_INTERFACE, vip)
            if vip not in self._vips_added:
                self._vips_added.append(vip)

    def _del_vip(self, vip: IPAddress) -> None:
        if vip in self.kernel.addresses().get(VIP_INTERFACE, []):
            self.kernel.del_address(VIP_INTERFACE, vip)
        if vip in self._vips_added:
            self._vips_added.remove(vip)

    def _remove_vips(self) -> None:
        # Also VIPs a crashed earlier run left: every VIP of the spec is ours by definition.
        for vip in list(dict.fromkeys([*self._vips_added, *self.spec.vips])):
            self._del_vip(vip)

    def _add_macs(self, spec: DatapathSpec) -> None:
        for vip in spec.vips:
            mac = spec.vmac(vip)
            if mac not in self._macs_added:
                try:
                    self.kernel.add_uc_mac(spec.interface, mac)
                except Exception as e:  # a NIC with no unicast filter list: frames still flood
                    event(log, "vmac_filter_failed", logging.WARNING, mac=mac, error=e)
                self._macs_added.append(mac)

    def _remove_macs(self, keep: set[str] | None = None) -> None:
        for mac in list(self._macs_added):
            if keep and mac in keep:
                continue
            try:
                self.kernel.del_uc_mac(self.spec.interface, mac)
            except Exception as e:
                event(log, "vmac_filter_remove_failed", logging.WARNING, mac=mac, error=e)
            self._macs_added.remove(mac)
