"""Fixtures for tests that run as root in network namespaces.

`lab_factory(nodes=..., clients=..., app=..., rules=..., datapath=...)` builds a lab with a
unique short name (`vt` + 6 hex digits, so namespaces never collide with another run or a
developer's `vf` lab) and tears down every lab it built when the test ends, pass or fail.
`lab` is the default one: 3 nodes, 1 client, data path on.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vipfarm.lab import testbed
from vipfarm.lab.apps import AppKind
from vipfarm.lab.testbed import Lab, LabFactory, unique_name
from vipfarm.lab.topology import LabError
from vipfarm.model import Rule


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    made: list[str] = []

    def make(
        nodes: int = 3,
        clients: int = 1,
        remote_clients: int = 0,
        app: AppKind | str = AppKind.AUTO,
        rules: list[Rule] | None = None,
        datapath: bool = True,
        daemon: bool = False,
    ) -> Lab:
        name = unique_name()
        made.append(name)
        return testbed.up(name, nodes, clients, remote_clients, app, rules, datapath, daemon)

    yield make
    failures = []
    for name in made:
        try:
            testbed.down(name)
        except LabError as e:
            failures.append(str(e))
    if failures:
        pytest.fail("lab teardown failed: " + "; ".join(failures))


@pytest.fixture
def lab(lab_factory: LabFactory) -> Lab:
    return lab_factory()
