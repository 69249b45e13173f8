"""Fixtures for tests that run as root in network namespaces.

`lab_factory(nodes=..., clients=..., app=..., rules=..., datapath=...)` builds a lab with a
unique short name (`vt` + 6 hex digits, so namespaces never collide with another run or a
developer's `vf` lab) and tears down every lab it built when the test ends, pass or fail.
`lab` is the default one: 3 nodes, 1 client, data path on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest

from vipfarm.lab import testbed
from vipfarm.lab.testbed import Lab, LabFactory, unique_name
from vipfarm.lab.topology import LabError


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    made: list[str] = []

    def make(**kwargs: Any) -> Lab:  # the parameters of testbed.up, typed by LabFactory
        name = unique_name()
        made.append(name)
        return testbed.up(name, **kwargs)

    yield cast(LabFactory, make)
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
