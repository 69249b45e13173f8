"""The `[api]` section of the farm file (`vipfarm.config.schema.ApiSection`): the rotation's
next token and the limits, their defaults (the same as the running API's) and their errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vipfarm.api.guard import Limits
from vipfarm.config.loading import parse_config
from vipfarm.config.problems import ConfigError
from vipfarm.config.schema import ApiSection

FARM = """
[farm]
name = "web"
key_file = "farm.key"

[[network]]
name = "lan"

[[node]]
name = "node1"
address = { lan = "198.51.100.11" }

[[rule]]
vip = "198.51.100.100"
ports = "80"

[module]
name = "generic"

[module.macros]
start_cmd = "sleep 1000"

[api]
token_file = "api.token"
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    for name, text in (("farm.key", "k" * 40), ("api.token", "t" * 32), ("api.next", "n" * 32)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    return tmp_path


def problems(text: str, base: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, base_dir=base)
    return {p.path: p.message for p in e.value.problems}


def test_the_defaults_are_the_running_apis() -> None:
    fields = ApiSection.model_fields
    for f in dataclasses.fields(Limits):
        assert fields[f.name].default == getattr(Limits, f.name), f.name


def test_next_token_file_is_read_like_the_token(base: Path) -> None:
    cfg = parse_config(FARM + 'next_token_file = "api.next"\n', base_dir=base)
    assert cfg.api is not None
    assert cfg.api.token() == b"t" * 32 and cfg.api.next_token() == b"n" * 32
    assert parse_config(FARM, base_dir=base).api.next_token() is None  # type: ignore[union-attr]
    (base / "api.next").chmod(0o644)
    found = problems(FARM + 'next_token_file = "api.next"\n', base)
    assert "chmod 600" in found["api.next_token_file"]
    found = problems(FARM + 'next_token_file = "api.token"\n', base)
    assert "a file other than token_file" in found["api.next_token_file"]


def test_limits_out_of_range_name_the_key_and_the_value(base: Path) -> None:
    found = problems(FARM + "keepalive_timeout_s = 2\nmax_connections = 0\n", base)
    assert set(found) == {"api.keepalive_timeout_s", "api.max_connections"}
    assert "2" in found["api.keepalive_timeout_s"] and "3" in found["api.keepalive_timeout_s"]
    found = problems(FARM + "header_timeout_s = -1\n", base)
    assert "-1" in found["api.header_timeout_s"]
