"""The README's screenshot of the console's farm view, taken from a real lab.

`python -m vipfarm.console.screenshot OUT.png` (what `scripts/console-screenshot` runs) builds a
three-node lab with daemons, opens node1's console through the loopback forwarder in Debian's
headless Chromium (driven by Playwright, which then needs no browser download of its own),
signs in, waits until every node is UP and the shares add up to 100 %, writes the picture and
removes the lab. Needs root (network namespaces) and the dev extras (playwright).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def take(out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from vipfarm.lab import testbed
    from vipfarm.lab.console import for_lab
    from vipfarm.lab.testbed import unique_name

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("error: Debian's chromium is missing: run scripts/install")
    name = unique_name("vs")
    testbed.up(name, nodes=3, clients=1, daemon=True)
    try:
        fwd, token = for_lab(name, "node1", 0)
        fwd.start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                page.goto(fwd.url)
                page.fill("#token", token)
                page.click("#sign-in")
                expect(page.locator("#farm-summary")).to_contain_text(
                    "3 of 3 nodes UP", timeout=30_000
                )
                expect(page.locator("#farm-summary")).to_contain_text("100.0 %")
                expect(page.locator("#nodes td[data-field=app]")).to_have_text(
                    ["healthy"] * 3, timeout=30_000
                )
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out))
                browser.close()
        finally:
            fwd.stop()
    finally:
        testbed.down(name)
    print(f"wrote {out}")


if __name__ == "__main__":
    take(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img/console-farm.png"))
