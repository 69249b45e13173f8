"""The bench's pure parts: wrk output, CPU accounting, figures from runs, registry, report."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vipfarm.bench import framework as core
from vipfarm.bench.cpu import CpuTimes, Snapshot, lab_cpu_s, parse_proc_stat
from vipfarm.bench.framework import (
    BenchError,
    FigureSet,
    Goal,
    Run,
    Scenario,
    ScenarioResult,
    Settings,
    interleave_steps,
    owned_twice,
    paired_values,
    register,
    rps,
    select,
    values_of,
)
from vipfarm.bench.haproxy import haproxy_conf
from vipfarm.bench.plots import bar_panels
from vipfarm.bench.report import SAFETY_COUNTERS, check_goals, compose, fmt, markdown
from vipfarm.bench.wrk import DONE_LUA, MARKER, Mode, WrkError, WrkResult, parse_wrk, wrk_argv

WRK_OUT = """\
Running 3s test @ http://198.51.100.100/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.31ms    1.39ms  14.97ms   91.06%
  21098 requests in 3.00s, 2.98MB read
Requests/sec:   7021.87
VIPFARM_WRK {"requests": 21098, "duration_us": 3004611, "connect": 1, "read": 2, "write": 3, \
"status": 5, "timeout": 4, "p50_us": 950, "p90_us": 2570, "p99_us": 7120, "max_us": 14970}
"""


# ---- wrk


def test_parse_wrk_reads_the_done_line_exactly() -> None:
    r = parse_wrk(WRK_OUT)
    assert r.requests == 21098
    assert r.duration_s == pytest.approx(3.004611)
    assert r.rps == pytest.approx(21098 / 3.004611)
    assert (r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms) == (0.95, 2.57, 7.12, 14.97)
    assert r.socket_errors == 1 + 2 + 3 + 4
    assert r.non_2xx == 5


def test_parse_wrk_without_summary_says_what_wrk_said() -> None:
    with pytest.raises(WrkError, match="unable to connect"):
        parse_wrk("unable to connect to 198.51.100.100:80 Connection refused\n")
    with pytest.raises(WrkError, match="no output"):
        parse_wrk("")


def test_parse_wrk_rejects_a_malformed_summary() -> None:
    with pytest.raises(WrkError, match="malformed"):
        parse_wrk(MARKER + '{"requests": 3}\n')
    with pytest.raises(WrkError, match="malformed"):
        parse_wrk(MARKER + "{not json\n")


def test_rps_of_an_empty_run_is_zero() -> None:
    assert WrkResult(0, 0.0, 0, 0, 0, 0, 0, 0).rps == 0.0


def test_wrk_argv_modes() -> None:
    close = wrk_argv("http://x/", Mode.CLOSE, 3, 16, 1, "/tmp/s.lua")
    assert close[0] == "wrk" and close[-1] == "http://x/"
    assert "--duration=3s" in close and "--connections=16" in close
    assert "--script=/tmp/s.lua" in close
    assert close[close.index("--header") + 1] == "Connection: close"
    keep = wrk_argv("http://x/", Mode.KEEPALIVE, 1, 16, 1, "s.lua")
    assert "--header" not in keep


def test_done_script_prints_the_marker_and_every_field() -> None:
    assert MARKER in DONE_LUA
    for field in ("requests", "duration_us", "p99_us", "status", "timeout", "connect"):
        assert f'"{field}"' in DONE_LUA


# ---- CPU


STAT = """\
cpu  100 5 50 1000 20 3 7 11 0 0
cpu0 50 0 25 500 10 1 3 5 0 0
intr 12345
"""


def test_parse_proc_stat_counts_work_not_idle_or_steal() -> None:
    t = parse_proc_stat(STAT)
    assert t == CpuTimes(busy=100 + 5 + 50 + 3 + 7)
    assert (t - CpuTimes(60)).busy == 105
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1\n")


def test_lab_cpu_counts_tasks_and_children_but_not_a_reused_pid() -> None:
    m = CpuTimes(0)
    before = Snapshot(m, children_s=1.0, tasks={10: (500, 10**9), 11: (600, 0), 12: (700, 0)})
    # 10 used 0.25 s; 11 is a new process with the same PID; 12 ended.
    after = Snapshot(m, children_s=1.5, tasks={10: (500, 125 * 10**7), 11: (900, 4 * 10**9)})
    assert lab_cpu_s(before, after) == pytest.approx(0.25 + 0.5)


def test_snapshot_reads_this_process_precisely() -> None:
    import os

    from vipfarm.bench.cpu import snapshot

    me = os.getpid()
    a = snapshot([me, 2**22 + 1])  # the second PID cannot exist: left out
    sum(i * i for i in range(200_000))  # burn some CPU
    b = snapshot(a.tasks)
    assert set(a.tasks) == {me}
    assert 0 < lab_cpu_s(a, b) < 5


# ---- figures from runs


def _run(
    variant: str, mode: Mode, rnd: int, rps_: float, p99_ms: float = 1.0, cpu: float = 1.0
) -> Run:
    result = WrkResult(int(rps_ * 2), 2.0, 0.5, 0.8, p99_ms, 2 * p99_ms, 0, 0)
    return Run(variant, mode, rnd, result, cpu, 2.0)


def test_owned_twice_counts_buckets_held_by_two_kernels() -> None:
    assert owned_twice({"node1": [0, 1, 2], "node2": [3], "node3": None}) == 0
    assert owned_twice({"node1": [0, 1, 2], "node2": [1, 2], "node3": [2]}) == 2


def test_values_of_skips_failed_runs_and_missing_modes() -> None:
    runs = [
        _run("farm", Mode.CLOSE, 0, 100),
        _run("farm", Mode.CLOSE, 1, 300),
        _run("farm", Mode.CLOSE, 2, 200),
        Run("farm", Mode.CLOSE, 3, None, 1.0, 1.0),
        _run("other", Mode.KEEPALIVE, 0, 9),
    ]
    assert values_of(runs, "farm", rps) == {"close": [100, 300, 200]}


def test_paired_values_are_taken_within_a_round() -> None:
    runs = [
        _run("a", Mode.CLOSE, 0, 100),
        _run("b", Mode.CLOSE, 0, 50),
        _run("a", Mode.CLOSE, 1, 1000),
        _run("b", Mode.CLOSE, 1, 1000),
        _run("a", Mode.CLOSE, 2, 300),
        _run("b", Mode.CLOSE, 2, 100),
        _run("a", Mode.CLOSE, 3, 7),  # b has no run in round 3: ignored
    ]

    def ratio(x: Run, y: Run) -> float | None:
        a, b = rps(x), rps(y)
        return a / b if a is not None and b else None

    assert paired_values(runs, "a", "b", ratio) == {"close": [2.0, 1.0, 3.0]}


def test_figure_set_keeps_medians_and_ranges() -> None:
    f = FigureSet()
    f.add("x", {"close": [3.0, 1.0, 2.0], "keepalive": [5.0]})
    assert f.figures["x"] == {"close": 2.0, "keepalive": 5.0}
    assert f.spread["x"] == {"close": [1.0, 3.0], "keepalive": [5.0, 5.0]}
    runs = [_run("farm", m, 0, 100, p99_ms=3.0, cpu=0.5) for m in Mode]
    f.add_wrk(runs, ["farm"])
    assert {"farm_rps", "farm_p50_ms", "farm_p99_ms", "farm_cpu_us"} <= set(f.figures)
    assert f.figures["farm_p99_ms"] == {"close": 3.0, "keepalive": 3.0}
    assert f.figures["farm_cpu_us"] == pytest.approx({"close": 2500.0, "keepalive": 2500.0})
    result = f.result(runs, notes={"n": 1})
    assert result.figures is f.figures and result.spread is f.spread and result.notes == {"n": 1}


def test_settings_quick_is_one_short_round() -> None:
    quick, full = Settings.make(True), Settings.make(False)
    assert quick.rounds == 1 and quick.warmup_s == 0
    assert full.rounds > quick.rounds and full.duration_s >= quick.duration_s
    assert interleave_steps(quick, 4) == 4 * 2
    assert interleave_steps(full, 2) == 2 * 2 * (full.rounds + 1)


# ---- registry


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(core, "_REGISTRY", {})
    yield


def _scenario(name: str, keys: dict[str, str], goals: tuple[Goal, ...] = ()) -> Scenario:
    return Scenario(
        name=name,
        title=name.title(),
        produces=keys,
        method="method text",
        steps=lambda s: 1,
        run=lambda ctx: ScenarioResult({}),
        goals=goals,
    )


@pytest.mark.usefixtures("registry")
def test_registry_selects_by_result_key_or_name_in_registration_order() -> None:
    a = register(_scenario("alpha", {"a_rps": "x", "a_ms": "y"}))
    b = register(_scenario("beta", {"failover_ms": "z"}))
    assert core.scenarios() == [a, b]
    assert core.producers()["failover_ms"] is b
    assert select([]) == [a, b]
    assert select(["failover_ms"]) == [b]
    assert select(["failover_ms", "alpha", "a_ms"]) == [a, b]
    with pytest.raises(BenchError, match=r"'nope'.*a_rps"):
        select(["nope"])


@pytest.mark.usefixtures("registry")
def test_registry_refuses_clashes() -> None:
    register(_scenario("alpha", {"a_rps": "x"}))
    with pytest.raises(ValueError, match="twice"):
        register(_scenario("alpha", {"b": "x"}))
    with pytest.raises(ValueError, match="already"):
        register(_scenario("beta", {"a_rps": "x"}))
    with pytest.raises(ValueError, match="reserved"):
        register(_scenario("gamma", {"safety": "x"}))
    with pytest.raises(ValueError, match="does not produce"):
        register(_scenario("delta", {"d": "x"}, (Goal("e", "<=", 1, "e small"),)))


def test_the_data_path_scenarios_are_registered() -> None:
    import vipfarm.bench.figures  # noqa: F401

    keys = core.producers()
    for key in ("farm_rps", "haproxy_rps", "direct_rps", "farm_p99_ms", "haproxy_p99_ms"):
        assert keys[key].name == "throughput"
    assert keys["datapath_overhead_pct"].name == "overhead"
    assert keys["drop_cpu_us"].name == "drop_cost"


# ---- report


def _results(scenarios: list[Scenario], figures: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "command": "vipfarm bench --quick --out /tmp/x",
        "date": "2026-01-01T00:00:00+00:00",
        "machine": {
            "nproc": 2,
            "cpu_model": "Test CPU",
            "kernel": "6.18",
            "memory_gb": 24.0,
            "loadavg": [0.5, 0.4, 0.3],
            "python": "3.11",
        },
        "git": {"commit": "0123456789abcdef", "dirty": True},
        "tools": {"wrk": "wrk 4.1.0"},
        "seconds": 42.0,
    }
    outcomes = {
        s.name: ScenarioResult(figures, [_run("farm", Mode.CLOSE, 0, 10)]) for s in scenarios
    }
    seconds = {s.name: 1.0 for s in scenarios}
    return compose(meta, Settings.make(True), scenarios, outcomes, {"wrk_non_2xx": 2}, seconds)


def test_compose_puts_figures_at_top_level_and_checks_goals() -> None:
    goals = (
        Goal("ratio", ">=", 1.5, "ratio at least 1.5"),
        Goal("pct", "<=", 5.0, "pct at most 5"),
        Goal("missing", "<=", 1.0, "never measured"),
    )
    s = _scenario("alpha", {"ratio": "r", "pct": "p", "missing": "m"}, goals)
    results = _results([s], {"ratio": {"close": 2.0, "keepalive": 1.2}, "pct": 3.0})
    assert results["ratio"] == {"close": 2.0, "keepalive": 1.2}
    assert [(t["mode"], t["met"]) for t in results["targets"]] == [
        ("close", True),
        ("keepalive", False),
        (None, True),
        (None, None),
    ]
    assert set(SAFETY_COUNTERS) <= set(results["safety"])
    assert results["safety"]["wrk_non_2xx"] == 2
    assert results["notes"]["alpha"]["seconds"] == 1.0
    assert results["meta"]["lab_share_of_busy"] == 0.5  # 1 s of the lab's CPU, 2 s busy
    assert results["runs"]["alpha"][0]["variant"] == "farm"
    json.dumps(results)  # serialisable as is


def test_check_goals_handles_an_empty_mode_map() -> None:
    s = _scenario("alpha", {"x": "x"}, (Goal("x", ">=", 1, "x big"),))
    assert check_goals([s], {"x": {}}) == []


def test_markdown_states_command_machine_goals_figures_and_links_plots(tmp_path: Path) -> None:
    goals = (Goal("ratio", ">=", 1.5, "ratio at least 1.5"),)
    s = _scenario("alpha", {"ratio": "farm over proxy", "scalar": "one number"}, goals)
    results = _results([s], {"ratio": {"close": 1.2, "keepalive": 2.0}, "scalar": 12345.6})
    results["spread"] = {"ratio": {"close": [1.0, 1.3], "keepalive": [2.0, 2.0]}}
    png = tmp_path / "out" / "alpha.png"
    text = markdown(results, [s], {"alpha": [png]}, tmp_path / "docs")
    assert "`vipfarm bench --quick --out /tmp/x`" in text
    assert "lab's own tasks used 50% of the machine's busy CPU" in text
    assert "Test CPU, 2 CPUs" in text and "0123456789ab with uncommitted changes" in text
    assert "| ratio at least 1.5 (`ratio`) | close | 1.2 (1 to 1.3) | **falls short** |" in text
    assert "| `ratio` | 1.2 (1 to 1.3) | 2 | farm over proxy |" in text
    assert "| `scalar` | 12,346 |  | one number |" in text
    assert "- `wrk_non_2xx`: 2" in text
    assert "![alpha](../out/alpha.png)" in text
    named = markdown(results, [s], {"alpha": [png]}, None)
    assert "![" not in named and f"Plots (written by the run, not kept here): `{png}`" in named
    assert "do not edit" in text and "Method text" not in text and "method text" in text


def test_fmt() -> None:
    assert fmt(None) == "n/a"
    assert fmt(1234.5) == "1,234"
    assert fmt(0.012345) == "0.0123"
    assert fmt(True) == "True"


# ---- HAProxy and plots


def test_haproxy_conf_balances_the_real_addresses_in_tcp_and_http() -> None:
    nodes = [ipaddress.IPv4Address(f"198.51.100.{i}") for i in (11, 12, 13)]
    conf = haproxy_conf(nodes, ipaddress.IPv4Address("198.51.100.50"))
    assert "bind 198.51.100.50:80" in conf and "bind 198.51.100.50:81" in conf
    assert conf.count("mode tcp") == 2 and conf.count("mode http") == 2
    assert conf.count("server node3 198.51.100.13:80") == 2
    assert conf.count("balance roundrobin") == 2
    assert "timeout connect" in conf


def test_bar_panels_draws_one_panel_per_mode(tmp_path: Path) -> None:
    figures = {"a_rps": {"close": 10.0, "keepalive": 100.0}, "b_rps": {"close": 5.0}}
    path = bar_panels(tmp_path / "x.png", "t", "rps", figures, [("a_rps", "A"), ("b_rps", "B")])
    assert path is not None and path.read_bytes().startswith(b"\x89PNG")
    assert bar_panels(tmp_path / "y.png", "t", "rps", figures, [("zzz", "Z")]) is None
    assert not (tmp_path / "y.png").exists()


# ---- profiles


PERF_SCRIPT = """\
             wrk 41000      ffffffff81a0 nf_conntrack_in ([kernel.kallsyms])
             wrk 41000      ffffffff81a1 nft_do_chain ([kernel.kallsyms])
             wrk 41000      7f00000001 http_parser_execute (/usr/bin/wrk)
           nginx 300      ffffffff81a2 tcp_v4_rcv ([kernel.kallsyms])
           nginx 300      ffffffff81a3 br_handle_frame ([kernel.kallsyms])
           nginx 300      7f00000002 [unknown] (/usr/sbin/nginx)
          python 999      7f00000003 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so)
     ksoftirqd/1 22      ffffffff81a4 some_new_function ([kernel.kallsyms])
