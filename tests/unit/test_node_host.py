"""Pure helpers of the daemon."""

from __future__ import annotations

import time
from pathlib import Path

from vipfarm.node.host import _proc_addr, next_incarnation


def test_incarnation_grows_even_when_the_clock_steps_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "incarnation"
    first = next_incarnation(path)
    assert abs(first - time.time() * 1000) < 5000
    path.write_text(str(first + 10_000_000))  # as if the clock had been far ahead last time
    assert next_incarnation(path) == first + 10_000_001
    assert next_incarnation(path) == first + 10_000_002
    path.write_text("garbage")
    assert next_incarnation(path) >= first


def test_proc_net_addresses_are_decoded() -> None:
    assert str(_proc_addr("646433C6")) == "198.51.100.100"  # /proc: little-endian words
    assert str(_proc_addr("0100007F")) == "127.0.0.1"
    assert str(_proc_addr("B80D0120000000000000000000000000")) == "2001:db8::"
