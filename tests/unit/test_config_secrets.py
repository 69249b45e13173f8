"""Files the configuration names: secrets (kind, owner, mode, size), the farm file itself, and
the module and scripts root runs; and the inputs that used to crash or hang the loader, each
refused quickly with a problem that names where it is."""

from __future__ import annotations

import os
import re
import stat
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vipfarm.cli import app as cli_app
from vipfarm.config.loading import MAX_CONFIG_BYTES, load_config, parse_config
from vipfarm.config.problems import MAX_PROBLEMS, ConfigError
from vipfarm.config.secrets import FileRefused, read_capped, read_secret
from vipfarm.supervisor.scripts import untrusted

GOOD = textwrap.dedent(
    """
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
    name = "testmod"

    [api]
    token_file = "api.token"
    """
)

NOBODY = 65534


@pytest.fixture
def farm_dir(tmp_path: Path) -> Path:
    for name in ("farm.key", "api.token"):
        (tmp_path / name).write_text(os.urandom(32).hex() + "\n")
        (tmp_path / name).chmod(0o600)
    mod = tmp_path / "modules" / "testmod"
    mod.mkdir(parents=True)
    (mod / "module.toml").write_text('start = "start"\nstop = "stop"\n')
    for script in ("start", "stop"):
        (mod / script).write_text("#!/bin/sh\nexit 0\n")
        (mod / script).chmod(0o755)
    return tmp_path


def problems(farm_dir: Path, text: str = GOOD) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, base_dir=farm_dir, module_path=[])
    return [str(p) for p in exc.value.problems]


