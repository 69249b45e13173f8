"""The netlink lease renewal against the kernel: what it writes is what nft lists, the leases
run out when nobody renews them, and a missing table is an error that names it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

SCRIPT = textwrap.dedent(
    """
    import ipaddress, json, tempfile, time
    from pathlib import Path
    from vipfarm.datapath.datapath import Datapath
    from vipfarm.datapath.kernel import DatapathError, LinuxKernel
    from vipfarm.datapath.spec import Affinity, DatapathSpec, Proto, Rule
    rule = Rule(vip=ipaddress.ip_address("198.51.100.100"), proto=Proto.TCP, port=80,
                affinity=Affinity.CLIENT_IP)
    spec = DatapathSpec(farm="lt", interface="eth0", lease_s=0.15, rules=[rule])
    k = LinuxKernel()
    d = Datapath(spec, k, Path(tempfile.mkdtemp()))
    d.start([1, 2, 3])
    out = {}
    k.nft_renew_owned("lt", frozenset({5, 6, 7, 8}), 0.15)
    out["renewed"] = sorted(k.nft_read_owned("lt"))
    t0 = time.monotonic()
    while k.nft_read_owned("lt") and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    out["expired_after_s"] = time.monotonic() - t0
    out["left"] = sorted(k.nft_read_owned("lt"))
    k.nft_renew_owned("lt", frozenset(), 0.15)
    out["emptied"] = sorted(k.nft_read_owned("lt"))
    try:
        k.nft_renew_owned("nosuchfarm", frozenset({1}), 0.15)
        out["missing"] = "no error"
    except DatapathError as e:
        out["missing"] = str(e)
    d.stop()
    print(json.dumps(out))
    """
)


def test_netlink_renewal_writes_leases_that_run_out() -> None:
    ns = f"vflt{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for argv in (
            ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "eth1", "up"],
            ["link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *argv], check=True)
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert out["renewed"] == [5, 6, 7, 8]
    assert out["left"] == [] and out["expired_after_s"] < 5  # nobody renewed: gone
    assert out["emptied"] == []
    assert "vipfarm_nosuchfarm" in out["missing"], out["missing"]
