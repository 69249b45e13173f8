"""A stand-alone data path with a static bucket assignment, for the lab before (and beside) the
node daemon: `vipfarm datapath run --spec FILE`.

It applies the spec, then renews the lease every third of its length. SIGHUP re-reads the spec
file (new owned buckets and/or new rules); SIGTERM and SIGINT remove every trace and exit. If the
runner is frozen or killed, its buckets expire with the lease: that is the fail-safe under test.
A spec with `steer` (directed delivery) also sets the VIPs this node answers for and its
steering plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from vipfarm.datapath.ruleset import SteerPlan
from vipfarm.datapath.service import DatapathService
from vipfarm.datapath.spec import NodeDatapathSpec
from vipfarm.log import event

log = logging.getLogger("vipfarm.datapath.runner")


def load_spec(path: Path) -> NodeDatapathSpec:
    return NodeDatapathSpec.model_validate_json(path.read_text())


def apply_steer(service: DatapathService, node: NodeDatapathSpec) -> None:
    steer = node.steer
    if steer is None or not service.spec.delivery.steers:
        return
    service.set_entry(frozenset(steer.entry))
    service.set_steer(
        SteerPlan(
            mac=steer.mac,
            targets={b: tuple(t) for b, t in steer.targets.items()},
            local=frozenset(steer.local),
            peers=frozenset(steer.peers),
        )
    )


async def run(spec_path: Path, state_dir: Path) -> None:
    node = load_spec(spec_path)
    service = DatapathService(node.datapath, state_dir)
    wake = asyncio.Event()
    flags = {"stop": False, "reload": False}

    def signalled(flag: str) -> None:
        flags[flag] = True
        wake.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, signalled, "stop")
    loop.add_signal_handler(signal.SIGINT, signalled, "stop")
    loop.add_signal_handler(signal.SIGHUP, signalled, "reload")
    # Handlers first: a SIGHUP or SIGTERM sent right after the process appears (the lab moves
    # buckets as soon as it is up) is then handled by the loop below instead of killing it.
    owned = await service.start(node.owned)
    apply_steer(service, node)
    event(log, "runner_started", spec=spec_path, owned=len(owned))
    period = node.datapath.lease_s / 3
    try:
        while not flags["stop"]:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=period)
            wake.clear()
            if flags["stop"]:
                break
            try:
                if flags["reload"]:
                    flags["reload"] = False
                    new = load_spec(spec_path)
                    if new.datapath != service.spec:
                        service.update(new.datapath)
                    owned = service.set_owned(new.owned)
                    apply_steer(service, new)
                    event(log, "runner_reloaded", owned=len(owned))
                else:
                    service.refresh()
            except Exception as e:  # a bad spec edit must not take the node down
                event(log, "runner_error", logging.ERROR, error=e)
    finally:
        service.stop()
        event(log, "runner_stopped", spec=spec_path)
