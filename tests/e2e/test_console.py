"""The web console in a real Chromium (Debian's `chromium`, driven by Playwright's Python API),
against a real three-node lab reached through `vipfarm lab console`'s loopback forwarder.

One lab, forwarder and browser serve the whole module (building a farm costs ~15 s); each test
opens its own browser context and signs in. The tests run in file order and the destructive
one (`kill -9` of a node) is last. Every wait is Playwright's `expect` with a timeout, or
`wait_for` on the lab with a deadline, never a fixed sleep. Screenshots of every view go to
$VIPFARM_ARTEFACTS/console (default /tmp/vipfarm-artefacts/console), for a person to look at.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from vipfarm.lab import testbed
from vipfarm.lab.console import Forwarder, for_lab
from vipfarm.lab.testbed import Lab, unique_name

ARTEFACTS = Path(os.environ.get("VIPFARM_ARTEFACTS", "/tmp/vipfarm-artefacts")) / "console"
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
VIEWS = ("farm", "buckets", "logs", "config", "timeline", "charts", "support")
UI_TIMEOUT_MS = 15_000
expect.set_options(timeout=UI_TIMEOUT_MS)


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


class Farm:
    def __init__(self, lab: Lab, fwd: Forwarder, token: str, browser: Browser) -> None:
        self.lab, self.fwd, self.token, self.browser = lab, fwd, token, browser

    @property
    def url(self) -> str:
        return self.fwd.url.rstrip("/")

    def page(self, sign_in: bool = True, *, bypass_csp: bool = False) -> Page:
        # bypass_csp: only to inject the accessibility checker, which the page's CSP refuses.
        ctx = self.browser.new_context(
            viewport={"width": 1300, "height": 900}, bypass_csp=bypass_csp
        )
        ctx.set_default_timeout(UI_TIMEOUT_MS)
        page = ctx.new_page()
        page.goto(self.url + "/")
        if sign_in:
            page.fill("#token", self.token)
            page.click("#sign-in")
            expect(page.locator("#conn")).to_have_text("live")
        return page


def shot(page: Page, name: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / f"{name}.png"), full_page=True)


def state_cell(page: Page, node: str) -> Locator:
    return page.locator(f'#nodes tbody tr[data-node="{node}"] td[data-field="state"]')


def shares(page: Page) -> dict[str, float]:
    out = {}
    for row in page.locator("#nodes tbody tr").all():
        name = row.get_attribute("data-node") or "?"
        text = row.locator('td[data-field="share"]').inner_text()
        out[name] = float(text.split()[0])
    return out


@pytest.fixture(scope="module")
def farm() -> Iterator[Farm]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium package is missing: run scripts/install"
    name = unique_name()
    lab = testbed.up(name, nodes=3, clients=1, daemon=True)
    fwd: Forwarder | None = None
    try:
        fwd, token = for_lab(name, "node1", 0)
        fwd.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                yield Farm(lab, fwd, token, browser)
            finally:
                browser.close()
    finally:
        if fwd is not None:
            fwd.stop()
        testbed.down(name)


def test_a_wrong_token_is_refused_the_right_one_shows_three_nodes_up_sharing_100(
    farm: Farm,
) -> None:
    page = farm.page(sign_in=False)
    page.fill("#token", "not-the-token")
    page.click("#sign-in")
    expect(page.locator("#login-error")).to_contain_text("wrong token")
    shot(page, "login-refused")
    assert page.context.cookies() == []
    page.fill("#token", farm.token)
    page.click("#sign-in")
    expect(page.locator("#conn")).to_have_text("live")
    cookie = next(c for c in page.context.cookies() if c["name"] == "vipfarm_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > 0
    for node in farm.lab.node_names:
        expect(state_cell(page, node)).to_have_text("UP")
    expect(page.locator("#farm-summary")).to_contain_text("shares add up to 100.0 %")
    assert abs(sum(shares(page).values()) - 100.0) < 0.05, shares(page)
    shot(page, "farm")
    page.context.close()


def test_no_console_route_answers_without_a_session_and_changes_need_the_csrf_token(
    farm: Farm,
) -> None:
    routes = [
        ("GET", "/console/"),
        ("GET", "/console/static/console.js"),
        ("GET", "/console/api/farm"),
        ("GET", "/console/api/events"),
        ("POST", "/console/api/nodes/node2/actions/stop"),
        ("GET", "/console/api/nodes/node2/logs"),
        ("GET", "/console/api/nodes/node2/logs/stream"),
        ("GET", "/console/api/nodes/node2/snapshot"),
        ("GET", "/console/api/snapshot"),
        ("GET", "/console/api/config"),
        ("GET", "/console/api/config/history/0"),
        ("POST", "/console/api/config/check"),
        ("POST", "/console/api/config/deploy"),
        ("GET", "/console/api/buckets/who?client=198.51.100.201"),
        ("GET", "/console/api/timeline"),
        ("GET", "/console/api/charts"),
        ("POST", "/console/logout"),
    ]
    with httpx.Client(base_url=farm.url, timeout=10) as http:
        for method, path in routes:
            r = http.request(method, path, json={} if method == "POST" else None)
            if path == "/console/":
                assert r.status_code == 303 and r.headers["location"] == "/console/login"
            else:
                assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
        # Signed in, a change without the CSRF token is refused and changes nothing.
        r = http.post("/console/login", data={"token": farm.token})
        assert r.status_code == 303 and "vipfarm_console" in http.cookies
        page = http.get("/console/").text
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page)
        assert csrf is not None
        r = http.post("/console/api/nodes/node2/actions/stop")
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
        r = http.post("/console/api/nodes/node2/actions/stop", headers={"X-CSRF-Token": "x" * 43})
        assert r.status_code == 403
        r = http.post(
            "/console/api/config/check",
            json={"text": "[farm]"},
            headers={"X-CSRF-Token": csrf.group(1), "Origin": "http://evil.example"},
        )
        assert r.status_code == 403
        r = http.post(
            "/console/api/config/check",
            json={"text": "[farm]"},
            headers={"X-CSRF-Token": csrf.group(1)},
        )
        assert r.status_code == 200 and r.json()["ok"] is False
        # Support: one node's snapshot, and every node's in one archive (the peers' over the API).
        one = http.get("/console/api/nodes/node2/snapshot", timeout=60)
        assert one.status_code == 200 and one.content[:2] == b"\x1f\x8b"
        every = http.get("/console/api/snapshot", timeout=60)
        assert every.status_code == 200 and not every.headers["x-vipfarm-missing"]
        with tarfile.open(fileobj=io.BytesIO(every.content)) as tar:
            assert sorted(tar.getnames()) == [f"{n}.tar.gz" for n in farm.lab.node_names]
    assert farm.lab.daemon_state("node2")["state"] == "UP"


def test_every_request_of_the_page_goes_to_the_node_it_was_loaded_from(farm: Farm) -> None:
    page = farm.page(sign_in=False)
    seen: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: seen.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.fill("#token", farm.token)
    page.click("#sign-in")
    expect(page.locator("#conn")).to_have_text("live")
    for view in VIEWS:
        page.click(f'nav a[data-view="{view}"]')
        expect(page.locator(f"#view-{view}")).to_be_visible()
    expect(page.locator("#config-nodes tbody tr")).to_have_count(3)
    foreign = [u for u in seen if not (u.startswith(farm.url + "/") or u.startswith("data:"))]
    assert seen and not foreign, foreign
    assert not errors, errors  # no script error and no refused load (CSP) on any view
    page.context.close()


def test_the_main_views_have_no_serious_accessibility_violations(farm: Farm) -> None:
    axe = AXE.read_text()
    page = farm.page(sign_in=False, bypass_csp=True)

    def check(view: str) -> None:
        page.add_script_tag(content=axe)
        result = page.evaluate(
            "async () => { const r = await axe.run(document, {resultTypes: ['violations']});"
            " return r.violations.map(v => ({id: v.id, impact: v.impact,"
            " nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)})); }"
        )
        bad = [v for v in result if v["impact"] in ("serious", "critical")]
        assert not bad, (view, bad)

    check("login")
    page.fill("#token", farm.token)
    page.click("#sign-in")
    expect(page.locator("#conn")).to_have_text("live")
    expect(page.locator("#nodes tbody tr")).to_have_count(3)
    for view in VIEWS:
        page.click(f'nav a[data-view="{view}"]')
        expect(page.locator(f"#view-{view}")).to_be_visible()
        if view == "config":
            expect(page.locator("#config-problems")).to_contain_text("valid")
        check(view)
    # Keyboard: the views are links in the tab order, and the actions buttons with names.
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.tagName") in ("A", "BUTTON")
    page.context.close()


def test_the_logs_view_follows_new_lines_as_they_are_written(farm: Farm) -> None:
    page = farm.page()
    page.click('nav a[data-view="logs"]')
    page.select_option("#log-node", "node2")
    expect(page.locator("#log-status")).to_contain_text("following node2's module log")
    expect(page.locator("#log-lines")).to_contain_text("state_changed")
    marker = f"console_test_marker_{os.getpid()}_{time.monotonic_ns()}"
    log = farm.lab.dir / "nodelogs" / "node2" / "module.log"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S") + ",000"
    with log.open("a") as f:
        f.write(f"{stamp} WARNING {marker} written=by-the-test\n")
    expect(page.locator("#log-lines")).to_contain_text(marker)
    page.select_option("#log-level", "WARNING")
    expect(page.locator("#log-lines")).to_contain_text(marker)
    expect(page.locator("#log-lines")).not_to_contain_text("state_changed")
    # Both logs together: the start script's output beside the module's events.
    page.select_option("#log-level", "")
    page.select_option("#log-name", "both")
    expect(page.locator("#log-lines")).to_contain_text("app | ")
    expect(page.locator("#log-lines")).to_contain_text("script_finished script=start")
    shot(page, "logs")
    page.context.close()


def confirm(page: Page) -> None:
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm-ok")


def test_drain_a_node_from_the_page_then_start_it_and_the_kernels_agree(farm: Farm) -> None:
    lab = farm.lab
    page = farm.page()
    with lab.hold("client1", 30) as held:
        # about a third of the held connections are node3's: the drain waits for them
        assert held.initial["ok"] == 30, held.initial
        page.click('button[data-action="stop"][data-node="node3"]')
        confirm(page)
        expect(page.locator("#action-outcome")).to_contain_text("node3 is")
        expect(state_cell(page, "node3")).to_contain_text(
            re.compile(r"drain: [1-9]\d* connections, \d+ s left")
        )
        shot(page, "farm-node3-draining")
    expect(state_cell(page, "node3")).to_have_text("STOP", timeout=45_000)
    shot(page, "farm-node3-stopped")
    wait_for(
        "node1 and node2 to hold every bucket",
        lambda: lab.holds_every_bucket_once(["node1", "node2"]),
    )
    assert lab.kernel_owned(["node3"])["node3"] == []
    expect(page.locator("#farm-summary")).to_contain_text("shares add up to 100.0 %")
    page.click('button[data-action="start"][data-node="node3"]')
    confirm(page)
    expect(state_cell(page, "node3")).to_have_text("UP", timeout=45_000)
    wait_for(
        "every node to hold its buckets",
        lambda: (
            lab.holds_every_bucket_once(lab.node_names)
            and bool(lab.kernel_owned(["node3"])["node3"])
        ),
    )
    expect(page.locator("#farm-summary")).to_contain_text("3 of 3 nodes UP")
    text = (lab.dir / "nodelogs" / "node1" / "module.log").read_text()
    assert re.search(r"console_action user=\S+ action=stop target=node3", text)
    assert re.search(r"console_action user=\S+ action=start target=node3", text)
    page.context.close()


V4_UDP = "ip daddr 198.51.100.100 udp dport "


def nft_rules(lab: Lab, node: str) -> str:
    return lab.exec(node, ["nft", "list", "table", "inet", f"vipfarm_{lab.name}"]).stdout


def test_edit_a_rule_port_invalid_is_refused_valid_deploys_everywhere_then_roll_back(
    farm: Farm,
) -> None:
    lab = farm.lab
    page = farm.page()
    page.click('nav a[data-view="config"]')
    editor = page.locator("#config-text")
    expect(editor).to_have_value(re.compile(r"\[farm\]"))
    expect(page.locator("#config-problems")).to_contain_text("valid")
    original = editor.input_value()
    block = 'vip = "198.51.100.100"\nproto = "udp"\nports = "7"'
    assert block in original
    editor.fill(original.replace(block, block.replace('"7"', '"70000"')))
    problem = page.locator('#config-problems li[data-key="rule[1].ports"]')
    expect(problem).to_contain_text("70000")
    # the problem names its line, and the button goes there
    line = original.split(block)[0].count("\n") + 3
    expect(problem.locator("button[data-line]")).to_have_text(f"line {line}")
    problem.locator("button[data-line]").click()
    assert (
        page.evaluate(
            "() => { const a = document.querySelector('#config-text');"
            " return a.value.slice(a.selectionStart, a.selectionEnd); }"
        )
        == 'ports = "70000"'
    )

    expect(page.locator("#config-deploy")).to_be_disabled()
    expect(editor).to_have_attribute("aria-invalid", "true")
    shot(page, "config-invalid")
    editor.fill(original.replace(block, block.replace('"7"', '"9"')))
    expect(page.locator("#config-problems")).to_contain_text("valid")
    expect(page.locator("#config-deploy")).to_be_enabled()
    page.click("#config-dry-run")
    expect(page.locator("#config-result")).to_contain_text("dry run: version 1")
    assert V4_UDP + "9 " not in nft_rules(lab, "node2")
    page.click("#config-deploy")
    confirm(page)
    expect(page.locator("#config-result")).to_contain_text("deployment: version 1")
    for node in lab.node_names:
        expect(page.locator("#config-result")).to_contain_text(f"{node}: applied")
        rules = nft_rules(lab, node)
        assert V4_UDP + "9 " in rules and V4_UDP + "7 " not in rules, node
    expect(page.locator("#config-nodes tbody tr td[data-field=version]")).to_have_text(
        ["1", "1", "1"]
    )
    page.click('nav a[data-view="farm"]')
    for node in lab.node_names:
        expect(
            page.locator(f'#nodes tbody tr[data-node="{node}"] td[data-field="config"]')
        ).to_contain_text("v1 ")
    page.click('nav a[data-view="config"]')
    rollback = page.locator('#config-history button[aria-label="Roll back to version 0"]')
    rollback.click()
    confirm(page)
    expect(page.locator("#config-result")).to_contain_text("rollback: version 2")
    expect(page.locator("#config-nodes tbody tr td[data-field=version]")).to_have_text(
        ["2", "2", "2"]
    )
    for node in lab.node_names:
        rules = nft_rules(lab, node)
        assert V4_UDP + "7 " in rules and V4_UDP + "9 " not in rules, node
    shot(page, "config")
    page.context.close()


def test_the_bucket_map_and_who_serves_a_client(farm: Farm) -> None:
    page = farm.page()
    page.click('nav a[data-view="buckets"]')
    expect(page.locator("#bucket-grid span")).to_have_count(256)
    expect(page.locator("#legend")).to_contain_text("moving (0)")
    page.fill("#who-client", "198.51.100.201")
    page.fill("#who-port", "40000")
    page.click("#who-form button[type=submit]")
    expect(page.locator("#who-answer")).to_contain_text(re.compile(r"served by node\d"))
    shot(page, "buckets")
    page.context.close()


def test_restart_a_node_s_application_from_the_page(farm: Farm) -> None:
    lab = farm.lab
    before = lab.app_pid("node2")
    assert before is not None
    page = farm.page()
    page.click('button[data-action="restart-app"][data-node="node2"]')
    confirm(page)
    expect(page.locator("#action-outcome")).to_contain_text("node2 is")
    wait_for(
        "node2's application to run again under a new pid",
        lambda: lab.app_pid("node2") not in (None, before),
    )
    expect(state_cell(page, "node2")).to_have_text("UP", timeout=45_000)
    expect(page.locator('#nodes tbody tr[data-node="node2"] td[data-field="app"]')).to_have_text(
        "healthy"
    )
    wait_for(
        "every bucket owned once, node2 with its share",
        lambda: (
            lab.holds_every_bucket_once(lab.node_names)
            and bool(lab.kernel_owned(["node2"])["node2"])
        ),
    )
    text = (lab.dir / "nodelogs" / "node1" / "module.log").read_text()
    assert re.search(r"console_action user=\S+ action=restart-app target=node2 outcome=", text)
    assert "app_restart_requested" in (lab.dir / "nodelogs" / "node2" / "module.log").read_text()
    page.context.close()


def test_kill_9_of_a_node_shows_it_dead_within_2_s_and_the_timeline_the_failover(
    farm: Farm,
) -> None:
    lab = farm.lab
    page = farm.page()
    for node in lab.node_names:
        expect(state_cell(page, node)).to_have_text("UP")
    t0 = time.monotonic()
    lab.kill("node2")
    expect(state_cell(page, "node2")).to_have_text("DEAD", timeout=2000)
    dead_after = time.monotonic() - t0
    expect(page.locator("#farm-summary")).to_contain_text("shares add up to 100.0 %", timeout=5000)
    live = {n: s for n, s in shares(page).items() if n != "node2"}
    assert abs(sum(live.values()) - 100.0) < 0.05, live
    shot(page, "farm-node2-dead")
    page.click('nav a[data-view="timeline"]')
    expect(page.locator('#timeline li[data-kind="failover"]').first).to_contain_text(
        "node2", timeout=UI_TIMEOUT_MS
    )
    shot(page, "timeline")
    page.click('nav a[data-view="charts"]')
    expect(page.locator("#chart-share svg")).to_be_visible()
    shot(page, "charts")
    page.click('nav a[data-view="support"]')
    expect(page.locator("#support-links li")).to_have_count(4)
    shot(page, "support")
    print(f"node2 shown dead {dead_after * 1000:.0f} ms after kill -9")
    page.context.close()
