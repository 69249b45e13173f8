"""The pulse: it stays small (nothing of the API stack is imported on its side), persists its
incarnation, drops heartbeats of unknown sources before decoding, says once why a peer cannot
be read, and takes new farm keys live."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vipfarm.membership.wire import Codec, NodeState, node_id
from vipfarm.node import channel as ch

if TYPE_CHECKING:
    from vipfarm.node.pulse import Pulse

HEAVY = ("fastapi", "starlette", "uvicorn", "httpx", "vipfarm.api", "vipfarm.supervisor")


def test_the_pulse_imports_nothing_of_the_management_plane() -> None:
    code = (
        "import sys, vipfarm.node.pulse, vipfarm.config\n"
        f"print(sorted({{m.split('.')[0] if not m.startswith('vipfarm') else m for m in sys.modules"
        f" if m.startswith({HEAVY!r})}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------- heartbeat input
def make_pulse(tmp_path: Path, key: bytes = b"k" * 32, nodes: int = 2) -> Pulse:
    from tests.fakes.kernel import FakeKernel
    from vipfarm.datapath.spec import DatapathSpec, Rule
    from vipfarm.membership.core import MembershipConfig
    from vipfarm.node.pulse import Pulse, PulseSettings

    settings = PulseSettings(
        membership=MembershipConfig(
            farm="web", node="n1", key=key, nodes={f"n{i}": 1 for i in range(1, nodes + 1)}
        ),
        spec=DatapathSpec(farm="web", interface="lo", rules=[Rule(vip="192.0.2.80", port=80)]),
        listen={"lan": ("198.51.100.11", 5405)},
        peers={"lan": [("198.51.100.12", 5405)]},
        sources={"lan": {"198.51.100.12": "n2"}},
    )
    return Pulse(
        settings,
        run_dir=tmp_path / "run",
        state_dir=tmp_path / "state",
        kernel=FakeKernel(lambda: 0.0),
    )


def test_a_quiet_pulse_of_a_large_farm_reads_its_sockets_on_a_cadence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vipfarm.node.pulse.DRAIN_MAX", 8)  # what one drain reads at most
    pulse = make_pulse(tmp_path, nodes=6)
    quiet = [True]
    monkeypatch.setattr(pulse.core, "quiet", lambda: quiet[0])

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
        ):
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            pulse._socks["lan"] = sock
            loop.add_reader(sock.fileno(), pulse._drain, "lan")
            pulse._set_reading()
            assert pulse._calm and pulse._calm_timer is not None
            assert not loop.remove_reader(sock.fileno())  # out of the loop
            peer.sendto(b"VF", sock.getsockname())
            deadline = loop.time() + 5.0
            while pulse.hb_received["lan"] == 0 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert pulse.hb_received["lan"] == 1  # read on the cadence
            # A flood: more queued than one drain reads turns arrival reading on, quiet or not.
            for _ in range(20):
                peer.sendto(b"VF", sock.getsockname())
            while pulse.hb_received["lan"] < 21 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert pulse.hb_received["lan"] == 21
            assert not pulse._calm and pulse._calm_timer is None
            assert loop.remove_reader(sock.fileno())
            pulse._flooded_until = 0.0
            loop.add_reader(sock.fileno(), pulse._drain, "lan")
            pulse._set_reading()
            assert pulse._calm
            quiet[0] = False  # a handover began: every heartbeat is read as it arrives
            pulse._set_reading()
            assert not pulse._calm and pulse._calm_timer is None
            assert loop.remove_reader(sock.fileno())
            pulse._socks.clear()

    asyncio.run(scenario())


def test_a_small_farm_always_reads_heartbeats_as_they_arrive(tmp_path: Path) -> None:
    pulse = make_pulse(tmp_path, nodes=3)
    assert pulse.core.quiet() is False  # not UP: and even when quiet, 2 peers are too few
    pulse.core.quiet = lambda: True  # type: ignore[method-assign]

    async def scenario() -> None:
        pulse._socks["lan"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            pulse._set_reading()
            assert not pulse._calm
        finally:
            pulse._socks.pop("lan").close()

    asyncio.run(scenario())


def test_the_incarnation_is_persisted_in_the_state_dir_and_only_grows(tmp_path: Path) -> None:
    first = make_pulse(tmp_path)
    path = tmp_path / "state" / "incarnation"
    assert int(path.read_text()) == first.incarnation
    assert not (tmp_path / "run" / "incarnation").exists()
    path.write_text(str(10**15))  # a clock stepped back since the last start
    assert make_pulse(tmp_path).incarnation == 10**15 + 1


def test_unknown_sources_are_dropped_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pulse = make_pulse(tmp_path)

    class NoDriver:
        def datagram(self, *args: object) -> None:
            raise AssertionError("decoded")

    monkeypatch.setattr(pulse, "driver", NoDriver())
    for _ in range(3):
        pulse.on_datagram(bytes(60_000), "lan", "203.0.113.9")
    pulse.on_datagram(b"VF", "lan", "198.51.100.13")
    assert pulse.hb_rejected[("lan", "unknown_source")] == 4
    assert pulse.core.drops["unknown_source"] == 4


def test_an_unreadable_peer_is_logged_once_with_the_fix(tmp_path: Path) -> None:
    pulse = make_pulse(tmp_path)
    future = b"VF\x09" + bytes(100)
    for _ in range(5):
        pulse.on_datagram(future, "lan", "198.51.100.12")
    other_key = Codec("web", b"o" * 32, 256).encode(
        node_id=node_id("n2"), digest=1, incarnation=1, seq=1, state=NodeState.UP, weight=1,
        owned=0, want=0, fresh=0, fresh_len=1,
    )  # fmt: skip
    for _ in range(5):
        pulse.on_datagram(other_key, "lan", "198.51.100.12")
    assert pulse.hb_rejected[("lan", "version")] == 5
    assert pulse.hb_rejected[("lan", "unknown_key")] == 5
    logged = [e for e in pulse._backlog if e.name.startswith("heartbeat_")]
    assert [(e.name, e.fields.get("peer"), e.fields.get("version")) for e in logged] == [
        ("heartbeat_version_unsupported", "n2", 9),
        ("heartbeat_key_unknown", "n2", None),
    ]
    assert logged[0].fields["speaks"] == "1..3"
    assert "upgrade vipfarm on this node" in logged[0].fields["fix"]


def test_new_farm_keys_are_taken_live_and_a_bad_one_changes_nothing(tmp_path: Path) -> None:
    pulse = make_pulse(tmp_path)
    new = tmp_path / "next.key"
    new.write_bytes(b"N" * 32 + b"\n")
    old = tmp_path / "old.key"
    old.write_bytes(b"k" * 32)
    short = tmp_path / "short.key"
    short.write_bytes(b"short")
    for key in (new, old, short):
        key.chmod(0o600)  # secret files: the pulse reads them with the checks of validation
    spec = pulse.datapath.spec.model_dump(mode="json")
    replies: list[ch.Message] = []

    class Writer:
        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes) -> None:
            replies.append(ch.decode(data[4:]))

    def apply(**files: str) -> ch.Reply:
        msg = ch.ApplyConfig(id=len(replies), spec=spec, weight=1, **files)
        asyncio.run(pulse._apply_config(msg, Writer()))  # type: ignore[arg-type]
        reply = replies[-1]
        assert isinstance(reply, ch.Reply)
        return reply

    assert apply(key_file=str(old), next_key_file=str(new)).ok
    assert (pulse.core.config.key, pulse.core.config.next_key) == (b"k" * 32, b"N" * 32)
    bad = apply(key_file=str(new), next_key_file=str(short))
    assert not bad.ok and "next farm key is 5 bytes" in (bad.error or "")
    assert pulse.core.config.next_key == b"N" * 32  # unchanged
    missing = apply(key_file=str(tmp_path / "nope.key"))
    assert not missing.ok and "nope.key" in (missing.error or "")
    assert apply(key_file=str(new)).ok
    assert pulse.core.config.key == b"N" * 32
    assert pulse.core.config.next_key is None
