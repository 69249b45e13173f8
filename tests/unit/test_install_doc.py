"""docs/INSTALL.md's commands are all covered by a test (tests/linux/install_doc.py), without
root: every command has exactly one way the walkthrough test runs it, every way is used, and the
document's blocks parse (prompts, continuations, shown output)."""

from __future__ import annotations

import pytest

from tests.linux.install_doc import WAYS, DocCommand, DocError, doc_commands, shows, way_of


def test_every_command_of_install_md_has_a_way_and_every_way_a_command() -> None:
    cmds = doc_commands()
    assert len(cmds) > 30
    used = {way_of(c)[0].name for c in cmds}
    assert used == {w.name for w in WAYS}
    # Both servers run the walkthrough, the farm is written once and grows by one node.
    where = [c.where for c in cmds]
    assert where.count("node1") > 8 and where.count("node2") > 8 and where.count("node3") > 4
    inits = [c.line.split()[1:3] for c in cmds if c.line.startswith("vipfarm init")]
    assert inits == [["init", "--farm"], ["init", "--add-node"]]


def test_a_command_no_test_runs_is_refused() -> None:
    text = "```console\nnode1# vipfarm state\nnode1# reboot\n```\n"
    cmds = doc_commands(text)
    assert [c.line for c in cmds] == ["vipfarm state", "reboot"]
    way_of(cmds[0])
    with pytest.raises(DocError, match=r"INSTALL\.md:3: node1# reboot: no test runs"):
        way_of(cmds[1])
    # A command on a machine its way does not cover is refused too.
    with pytest.raises(DocError):
        way_of(DocCommand("client1", "vipfarm service install web --enable", (), 1))


def test_continuations_and_shown_output() -> None:
    text = (
        "intro\n```console\nadmin# vipfarm init --farm web \\\n  --vip 198.51.100.100\n"
        "farm web: 2 nodes written to ...\n...\n\nnode1   UP\nclient$ curl -s http://x/\n```\n"
    )
    init, curl = doc_commands(text)
    assert init.line == "vipfarm init --farm web --vip 198.51.100.100" and init.lineno == 3
    assert init.output == ("farm web: 2 nodes written to ...", "node1   UP")
    assert curl.where == "client1" and curl.output == ()
    out = "farm web: 2 nodes written to /tmp/x/nodes\n\u2502 node1 \u2502 UP \u2502 256 \u2502\n"
    assert shows(out, init) == []
    assert shows("node1 DOWN", init) == list(init.output)


def test_a_block_must_start_with_a_prompt() -> None:
    with pytest.raises(DocError, match="must start with a prompt"):
        doc_commands("```console\nvipfarm state\n```\n")