def within(seconds: float, fn: Callable[[], object]) -> None:
    """Run fn in a thread; fail (instead of hanging the suite) if it blocks."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if errors:
        raise errors[0]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


# ------------------------------------------------------------------------------ secrets


def test_a_good_config_loads(farm_dir: Path) -> None:
    cfg = parse_config(GOOD, base_dir=farm_dir, module_path=[])
    assert len(cfg.key()) == 64 and cfg.api is not None and len(cfg.api.token()) == 64


@pytest.mark.parametrize(
    ("mode", "text"),
    [
        (0o644, "readable by group and others"),
        (0o640, "readable by group"),
        (0o604, "readable by others"),
        (0o660, "readable and writable by group"),
        (0o606, "readable and writable by others"),
        (0o620, "writable by group"),
        (0o611, "executable by group and others"),
    ],
)
def test_a_key_others_can_reach_is_refused_with_chmod_600(
    farm_dir: Path, mode: int, text: str
) -> None:
    key = farm_dir / "farm.key"
    key.chmod(mode)
    assert problems(farm_dir) == [
        f"farm.key_file: {key} is mode {mode:04o} ({text}): run chmod 600 {key}"
    ]


def test_a_symlink_is_followed_and_its_target_checked(farm_dir: Path) -> None:
    target = farm_dir / "real.key"
    (farm_dir / "farm.key").rename(target)
    (farm_dir / "farm.key").symlink_to(target)
    parse_config(GOOD, base_dir=farm_dir, module_path=[])
    target.chmod(0o644)
    key = farm_dir / "farm.key"
    assert problems(farm_dir) == [
        f"farm.key_file: {key} (a link to {target}) is mode 0644 (readable by group and "
        f"others): run chmod 600 {target}"
    ]


@needs_root
def test_a_key_owned_by_another_user_is_refused(farm_dir: Path) -> None:
    key = farm_dir / "farm.key"
    os.chown(key, NOBODY, -1)
    (p,) = problems(farm_dir)
    assert p.startswith(f"farm.key_file: {key} is owned by uid {NOBODY}")
    assert p.endswith(
        f"must be owned by root, as anyone else could replace it: run chown root {key}"
    )


def test_fifos_devices_and_directories_are_refused_without_blocking(farm_dir: Path) -> None:
    key = farm_dir / "farm.key"
    key.unlink()
    os.mkfifo(key, 0o600)
    (p,) = problems(farm_dir)
    assert p == (
        f"farm.key_file: {key} is a FIFO (named pipe), not a regular file: name the file that "
        "holds the farm key"
    )
    key.unlink()
    key.mkdir(mode=0o700)
    (p,) = problems(farm_dir)
    assert f"{key} is a directory, not a regular file" in p and "chmod" not in p
    key.rmdir()
    for device in ("/dev/zero", "/dev/null"):
        key.symlink_to(device)
        (p,) = problems(farm_dir)
        assert f"(a link to {device}) is a character device, not a regular file" in p
        key.unlink()


def test_a_huge_key_is_refused_after_reading_only_the_cap(farm_dir: Path) -> None:
    key = farm_dir / "farm.key"
    with key.open("wb") as f:
        f.truncate(1 << 40)  # sparse: a terabyte that costs nothing unless read whole
    (p,) = problems(farm_dir)
    assert p == (
        f"farm.key_file: {key} is larger than 4096 bytes, too large for a farm key: is it the "
        "right file?"
    )


def test_a_token_must_be_printable_ascii(farm_dir: Path) -> None:
    token = farm_dir / "api.token"
    for data, byte, offset in (
        (b"0123456789abcdef\xff\n", 0xFF, 16),
        (b" 0123456789abcdef", 0x20, 0),
    ):
        token.write_bytes(data)
        (p,) = problems(farm_dir)
        assert p.startswith(
            f"api.token_file: {token} holds byte 0x{byte:02x} at offset {offset}: an API token "
            "must be printable ASCII without spaces"
        )


def test_a_nul_in_a_file_name_is_a_problem(farm_dir: Path) -> None:
    (p,) = problems(farm_dir, GOOD.replace('"farm.key"', '"farm\\u0000.key"'))
    assert p.startswith("farm.key_file: ") and "NUL byte" in p


def test_the_tls_key_and_certificates(farm_dir: Path) -> None:
    for name in ("api.crt", "api.key"):
        (farm_dir / name).write_text("-----BEGIN X-----\n")
    (farm_dir / "api.key").chmod(0o600)
    text = GOOD + 'cert_file = "api.crt"\nkey_file = "api.key"\nca_file = "api.crt"\n'
    parse_config(text, base_dir=farm_dir, module_path=[])
    (farm_dir / "api.key").chmod(0o640)
    key = farm_dir / "api.key"
    assert problems(farm_dir, text) == [
        f"api.key_file: {key} is mode 0640 (readable by group): run chmod 600 {key}"
    ]
    (farm_dir / "api.key").chmod(0o600)
    (farm_dir / "api.crt").unlink()
    os.mkfifo(farm_dir / "api.crt")
    found = problems(farm_dir, text)
    assert [p.split(":")[0] for p in found] == ["api.cert_file", "api.ca_file"]
    assert all("is a FIFO (named pipe), not a regular file" in p for p in found)


def test_read_secret_and_read_capped(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_bytes(b"x" * 10)
    path.chmod(0o644)
    assert read_capped(path, what="thing", max_bytes=10) == b"x" * 10
    with pytest.raises(FileRefused, match="larger than 9 bytes"):
        read_capped(path, what="thing", max_bytes=9)
    with pytest.raises(FileRefused, match="mode 0644"):
        read_secret(path, what="thing", max_bytes=10)
    assert read_secret(path, what="thing", max_bytes=10, check_access=False) == b"x" * 10
    with pytest.raises(FileRefused, match=r"does not exist: create one with: \(umask 077"):
        read_secret(tmp_path / "none", what="thing", max_bytes=10)


# ------------------------------------------------------------------------------ the farm file


def test_the_farm_file_as_a_fifo_a_device_or_a_directory(tmp_path: Path) -> None:
    fifo = tmp_path / "farm.toml"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO (named pipe)"), (Path("/dev/zero"), "a character device")):
        with pytest.raises(ConfigError, match=re.escape(f"is {kind}, not a regular file")):
            within(10, lambda p=path: load_config(p))  # type: ignore[misc]
    with pytest.raises(ConfigError, match="is a directory, not a regular file"):
        load_config(tmp_path)


def test_the_farm_file_not_utf8_or_too_large(tmp_path: Path) -> None:
    path = tmp_path / "farm.toml"
    path.write_bytes(b'[farm]\nname = "w\xffb"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert [str(p) for p in exc.value.problems] == [
        "line 2, column 10: not UTF-8 text (byte 0xff): save the file as UTF-8"
    ]
    with path.open("wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        parse_config("#" * (MAX_CONFIG_BYTES + 1), base_dir=tmp_path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a = " + "9" * 5000, "the file: not valid TOML: Exceeds the limit (4300 digits)"),
        ("a = " + "[" * 100_000, "line 1: values nested more than 16 deep"),
        ("a = " + "{b = " * 100_000, "line 1: values nested more than 16 deep"),
        ("\n" + "a." * 100_000 + "b = 1", "line 2: a dotted key of more than 8 parts"),
        ("[" + "a." * 100_000 + "b]", "line 1: a dotted key of more than 8 parts"),
    ],
)
def test_inputs_that_would_crash_or_exhaust_tomllib(
    tmp_path: Path, text: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        within(10, lambda: parse_config(text, base_dir=tmp_path))
    (p,) = exc.value.problems
    assert str(p).startswith(problem)


def test_dots_and_brackets_in_strings_and_comments_are_not_keys(farm_dir: Path) -> None:
    text = GOOD.replace(
        'name = "web"',
        'name = "web" # a.b.c.d.e.f.g.h.i.j [[[[[[[[[[[[[[[[[[[\nseed = 1 # """ \' not a string',
    ).replace(
        'name = "testmod"',
        'name = "testmod"\ndescription = """a.b.c.d.e.f.g.h.i.j\\""" ["""\n'
        "[module.macros]\nx = '''[[[[[[[[[[[[[[[[[[[ a.b.c.d.e.f.g.h.i.j.k'''\n"
        "y = 'a.b.c.d.e.f.g.h.i.j.k'",
    )
    cfg = parse_config(text, base_dir=farm_dir, module_path=[])
    assert cfg.module.macros["y"] == "a.b.c.d.e.f.g.h.i.j.k"
    assert cfg.module.description == 'a.b.c.d.e.f.g.h.i.j""" ['


