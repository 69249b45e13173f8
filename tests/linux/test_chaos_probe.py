"""The chaos double-acceptance probe detects what it claims to: force two owners, see it."""

from __future__ import annotations

import os
import signal

from vipfarm.datapath.ruleset import KEPT_SET, OWNED_SET, table_name
from vipfarm.lab.chaos import Chaos
from vipfarm.lab.testbed import LabFactory


def test_probe_counts_connections_two_nodes_answered(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=2, clients=1, app="builtin")
    # The double ownership below is written into nftables behind vipfarm's back; the prefilter's
    # bitmap, which the shell cannot reach, would still drop node1's buckets on node2.
    lab.update_spec(prefilter=False)
    chaos = Chaos(lab, seed=1, duration_s=0)
    chaos.install_probes()
    ok = lab.load("client1", count=40, source_port=30000)
    assert not [r.error for r in ok if r.error]
    assert chaos.accepted_twice() == 0 and chaos.syn_accepted_by_two() == 0

    # node2 also takes node1's buckets, for long enough: its runner is frozen so that it does
    # not put its own set back. Both nodes now answer every new connection in those buckets.
    runner = lab.runners()["node2"]
    os.kill(runner.pid, signal.SIGSTOP)
    try:
        t, every = table_name(lab.name), ", ".join(map(str, range(256)))
        elements = ", ".join(f"{b} timeout 60s" for b in range(256))
        # as vipfarm does: kept holds every owned bucket (the ingress decision relies on it)
        cmd = (
            f"add element netdev {t} {OWNED_SET} {{ {elements} }}\n"
            f"add element netdev {t} {KEPT_SET} {{ {every} }}\n"
        )
        lab.exec("node2", ["nft", "-f", "-"], input=cmd, check=True)
        lab.load("client1", count=40, source_port=31000, timeout=2)
    finally:
        os.kill(runner.pid, signal.SIGCONT)
    assert chaos.accepted_twice() > 0
    assert chaos.syn_accepted_by_two() >= chaos.accepted_twice()
