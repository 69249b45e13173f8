"""The prefilter's program as data: what needs no kernel (tests/linux/test_prefilter.py runs it)."""

from __future__ import annotations

import pytest

from vipfarm.datapath import prefilter
from vipfarm.datapath.spec import DatapathSpec, Rule

V4 = "198.51.100.100"


def test_a_spec_with_too_many_rules_is_left_to_nftables() -> None:
    rules = [Rule(vip=V4, port=p) for p in range(1, prefilter.MAX_RULES + 2)]
    spec = DatapathSpec(farm="t", interface="eth0", rules=rules)
    with pytest.raises(prefilter.Unsupported, match="1025 rules"):
        prefilter.program(spec, 0, 0)