garbage line
"""


def test_perf_samples_are_kept_for_the_lab_only_and_grouped_by_area() -> None:
    from vipfarm.bench.profile import area_of, breakdown, parse_samples

    samples = parse_samples(PERF_SCRIPT, pids=[300, 22])
    assert sum(samples.values()) == 7  # the other tenant's python is left out
    assert samples[("conntrack", "nf_conntrack_in")] == 1
    assert samples[("netfilter/nftables", "nft_do_chain")] == 1
    assert samples[("wrk (user)", "http_parser_execute")] == 1
    assert samples[("bridge", "br_handle_frame")] == 1
    assert samples[("nginx (user)", "[nginx]")] == 1
    assert samples[("other kernel", "some_new_function")] == 1
    assert area_of("ksoftirqd/0", "x", "/usr/lib/x.so") == "ksoftirqd (user)"
    assert area_of("wrk", "bpf_prog_3b185187f1855c4c_vipfarm_web", "[unknown]") == "bpf prefilter"
    assert area_of("wrk", "tcx_run", "[kernel.kallsyms]") == "bpf prefilter"

    b = breakdown(samples, cpu_us=70.0, top=3)
    assert b["samples"] == 7 and b["cpu_us"] == 70.0
    assert sum(b["areas"].values()) == pytest.approx(70.0)
    assert b["areas"]["conntrack"] == pytest.approx(10.0)
    assert len(b["top"]) == 3 and b["top"][0][0] == pytest.approx(100 / 7)
    assert breakdown(parse_samples("", []), 5.0)["areas"] == {}


def test_markdown_renders_a_profile_table() -> None:
    s = _scenario("alpha", {"x": "x"})
    results = _results([s], {"x": 1.0})
    results["profiles"] = {
        "alpha": {
            "mode": "close",
            "variants": {
                "farm": {
                    "samples": 10,
                    "cpu_us": 200.0,
                    "areas": {"conntrack": 50.0},
                    "top": [[25.0, "nf_conntrack_in", "conntrack"]],
                },
                "haproxy": {"samples": 10, "cpu_us": 300.0, "areas": {"tcp/ip": 90.0}, "top": []},
            },
        }
    }
    text = markdown(results, [s], {}, Path("."))
    assert "| area | farm | haproxy |" in text
    assert "| **total** | 200 | 300 |" in text
    assert "| conntrack | 50 | n/a |" in text
    assert "`nf_conntrack_in` 25.0%" in text
    assert "farm against haproxy: -100.0 µs per request" in text
    assert "tcp/ip -90.0, conntrack +50.0" in text


def test_bystanders_are_every_host_but_the_nodes() -> None:
    from vipfarm.bench.switch import bystander_ports, node_port
    from vipfarm.lab.apps import AppKind
    from vipfarm.lab.buckets import default_rules
    from vipfarm.lab.testbed import Lab, LabConfig

    config = LabConfig(
        name="vbunit", nodes=2, clients=2, remote_clients=1, app=AppKind.BUILTIN, datapath=True,
        rules=default_rules(),
    )  # fmt: skip
    lab = Lab(config, "/sbin/ip")
    nodes = {node_port(lab, "node1"), node_port(lab, "node2")}
    bystanders = set(bystander_ports(lab))
    assert len(nodes) == 2 and not nodes & bystanders
    assert len(bystanders) == 2 + 2 + 1  # router (LAN and remote side), 2 clients, 1 remote


def test_sighup_handler_is_seen_in_proc() -> None:
    import os
    import signal

    from vipfarm.bench.figures import _catches_sighup

    old = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        assert not _catches_sighup(os.getpid())
        signal.signal(signal.SIGHUP, lambda *_: None)
        assert _catches_sighup(os.getpid())
    finally:
        signal.signal(signal.SIGHUP, old)
    assert not _catches_sighup(2**22 + 1)  # no such process


def test_figures_per_setting_render_with_their_names() -> None:
    from vipfarm.bench.framework import Scenario
    from vipfarm.bench.report import _figure_rows

    sc = Scenario(
        name="x",
        title="x",
        produces={"vrrp_failover_ms": "ms", "farm_rps": "rps"},
        method="",
        steps=lambda s: 0,
        run=lambda ctx: None,  # type: ignore[arg-type,return-value]
    )
    rows = _figure_rows(
        sc, {"vrrp_failover_ms": {"default": 3100.0, "fast": 320.5}, "farm_rps": {"close": 5.0}}
    )
    assert "default: 3,100, fast: 320" in rows[2]
    assert rows[3].startswith("| `farm_rps` | 5 |")