def test_wrong_values_everywhere_name_their_keys(farm_dir: Path) -> None:
    text = (
        GOOD.replace('ports = "80"', "ports = nan")
        .replace('name = "lan"', "name = 1e400")
        .replace('name = "node1"', 'name = "node1"\nweight = ' + "9" * 4000)
        .replace("[api]", "[drain]\ntimeout_s = inf\n\n[api]")
    )
    found = problems(farm_dir, text)
    assert [p.split(":")[0] for p in found] == [
        "network[0].name",
        "node[0].weight",
        "rule[0].ports",
        "drain.timeout_s",
    ], found
    assert "a number too long to print" in found[1] or len(found[1]) < 200


def test_keys_and_values_are_escaped_and_problems_capped(farm_dir: Path) -> None:
    text = GOOD.replace("[api]", '[module.macros]\n"a\\nb\\u0007" = "x"\n\n[api]')
    text += "".join(f'"junk {i}" = 1\n' for i in range(30_000))
    with pytest.raises(ConfigError) as exc:
        within(30, lambda: parse_config(text, base_dir=farm_dir, module_path=[]))
    found = [str(p) for p in exc.value.problems]
    assert len(found) == MAX_PROBLEMS
    assert found[-1].startswith("...: and up to ")
    assert all(p.isprintable() for p in found)
    assert 'module.macros."a\\nb\\x07" (the key itself): ' in "\n".join(found) or any(
        p.startswith('api."junk 0": unknown key') for p in found
    )


def test_surrogates_from_a_json_body_are_escaped(farm_dir: Path) -> None:
    text = GOOD.replace('name = "web"', 'name = "w\udcffb"')
    (p,) = problems(farm_dir, text)
    assert p.startswith("farm.name: bad value 'w\\udcffb'")
    p.encode()


