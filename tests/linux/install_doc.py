"""docs/INSTALL.md as data: its commands, where each runs, and how the tests run each one.

The document's ```console blocks hold its commands: a line that starts with a prompt
(`build#`, `admin#`, `node1#` to `node3#`, `client$`, `server#`) is a command to run on that
machine, a line ending in a backslash continues on the next one, and every other line is what
the command prints (`...` stands for lines left out; a question's line ends with the
operator's answer, `[Y/n] y`, which the tests type). `doc_commands` returns them in the
document's order.

`WAYS` says, for every kind of command the document may hold, how the tests exercise it: as
written in its server's namespaces, or, for the few that need ssh or a running systemd (this
machine has neither: PID 1 is not systemd and no sshd runs), the stated equivalent. `way_of`
finds the one way of a command; a command that no way matches is an error, so a new command in
the document fails the tests until a test covers it (tests/unit/test_install_doc.py checks this
without root, tests/linux/test_packaging.py runs the walkthrough). Pure: no I/O but reading the
document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "INSTALL.md"

# prompt -> the machine it stands for (the names the walkthrough test gives its contexts)
PROMPTS = {
    "build#": "build",
    "admin#": "admin",
    "node1#": "node1",
    "node2#": "node2",
    "node3#": "node3",
    "client$": "client1",
    "server#": "server",
}
_PROMPT_RE = re.compile(r"^(" + "|".join(re.escape(p) for p in PROMPTS) + r") (.*)$")
_BLOCK_RE = re.compile(r"^```console\n(.*?)^```", flags=re.S | re.M)
_BOX = re.compile(r"[\u2500-\u257f]")
# A shown line that ends in a question and the operator's answer: `... [Y/n] y`.
_ANSWER_RE = re.compile(r"^(.*\[[Yy]/[Nn]\]) (\S+)$")


@dataclass(frozen=True)
class DocCommand:
    where: str  # a value of PROMPTS
    line: str  # the command as written, continuations joined
    output: tuple[str, ...]  # the lines shown after it, `...` and empty lines left out
    lineno: int  # of the prompt line in the document

    def __str__(self) -> str:
        return f"INSTALL.md:{self.lineno}: {self.where}# {self.line}"

    @property
    def answers(self) -> str:
        """What the operator types at the command's questions (`Do you want to continue?
        [Y/n] y` shown), one line each."""
        return "".join(m[2] + "\n" for s in self.output if (m := _ANSWER_RE.match(s)))


@dataclass(frozen=True)
class Way:
    """How the tests exercise the commands that `pattern` matches on the machines `where`."""

    name: str
    where: frozenset[str]
    pattern: re.Pattern[str]
    how: str  # said to the reader of a failure and of the test: what runs instead, and why


def _way(name: str, where: str, pattern: str, how: str) -> Way:
    return Way(name, frozenset(where.split()), re.compile(pattern), how)


WAYS = (
    _way(
        "scripts_install",
        "build",
        r"^scripts/install$",
        "not run again: scripts/test runs it before pytest; the test checks that every "
        "package it lists is installed",
    ),
    _way(
        "deb_build",
        "build",
        r"^packaging/deb/build$",
        "run as written, with WHEEL= the wheel the tests built once, OUT= a test directory "
        "and PYTHON= the test's interpreter (the checkout's .venv in CI)",
    ),
    _way(
        "scp",
        "build",
        r"^scp (?P<src>\S+) root@(?P<addr>[0-9.]+):$",
        "no sshd here: the file is copied into that server's home directory (the test's "
        "directory for it, the working directory of its commands)",
    ),
    _way(
        "rsync",
        "admin",
        r"^rsync -a (?P<src>\S+/) root@(?P<addr>[0-9.]+):(?P<dest>/\S+/)$",
        "no sshd here: rsync -a copies into that server's own view of the path (its "
        "/etc/vipfarm), without ssh",
    ),
    _way(
        "rsync_pull",
        "admin",
        r"^rsync -a root@(?P<addr>[0-9.]+):(?P<src>/\S+) (?P<dest>\S+/)$",
        "no sshd here: rsync -a copies from that server's own view of the path into the "
        "admin's directory, without ssh",
    ),
    _way(
        "restart",
        "node1 node2 node3",
        r"^systemctl restart vipfarm@(?P<farm>\S+)$",
        "systemd is not PID 1 here: what systemctl restart does for this unit, stop (SIGTERM "
        "to the daemon, waited for) then start (its ExecStart until READY=1, as for "
        "`service install --enable`)",
    ),
    _way(
        "service_install",
        "node1 node2 node3",
        r"^vipfarm service install (?P<farm>\S+) --enable$",
        "run as written; systemd is not PID 1 here, so it prints the systemctl steps and the "
        "test does them: systemd-analyze verify of the unit it wrote, systemctl enable (works "
        "offline), and for --now the unit's ExecStart run in the server's namespaces with "
        "the directories systemd makes (State-, Logs-, RuntimeDirectory) and NOTIFY_SOCKET, "
        "waiting for READY=1 as systemctl start does for Type=notify (the unit's sandboxing "
        "is not applied)",
    ),
    _way(
        "service_remove",
        "node1 node2 node3",
        r"^vipfarm service remove (?P<farm>\S+)$",
        "run as written; for the `systemctl disable --now` it prints (no systemd), the test "
        "sends SIGTERM to the daemon it started (KillMode=process) and waits for its exit",
    ),
    _way(
        "purge",
        "node1 node2 node3",
        r"^apt-get purge vipfarm$",
        "run as written; the servers share this machine's dpkg database, so the first purge "
        "(node1's, whose /etc/vipfarm is this machine's) removes the package and the others "
        "find it gone; then everything the package and the farm made is checked to be gone, "
        "file by file (the other servers' own /etc/vipfarm directories are the test's)",
    ),
    _way(
        "retry",
        "node1 node2 node3 client1",
        r"^(vipfarm (--node \S+ --ca-file \S+ )?state|vipfarm log -n \d+|curl -s \S+)$",
        "run as written, again until what the document shows appears (the farm converges "
        "within seconds; at most 60 s)",
    ),
    _way(
        "wheel_build",
        "build",
        r"^\.venv/bin/pip wheel --no-deps -w dist \.$",
        "run by the tests' `wheel` fixture as the test interpreter's pip, into a test "
        "directory (the checkout stays clean)",
    ),
    _way(
        "wheel_venv",
        "server",
        r"^(python3 -m venv /opt/vipfarm|/opt/vipfarm/bin/pip install vipfarm-\S+\.whl"
        r"|ln -s /opt/vipfarm/bin/vipfarm /usr/local/bin/vipfarm)$",
        "run by the tests' `installed` fixture with /opt/vipfarm and /usr/local/bin in a "
        "test directory and the wheel the fixture built",
    ),
    _way(
        "as_written",
        "build admin node1 node2 node3",
        r"^(apt-get install \S+|systemctl disable nginx|vipfarm .*|mkdir \S+ && cd \S+"
        r"|ls [\w/ .-]+|cp \S+ \S+|printf '[^']*' >> \S+)$",
        "run as written, by bash in that server's namespaces and working directory (for "
        "systemctl disable: its own copies of /etc/systemd/system and /etc/rc?.d)",
    ),
)


class DocError(ValueError):
    pass


def doc_commands(text: str | None = None) -> list[DocCommand]:
    if text is None:
        text = DOC.read_text()
    out: list[DocCommand] = []
    for block in _BLOCK_RE.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).splitlines()
        i = 0
        current: tuple[str, str, int] | None = None
        shown: list[str] = []
        while i < len(lines):
            line = lines[i]
            m = _PROMPT_RE.match(line)
            if m:
                if current:
                    out.append(DocCommand(current[0], current[1], tuple(shown), current[2]))
                lineno = first + i
                cmd = m.group(2)
                while cmd.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
                current, shown = (PROMPTS[m.group(1)], cmd.strip(), lineno), []
            elif current is None:
                raise DocError(f"INSTALL.md:{first + i}: a console block must start with a prompt")
            elif line.strip() and line.strip() != "...":
                shown.append(line)
            i += 1
        if current:
            out.append(DocCommand(current[0], current[1], tuple(shown), current[2]))
    return out


def way_of(cmd: DocCommand) -> tuple[Way, re.Match[str]]:
    """The way the tests run `cmd`: the first of WAYS that matches it (DocError if none)."""
    for way in WAYS:
        m = way.pattern.match(cmd.line)
        if m and cmd.where in way.where:
            return way, m
    raise DocError(f"{cmd}: no test runs this command; add a way to tests/linux/install_doc.py")


def flat(text: str) -> str:
    """Text as a shown line is compared: rich's box lines as spaces, runs of spaces as one."""
    return " ".join(_BOX.sub(" ", text).split())


def shows(output: str, cmd: DocCommand) -> list[str]:
    """The lines of `cmd.output` missing from `output` (each must be part of one line)."""
    have = [flat(line) for line in output.splitlines()]
    # A shown line that ends in `...` stands for its beginning.
    # A question's answer is typed, not printed.
    want = [(s, _ANSWER_RE.sub(r"\1", s)) for s in cmd.output]
    want = [(s, flat(w.removesuffix("...")) if w.endswith(" ...") else flat(w)) for s, w in want]
    return [s for s, w in want if not any(w in h for h in have)]