def test_config_check_on_a_fifo_or_bad_bytes_exits_2(tmp_path: Path) -> None:
    fifo = tmp_path / "farm.toml"
    os.mkfifo(fifo)
    results = []
    within(20, lambda: results.append(CliRunner().invoke(cli_app, ["config", "check", str(fifo)])))
    res = results[0]
    assert res.exit_code == 2 and "is a FIFO (named pipe), not a regular file" in res.output
    bad = tmp_path / "bad[bold].toml"
    bad.write_bytes(b"\x00\xff[farm]\n")
    res = CliRunner().invoke(cli_app, ["config", "check", str(bad)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"{bad}: invalid" in res.output


# ------------------------------------------------------------------------------ scripts root runs


def test_untrusted_checks_the_file_and_every_directory_above(tmp_path: Path) -> None:
    d = tmp_path / "mod"
    d.mkdir(mode=0o755)
    script = d / "start"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert untrusted(script) is None
    assert untrusted(d / "missing") is None
    script.chmod(0o775)
    assert untrusted(script) == (
        f"{script} is mode 0775 (writable by group), so they could make root run anything "
        f"there: run chmod g-w {script}"
    )
    script.chmod(0o755)
    d.chmod(0o757)
    assert untrusted(script) == (
        f"{d} is mode 0757 (writable by others), so they could make root run anything there: "
        f"run chmod o-w {d}"
    )
    d.chmod(0o1777)  # sticky, as /tmp: only an entry's owner may replace it
    assert untrusted(script) is None
    assert untrusted(d) is not None  # ... but the directory itself is still what root runs from
    d.chmod(0o755)
    link = tmp_path / "link"
    link.symlink_to(script)
    assert untrusted(link) is None
    script.chmod(0o777)
    assert f"{script} is mode 0777 (writable by group and others)" in (untrusted(link) or "")


@needs_root
def test_untrusted_owner(tmp_path: Path) -> None:
    script = tmp_path / "start"
    script.write_text("#!/bin/sh\n")
    os.chown(script, NOBODY, -1)
    why = untrusted(script) or ""
    assert why.startswith(f"{script} is owned by uid {NOBODY}")
    assert why.endswith(f"run chown root {script}")


def test_a_module_others_can_change_is_refused(farm_dir: Path) -> None:
    mod = farm_dir / "modules" / "testmod"
    (mod / "common.sh").write_text("x=1\n")
    (mod / "common.sh").chmod(0o666)
    (p,) = problems(farm_dir)
    assert p == (
        "module.name: a module that only root can change: "
        f"{mod}/common.sh is mode 0666 (writable by group and others), so they could make root "
        f"run anything there: run chmod go-w {mod}/common.sh"
    )
    (mod / "common.sh").chmod(0o644)
    mod.chmod(0o775)
    (p,) = problems(farm_dir)
    assert p.endswith(f"run chmod g-w {mod}") and "module that only root can change" in p
    mod.chmod(0o755)
    parse_config(GOOD, base_dir=farm_dir, module_path=[])


def test_a_script_by_absolute_path_is_checked(farm_dir: Path) -> None:
    other = farm_dir / "bin"
    other.mkdir()
    script = other / "force"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o777)
    text = GOOD.replace('name = "testmod"', f'name = "testmod"\nforce_stop = "{script} now"')
    (p,) = problems(farm_dir, text)
    assert p.startswith("module.force_stop: a script only root can change: ")
    assert p.endswith(f"run chmod go-w {script}")


def test_a_hostile_module_file(farm_dir: Path) -> None:
    f = farm_dir / "modules" / "testmod" / "module.toml"
    f.write_text("a." * 100_000 + "b = 1\n")
    (p,) = problems(farm_dir)
    assert p.startswith("module.name: bad value 'testmod': expected a valid ")
    assert p.endswith(
        "module.toml: line 1: a dotted key of more than 8 parts: a farm file needs 3 at most "
        "(module.restart.max)"
    )


def test_the_module_file_as_a_fifo(farm_dir: Path) -> None:
    f = farm_dir / "modules" / "testmod" / "module.toml"
    f.unlink()
    os.mkfifo(f)
    text = GOOD.replace('name = "testmod"', 'path = "modules/testmod"')
    found: list[list[str]] = []
    within(10, lambda: found.append(problems(farm_dir, text)))
    (p,) = found[0]
    assert p.startswith("module.path: ") and "is a FIFO (named pipe), not a regular file" in p


def test_runner_refuses_an_untrusted_script_as_root(tmp_path: Path) -> None:
    import asyncio
    import logging

    from vipfarm.supervisor.scripts import ScriptRunner

    script = tmp_path / "start"
    script.write_text("#!/bin/sh\necho ran > " + str(tmp_path / "ran") + "\n")
    script.chmod(0o757)
    log = logging.getLogger("test")
    runner = ScriptRunner(env={}, cwd=tmp_path, app_log=log, module_log=log)
    result = asyncio.run(runner.run("start", [str(script)], 5))
    if os.geteuid() == 0:
        assert result.exit_code is None and result.error is not None
        assert f"run chmod o-w {script}" in result.error
        assert not (tmp_path / "ran").exists()
    else:
        assert result.ok
    assert stat.S_IMODE(script.stat().st_mode) == 0o757
